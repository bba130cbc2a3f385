"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438) for `quantize="w8a8-smooth"`: per input channel j of a
linear, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); then X' = X / s and W' = W * s compute the same
product, with the activation outliers moved into the weights, where per-channel int8 absorbs them. The
division is folded offline into the op that writes X, so it costs nothing at run time:

- qkv and gate_up: into the RMSNorm weights before them (input_norm, post_attn_norm);
- o: into v_proj's output rows (attention is linear in V). With GQA, o's input channel h * head_dim + d
  comes from kv head h // group's row d, so each kv-head channel has one scale, shared by the q heads of
  its group: the maxima are taken over the group;
- down: into up_proj's output rows (SiLU(gate) * up is linear in up).

v and up rows scaled by 1 / s leave their per-output-channel int8 step scaled with them: only the
columns of the smoothed linear see a different quantization. The maxima max|X_j| come from running the
unquantized model over calibration windows; max|W_j| is over the output rows of the weight being
quantized (for qkv and gate_up, after o's and down's scales were folded into their v and up rows).
The calibration text by default is CPython's own reference documentation (pydoc_data.topics: prose and
code examples, shipped with every CPython), disjoint from the Python source files that
benches/perplexity.py scores.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from decoding.cache import AttentionMetadata, KVCache
from decoding.errors import InvalidRequest

CALIBRATION_SOURCE = "pydoc_data.topics (CPython's reference documentation)"
# Inputs whose maxima calibration records, by the module whose forward input they are (LlamaBlock paths):
# the MLP's input is gate_up's (the MLP calls gate_up.forward_silu_mul directly, which skips hooks).
_HOOKED = {"attn.qkv": "attn.qkv", "attn.o": "attn.o", "mlp.gate_up": "mlp", "mlp.down": "mlp.down"}


def calibration_text() -> str:
    """The default calibration text: every topic of CPython's pydoc reference documentation, in key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise InvalidRequest("w8a8-smooth calibrates on pydoc_data.topics, which this Python lacks: pass "
                             "calibration windows to decoding.quant.quantize_model yourself") from e
    return "\n\n".join(topics[k] for k in sorted(topics))


def text_windows(ids: list[int], num_tokens: int, window: int) -> list[list[int]]:
    """Windows of `window` tokens, evenly spaced over ids, about num_tokens in all (all of ids if shorter)."""
    if num_tokens < 1 or window < 2:
        raise InvalidRequest(f"calibration needs num_tokens >= 1 and window >= 2, got {num_tokens}, {window}")
    starts = list(range(0, max(1, len(ids) - window + 1), window))
    count = min(len(starts), -(-num_tokens // window))
    picked = [starts[i * len(starts) // count] for i in range(count)]
    return [ids[s: s + window] for s in picked if len(ids[s: s + window]) >= 2]


def calibration_windows(tokenizer, num_tokens: int, window: int = 512) -> list[list[int]]:
    """Token windows of the default calibration text (calibration_text) for this tokenizer."""
    return text_windows(tokenizer.encode(calibration_text(), add_special_tokens=False), num_tokens, window)


def random_windows(vocab_size: int, num_tokens: int, window: int = 512, seed: int = 0) -> list[list[int]]:
    """Uniformly random token windows: calibration for random-weight models (benchmarks), where no text
    means anything and the speed of plain W8A8 does not depend on the scales."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (max(window, num_tokens),), generator=g).tolist()
    return text_windows(ids, num_tokens, window)


@torch.no_grad()
def input_absmax(model: nn.Module, windows: list[list[int]], progress: bool = False) -> dict[str, torch.Tensor]:
    """max |x| per input column of every block's qkv, o, gate_up and down over the windows (one prefill
    each, the model's own dtype and kernels): {"layers.{i}.attn.qkv": fp32 [in_features], ...}."""
    if not windows or not all(windows):
        raise InvalidRequest("calibration needs at least one window of token ids, and no empty one")
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        return hook

    handles = [block.get_submodule(module).register_forward_pre_hook(hook_for(f"layers.{i}.{path}"))
               for i, block in enumerate(model.layers) for path, module in _HOOKED.items()]
    config, device = model.config, model.embed_tokens.weight.device
    block_size, longest = 16, config.max_position_embeddings
    # A window longer than the model's context runs as several prefills of at most that length.
    pieces = [w[s: s + longest] for w in windows for s in range(0, len(w), longest)]
    try:
        for ids in tqdm(pieces, desc="SmoothQuant calibration", unit="window", disable=not progress):
            if max(ids) >= config.vocab_size or min(ids) < 0:
                raise InvalidRequest(f"calibration token ids must be in [0, {config.vocab_size})")
            num_blocks = -(-len(ids) // block_size)
            cache = KVCache(config, num_blocks, block_size, device, model.embed_tokens.weight.dtype)
            meta = AttentionMetadata.build([list(range(num_blocks))], [len(ids)], [len(ids)], block_size, device)
            model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), (cache.k, cache.v), meta)
    finally:
        for h in handles:
            h.remove()
    return amax


def smooth_scales(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x_amax^alpha / w_amax^(1 - alpha), fp32; 1 where either maximum is 0 (a channel calibration
    never saw active, or an all-zero weight column: no evidence to move anything)."""
    x, w = x_amax.float(), w_amax.float()
    live = (x > 0) & (w > 0)
    s = x.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1 - alpha)
    return torch.where(live, s, torch.ones_like(s))


def _scale_(t: torch.Tensor, factor: torch.Tensor) -> None:
    t.copy_((t.float() * factor).to(t.dtype))  # in fp32, one rounding to the parameter's dtype


@torch.no_grad()
def fold_smoothing(model: nn.Module, act_amax: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
    """Fold SmoothQuant scales into every block of an unquantized LlamaModel, in place (see the module
    docstring); the model computes the same function up to rounding in its dtype."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidRequest(f"alpha must be in [0, 1], got {alpha}")
    c = model.config
    heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    group, q_size, kv_size, inter = heads // kv_heads, c.q_size, c.kv_size, c.intermediate_size
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        if heads * dim != attn.o.in_features or attn.qkv.out_features != q_size + 2 * kv_size:
            raise InvalidRequest("fold_smoothing needs a whole (not tensor-parallel) unquantized model")
        amax = {path: act_amax[f"layers.{i}.{path}"].to(attn.o.weight.device)
                for path in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")}
        # o: one scale per kv-head channel (g, d), from the maxima over the q heads h of group g.
        x_o = amax["attn.o"].view(kv_heads, group, dim).amax(1)
        w_o = attn.o.weight.abs().amax(0).float().view(kv_heads, group, dim).amax(1)
        s_o = smooth_scales(x_o, w_o, alpha)  # [kv_heads, dim]
        _scale_(attn.o.weight, s_o[:, None, :].expand(kv_heads, group, dim).reshape(1, q_size))
        v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
        _scale_(attn.qkv.weight[v_rows], 1.0 / s_o.reshape(kv_size, 1))
        if attn.qkv.bias is not None:
            _scale_(attn.qkv.bias[v_rows], 1.0 / s_o.reshape(kv_size))
        # down: one scale per intermediate channel, divided out of up's rows (and bias).
        s_down = smooth_scales(amax["mlp.down"], mlp.down.weight.abs().amax(0), alpha)
        _scale_(mlp.down.weight, s_down[None, :])
        up_rows = slice(inter, 2 * inter)
        _scale_(mlp.gate_up.weight[up_rows], 1.0 / s_down[:, None])
        if mlp.gate_up.bias is not None:
            _scale_(mlp.gate_up.bias[up_rows], 1.0 / s_down)
        # qkv and gate_up: into the RMSNorm weights (their column maxima now include the v / up scaling).
        for linear, norm, path in ((attn.qkv, block.input_norm, "attn.qkv"),
                                   (mlp.gate_up, block.post_attn_norm, "mlp.gate_up")):
            s = smooth_scales(amax[path], linear.weight.abs().amax(0), alpha)
            _scale_(linear.weight, s[None, :])
            _scale_(norm.weight, 1.0 / s)


def smooth_model(model: nn.Module, windows: list[list[int]], alpha: float = 0.5, progress: bool = False) -> None:
    """Calibrate on the token windows (input_absmax) and fold the scales into the model (fold_smoothing)."""
    fold_smoothing(model, input_absmax(model, windows, progress), alpha)
