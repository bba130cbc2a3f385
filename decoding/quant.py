"""INT8 inference: weight quantizers, the W8A16 and W8A8 linear layers, the model swap, and quantized
checkpoints (safetensors with their scales and a format marker).

- "int8" (W8A16): symmetric int8 weights, one fp32 scale per output channel (or per group of
  `group_size` input columns); activations stay 16-bit. Decode (1..16 tokens) runs a GEMV that reads the
  int8 weights and dequantizes in registers: half the bytes of bf16.
- "w8a8": the same per-channel int8 weights, and activations quantized per token at run time, multiplied
  on int8 tensor cores with int32 accumulation, with LLM.int8()'s decomposition: activation columns
  whose max |x| exceeds `threshold` (6.0) go through a 16-bit matmul. Steps of at most `min_tokens` (16)
  tokens use the W8A16 GEMV instead, since int8 tensor cores do not pay at decode sizes.
- "w8a8-smooth": SmoothQuant (decoding.smoothquant): per-channel scales calibrated on text and folded
  into the norms and the v / up rows before the weights are quantized, then plain per-token W8A8 (no
  decomposition unless `threshold` is set).

The projections of the decoder blocks (qkv, o, gate_up, down) are quantized in the mode's way, and the
LM head (QuantConfig.lm_head, on by default) as W8A16 in every mode: a head only ever multiplies the
last token of each sequence, which the GEMV serves, and at batch 1 it is a fifth of a Llama-3.2-1B
step's bytes. A head tied to the embedding gets an int8 copy; the embedding stays in the model's dtype
(a step reads only its looked-up rows). `quantize_model` swaps the nn.Linear modules of a loaded
LlamaModel in place, so it works whatever kernels the rest of the step uses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from decoding import ops
from decoding.config import ModelConfig
from decoding.errors import CheckpointError, InvalidRequest

MODES = ("int8", "w8a8", "w8a8-smooth")
# Outlier threshold by mode when QuantConfig.threshold is None.
_DEFAULT_THRESHOLD = {"int8": 6.0, "w8a8": 6.0, "w8a8-smooth": 0.0}
# Projections swapped in every decoder block (attribute paths under LlamaBlock).
LINEARS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
# safetensors metadata keys that mark a quantized checkpoint of this format.
FORMAT_KEY, FORMAT_VALUE = "decoding_format", "int8"
VERSION_KEY, VERSION_VALUE = "decoding_format_version", "1"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True, slots=True)
class QuantConfig:
    mode: str
    """"int8" (W8A16), "w8a8" (LLM.int8()) or "w8a8-smooth" (SmoothQuant, then plain W8A8)."""
    group_size: int | None = None
    """Input columns per weight scale (int8 only); None: one scale per output channel."""
    threshold: float | None = None
    """w8a8 modes: activation columns with max |x| above this go through a 16-bit matmul; 0 disables.
    None: 6.0 for "w8a8", 0 for "w8a8-smooth"."""
    max_outliers: int = 64
    """w8a8: at most this many outlier columns per matmul (the largest), so no host sync is needed."""
    min_tokens: int = 16
    """w8a8: steps with at most this many tokens use the W8A16 GEMV; 0 quantizes activations always."""
    alpha: float = 0.5
    """w8a8-smooth: migration strength in [0, 1], s = max|X|^alpha / max|W|^(1 - alpha)."""
    calibration_tokens: int = 8192
    """w8a8-smooth: tokens of calibration text (windows of 512) whose activation maxima set the scales."""
    lm_head: bool = True
    """Quantize the LM head too (W8A16, per output channel or group_size, in every mode)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(f"quantize must be one of {MODES} or None, got {self.mode!r}")
        if self.threshold is None:  # frozen: the mode's default is written once, here
            object.__setattr__(self, "threshold", _DEFAULT_THRESHOLD[self.mode])
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidRequest(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calibration_tokens < 1:
            raise InvalidRequest(f"calibration_tokens must be >= 1, got {self.calibration_tokens}")
        if self.group_size is not None:
            if self.mode != "int8":
                raise InvalidRequest("group_size is for quantize='int8' only: W8A8 needs one scale per output "
                                     "channel so that it factors out of the int32 sums")
            if self.group_size < 16 or self.group_size % 16:
                raise InvalidRequest(f"group_size must be a positive multiple of 16, got {self.group_size}")
        if self.threshold < 0 or self.max_outliers < 0 or self.min_tokens < 0:
            raise InvalidRequest("threshold, max_outliers and min_tokens must be >= 0")


# ----------------------------------------------------------------------------- quantizers
def quantize_weight(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of w [N, K] per output channel (row) or per group of input columns.

    scale = max|w| / 127 over the row (or group), q = round(w / scale) in [-127, 127]; an all-zero row
    or group gets scale 1. Every element then satisfies |w - q * scale| <= scale / 2.

    Returns
    -------
    (q [N, K] int8, scales fp32 [N] or [N, K // group_size])

    Example
    -------
    >>> q, s = quantize_weight(torch.randn(8, 64))
    >>> (dequantize_weight(q, s) - w).abs().max() <= s.max() / 2
    """
    n, k = w.shape
    wf = w.float()
    if group_size is not None:
        if k % group_size:
            raise InvalidRequest(f"group_size {group_size} does not divide the layer's input size {k}")
        wf = wf.view(n, k // group_size, group_size)
    else:
        wf = wf.view(n, 1, k)
    amax = wf.abs().amax(-1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scales[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return q, (scales if group_size is not None else scales[:, 0]).contiguous()


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 and scales [N] or [N, groups] -> fp32 [N, K]."""
    n, k = q.shape
    s = scales.view(n, -1)
    return (q.float().view(n, s.shape[1], -1) * s[..., None]).view(n, k)


# ----------------------------------------------------------------------------- layers
class Int8Linear(nn.Module):
    """W8A16 linear: y = x @ (qweight * scales)^T + bias, int8 weights, x and y in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None, **kwargs) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size, **kwargs)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                    **kwargs) -> Int8Linear:
        """The int8 layer of a 16/32-bit weight [out_features, in_features] (e.g. a tied LM head's embedding)."""
        layer = cls(w.shape[1], w.shape[0], bias is not None, group_size, w.dtype, w.device, **kwargs)
        with torch.no_grad():
            q, s = quantize_weight(w, group_size)
            layer.qweight.copy_(q)
            layer.scales.copy_(s)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {group}"

    def _w8a16(self, x2: torch.Tensor) -> torch.Tensor:
        return ops.w8a16_linear(x2, self.qweight, self.scales, self.bias)

    def _forward_2d(self, x2: torch.Tensor) -> torch.Tensor:
        return self._w8a16(x2)

    def _silu_mul_2d(self, x2: torch.Tensor) -> torch.Tensor:
        return ops.w8a16_linear_silu_mul(x2, self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self._forward_2d(x.reshape(-1, self.in_features)).view(*lead, self.out_features)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this layer's output (rows: gate | up): the MLP's hook (models/llama.py), one
        fused GEMV at decode sizes on CUDA."""
        if self.bias is not None:
            return ops.silu_and_mul(self(x))
        lead = x.shape[:-1]
        return self._silu_mul_2d(x.reshape(-1, self.in_features)).view(*lead, self.out_features // 2)


class W8A8Linear(Int8Linear):
    """W8A8 linear with LLM.int8()'s outlier decomposition (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 threshold: float = 6.0, max_outliers: int = 64, min_tokens: int = 16) -> None:
        if group_size is not None:
            raise InvalidRequest("W8A8 needs per-channel weight scales (group_size=None)")
        super().__init__(in_features, out_features, bias, None, dtype, device)
        self.threshold, self.max_outliers, self.min_tokens = threshold, max_outliers, min_tokens

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
                f"max_outliers={self.max_outliers}, min_tokens={self.min_tokens}")

    def _forward_2d(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= self.min_tokens:
            return self._w8a16(x2)
        return ops.w8a8_linear(x2, self.qweight, self.scales, self.bias, self.threshold, self.max_outliers)

    def _silu_mul_2d(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= self.min_tokens:
            return super()._silu_mul_2d(x2)
        return ops.silu_and_mul(self._forward_2d(x2))


# ----------------------------------------------------------------------------- the model swap
def _layer_kwargs(qc: QuantConfig) -> tuple[type[Int8Linear], dict]:
    if qc.mode == "int8":
        return Int8Linear, {}
    return W8A8Linear, dict(threshold=qc.threshold, max_outliers=qc.max_outliers, min_tokens=qc.min_tokens)


def _check_shapes(model: nn.Module, qc: QuantConfig) -> None:
    if qc.group_size is None:
        return
    for block in model.layers:
        for path in LINEARS:
            k = block.get_submodule(path).in_features
            if k % qc.group_size:
                raise InvalidRequest(f"group_size {qc.group_size} does not divide {path}'s input size {k}")


def quantize_model(model: nn.Module, quant: str | QuantConfig, progress: bool = False,
                   calibration: list[list[int]] | None = None, calibration_name: str = "") -> nn.Module:
    """Swap the qkv, o, gate_up and down nn.Linear of every block of a loaded LlamaModel for int8 layers.

    In place (returns the model). Each bf16/fp16/fp32 weight is quantized on its device and dropped as
    its layer is replaced, so peak memory grows by about one layer. Sets `model.quant` (a QuantConfig).
    Shapes the fast kernels cannot take (K not a multiple of 16) still run, on the reference path.
    "w8a8-smooth" needs `calibration`: windows of token ids that the unquantized model runs over first
    (decoding.smoothquant); `calibration_name` says what they are (saved with the checkpoint).

    Example
    -------
    >>> windows = smoothquant.calibration_windows(tokenizer, 8192)
    >>> quantize_model(model, "w8a8-smooth", calibration=windows, calibration_name="my text")
    """
    qc = quant if isinstance(quant, QuantConfig) else QuantConfig(quant)
    if getattr(model, "quant", None) is not None:
        raise InvalidRequest(f"the model is already quantized ({model.quant.mode})")
    _check_shapes(model, qc)
    if qc.mode == "w8a8-smooth":
        from decoding import smoothquant

        if not calibration:
            raise InvalidRequest("quantize='w8a8-smooth' needs calibration token windows (Generator."
                                 "from_pretrained calibrates on decoding.smoothquant.calibration_text())")
        smoothquant.smooth_model(model, calibration, qc.alpha, progress=progress)
        model.calibration = calibration_name or f"{len(calibration)} windows"
    cls, kwargs = _layer_kwargs(qc)
    for block in tqdm(model.layers, desc=f"Quantizing ({qc.mode})", unit="layer", disable=not progress):
        for path in LINEARS:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            setattr(parent, name, cls.from_linear(getattr(parent, name), qc.group_size, **kwargs))
    if qc.lm_head:
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        model.lm_head = Int8Linear.from_weight(head, None, qc.group_size)
    model.quant = qc
    return model


def build_quantized_model(config: ModelConfig, qc: QuantConfig, device: torch.device | str,
                          dtype: torch.dtype) -> nn.Module:
    """An uninitialised quantized LlamaModel (no 16-bit copy of the projections is ever allocated)."""
    from decoding.models.llama import LlamaModel

    cls, kwargs = _layer_kwargs(qc)
    with torch.device("meta"):
        model = LlamaModel(config).to(dtype)  # cast first: the int8 layers' fp32 scales must stay fp32
        for block in model.layers:
            for path in LINEARS:
                parent_path, _, name = path.rpartition(".")
                parent = block.get_submodule(parent_path)
                lin = getattr(parent, name)
                setattr(parent, name, cls(lin.in_features, lin.out_features, lin.bias is not None, qc.group_size,
                                          dtype, **kwargs))
        if qc.lm_head:
            model.lm_head = Int8Linear(config.hidden_size, config.vocab_size, False, qc.group_size, dtype)
    model = model.to_empty(device=device)
    model.init_buffers()
    model.quant = qc
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- checkpoints
def config_to_hf(config: ModelConfig) -> dict:
    """A HF-style config.json dict that ModelConfig.from_hf reads back to the same config."""
    hf = dataclasses.asdict(config)
    hf["architectures"] = [_ARCHITECTURES[config.model_type]]
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = config.sliding_window is not None
    return hf


def _metadata(qc: QuantConfig, dtype: torch.dtype) -> dict[str, str]:
    return {FORMAT_KEY: FORMAT_VALUE, VERSION_KEY: VERSION_VALUE, "quantize": qc.mode,
            "group_size": str(qc.group_size or 0), "threshold": repr(qc.threshold),
            "max_outliers": str(qc.max_outliers), "min_tokens": str(qc.min_tokens),
            "alpha": repr(qc.alpha), "calibration_tokens": str(qc.calibration_tokens),
            "lm_head": str(int(qc.lm_head)), "dtype": str(dtype).removeprefix("torch.")}


def save_quantized(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Write a quantized model as a checkpoint directory that `Generator.from_pretrained(path)` loads.

    path/config.json, tokenizer.json, tokenizer_config.json (chat template, special tokens), and
    model.safetensors: our own parameter names (layers.{i}.attn.qkv.qweight, .scales, ...) with the
    format marker, quantization settings and dtype in the safetensors metadata.
    """
    from safetensors.torch import save_file

    qc = getattr(model, "quant", None)
    if qc is None:
        raise InvalidRequest(f"save_quantized needs a quantized model: load it with quantize= one of {MODES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config, eos_token_id=list(tokenizer.eos_token_ids))
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    (path / "tokenizer.json").write_text(tokenizer.tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token,
         "eos_token": tokenizer.eos_token}, indent=2))
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    meta = _metadata(qc, model.embed_tokens.weight.dtype)
    if getattr(model, "calibration", None):  # w8a8-smooth: what the scales folded into the weights came from
        meta["calibration"] = model.calibration
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)
    return path


def checkpoint_marker(files: list[Path]) -> dict[str, str] | None:
    """The quantization metadata of a safetensors checkpoint, or None for a plain (HF) one.

    Raises CheckpointError when the marker is there but is not this format/version, or when only some
    shards carry it.
    """
    from safetensors import SafetensorError, safe_open

    found = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                meta = st.metadata() or {}
                quantized = [k for k in st.keys() if k.endswith((".qweight", ".scales"))]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f}: {e}") from e
        if quantized and FORMAT_KEY not in meta:
            raise CheckpointError(f"{f.name} holds quantized tensors ({quantized[0]}, ...) but its safetensors "
                                  "metadata has no decoding int8 format marker")
        found.append(meta if FORMAT_KEY in meta else None)
    if all(m is None for m in found):
        return None
    if any(m is None for m in found):
        raise CheckpointError("only some safetensors files carry the decoding int8 format marker")
    meta = found[0]
    if meta[FORMAT_KEY] != FORMAT_VALUE or meta.get(VERSION_KEY) != VERSION_VALUE:
        raise CheckpointError(
            f"quantized checkpoint has format marker {meta[FORMAT_KEY]!r} version {meta.get(VERSION_KEY)!r}; "
            f"this version of decoding reads {FORMAT_VALUE!r} version {VERSION_VALUE!r}")
    if any(m != meta for m in found[1:]):
        raise CheckpointError("safetensors files of one quantized checkpoint disagree on their metadata")
    return meta


def _quant_config(meta: dict[str, str]) -> QuantConfig:
    try:
        group = int(meta.get("group_size", "0"))
        return QuantConfig(meta["quantize"], group or None, float(meta.get("threshold", 6.0)),
                           int(meta.get("max_outliers", 64)), int(meta.get("min_tokens", 16)),
                           float(meta.get("alpha", 0.5)), int(meta.get("calibration_tokens", 8192)),
                           lm_head=meta.get("lm_head", "0") == "1")  # checkpoints before the key: a 16-bit head
    except (KeyError, ValueError) as e:  # InvalidRequest is a ValueError: a bad mode lands here too
        raise CheckpointError(f"quantized checkpoint has bad quantization metadata: {e}") from e


def load_quantized(config: ModelConfig, files: list[Path], meta: dict[str, str], device: torch.device | str,
                   dtype: torch.dtype, progress: bool = False) -> nn.Module:
    """Build the quantized model that `meta` describes and fill it from the checkpoint files.

    Raises CheckpointError for a missing tensor (e.g. a layer's scales), an unknown one, or a tensor of
    the wrong shape or dtype (int8 weights, fp32 scales).
    """
    from safetensors import SafetensorError, safe_open

    model = build_quantized_model(config, _quant_config(meta), device, dtype)
    if "calibration" in meta:
        model.calibration = meta["calibration"]
    expected = model.state_dict()
    filled: set[str] = set()
    with torch.no_grad():
        for f in tqdm(files, desc="Loading int8 weights", unit="file", disable=not progress):
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for name in st.keys():
                        _fill(expected, name, st.get_tensor(name))
                        filled.add(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {f}: {e}") from e
    missing = [n for n in expected if n not in filled]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"quantized checkpoint is missing tensors: {shown}")
    return model


def _fill(expected: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    if name not in expected:
        raise CheckpointError(f"quantized checkpoint has unexpected tensor {name!r}")
    dest = expected[name]
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(dest.shape)} expected")
    exact = name.endswith((".qweight", ".scales"))
    if exact and tensor.dtype != dest.dtype:
        raise CheckpointError(f"{name}: dtype {tensor.dtype} in the checkpoint, {dest.dtype} expected")
    dest.copy_(tensor)
