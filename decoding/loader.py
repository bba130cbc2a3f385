"""Checkpoint directory (or GGUF file) -> ModelConfig, weights in a LlamaModel, Tokenizer.

safetensors and GGUF only: nothing here ever unpickles. Checkpoint keys are remapped in one
place (`_target`) onto the fused qkv / gate_up layout of decoding.models.llama.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from decoding import quant
from decoding.config import ModelConfig
from decoding.errors import CheckpointError
from decoding.models.llama import LlamaModel
from decoding.quant import QuantConfig
from decoding.tokenizer import Tokenizer

if TYPE_CHECKING:
    from decoding.parallel import TensorParallel

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF per-layer name -> (our parameter under layers.{i}., which part of its rows: index into the split)
_LAYER_MAP = {
    "self_attn.q_proj": ("attn.qkv", 0),
    "self_attn.k_proj": ("attn.qkv", 1),
    "self_attn.v_proj": ("attn.qkv", 2),
    "self_attn.o_proj": ("attn.o", None),
    "mlp.gate_proj": ("mlp.gate_up", 0),
    "mlp.up_proj": ("mlp.gate_up", 1),
    "mlp.down_proj": ("mlp.down", None),
    "input_layernorm": ("input_norm", None),
    "post_attention_layernorm": ("post_attn_norm", None),
}
# Checkpoint tensors that hold nothing we need (recomputed buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _row_splits(config: ModelConfig, param: str) -> list[int]:
    if param == "attn.qkv":
        return [config.q_size, config.kv_size, config.kv_size]
    return [config.intermediate_size, config.intermediate_size]


def _target(config: ModelConfig, hf_name: str) -> tuple[str, int | None] | None:
    """Our parameter name and which part of its fused rows (None: all) one HF tensor fills; None to ignore."""
    if _IGNORED.match(hf_name):
        return None
    if hf_name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if hf_name == "model.norm.weight":
        return "norm.weight", None
    if hf_name == "lm_head.weight":
        return (None if config.tie_word_embeddings else ("lm_head.weight", None))
    m = _LAYER_KEY.fullmatch(hf_name)
    if m is None:
        raise CheckpointError(f"unexpected tensor {hf_name!r} in checkpoint (not a Llama-family weight)")
    layer, rest = m.groups()
    module, _, kind = rest.rpartition(".")
    if module not in _LAYER_MAP or kind not in ("weight", "bias"):
        raise CheckpointError(f"unexpected tensor {hf_name!r} in checkpoint (not a Llama-family weight)")
    param, part = _LAYER_MAP[module]
    return f"layers.{layer}.{param}.{kind}", part


def _rows(config: ModelConfig, name: str, part: int | None) -> slice | None:
    """The rows of our fused parameter `name` that its `part` (q|k|v, gate|up) occupies, for `config`."""
    if part is None:
        return None
    splits = _row_splits(config, name.split(".", 2)[2].rpartition(".")[0])
    start = sum(splits[:part])
    return slice(start, start + splits[part])


def load_weights(model: LlamaModel, tensors: Iterator[tuple[str, torch.Tensor]], total: int | None = None,
                 progress: bool = False) -> None:
    """Copy HF-named checkpoint tensors into `model` (cast to its dtype and device).

    A tensor-parallel model (model.tp set, see decoding.parallel) takes only its rank's shard of each
    tensor. Raises CheckpointError for an unknown name, a shape mismatch, or any parameter left unfilled.
    """
    params = dict(model.named_parameters())
    filled: dict[str, int] = {name: 0 for name in params}
    config = model.config if model.tp is None else model.tp.config  # checkpoint shapes are the whole model's
    if model.tp is not None:
        with torch.device("meta"):
            full_params = dict(LlamaModel(config).named_parameters())
    bar = tqdm(tensors, total=total, desc="Loading weights", unit="tensor", disable=not progress)
    with torch.no_grad():
        for hf_name, tensor in bar:
            target = _target(config, hf_name)
            if target is None:
                continue
            name, part = target
            if name not in params:
                raise CheckpointError(f"checkpoint tensor {hf_name!r} has no place in this config ({name})")
            shape = tuple(tensor.shape)
            if model.tp is not None:
                full = full_params[name] if part is None else full_params[name][_rows(config, name, part)]
                if shape != tuple(full.shape):
                    raise CheckpointError(
                        f"{hf_name}: shape {shape} in the checkpoint, {tuple(full.shape)} expected by config")
                from decoding.parallel import shard_tensor

                tensor = shard_tensor(config, name, part, tensor, model.tp.rank, model.tp.world_size)
            rows = _rows(model.config, name, part)
            dest = params[name] if rows is None else params[name][rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise CheckpointError(
                    f"{hf_name}: shape {shape} in the checkpoint, {tuple(dest.shape)} expected by config")
            dest.copy_(tensor)
            filled[name] += dest.shape[0] if dest.dim() else 1
    missing = [n for n, p in params.items() if filled[n] < (p.shape[0] if p.dim() else 1)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing weights for: {shown}")


def random_tensors(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                   seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named random weights for `config` (N(0, 0.02), norms 1, biases 0), one tensor at a time.

    Each tensor is drawn whole from its own seed (from `seed` and its name), so every rank of a
    tensor-parallel model slices its shard out of the same values as a single-GPU model gets.
    """
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."
        for proj, (rows, cols) in {"self_attn.q_proj": (c.q_size, c.hidden_size),
                                   "self_attn.k_proj": (c.kv_size, c.hidden_size),
                                   "self_attn.v_proj": (c.kv_size, c.hidden_size),
                                   "self_attn.o_proj": (c.hidden_size, c.q_size),
                                   "mlp.gate_proj": (c.intermediate_size, c.hidden_size),
                                   "mlp.up_proj": (c.intermediate_size, c.hidden_size),
                                   "mlp.down_proj": (c.hidden_size, c.intermediate_size)}.items():
            shapes[f"{pre}{proj}.weight"] = (rows, cols)
            if (c.attention_bias and proj[-6:] in ("q_proj", "k_proj", "v_proj")) or (c.mlp_bias and "mlp" in proj):
                shapes[f"{pre}{proj}.bias"] = (rows,)
        shapes[f"{pre}input_layernorm.weight"] = shapes[f"{pre}post_attention_layernorm.weight"] = (c.hidden_size,)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device, dtype=dtype)
        elif name.endswith("bias"):
            yield name, torch.zeros(shape, device=device, dtype=dtype)
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            yield name, torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)


def build_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                tp: TensorParallel | None = None) -> LlamaModel:
    """An uninitialised LlamaModel on `device` (built on meta first: no wasted init of big matrices).

    With `tp`, this rank's shard: its heads, MLP columns and vocabulary slice (decoding.parallel).
    """
    with torch.device("meta"):
        if tp is None:
            model = LlamaModel(config)
        else:
            from decoding.parallel import parallelize, shard_config

            model = LlamaModel(shard_config(config, tp.world_size))
            parallelize(model, tp, config)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy of the weights
    model.init_buffers()  # the RoPE table stays fp32
    return model.eval().requires_grad_(False)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise CheckpointError(f"{index.name} names shard(s) missing from {path}: {', '.join(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in path.glob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded; convert to safetensors)" if pickles else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f}: {e}") from e


def _count_safetensors(files: list[Path]) -> int:
    from safetensors import SafetensorError, safe_open

    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                total += len(st.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f}: {e}") from e
    return total


def load(path: str | Path | None, device: torch.device | str, dtype: torch.dtype,
         progress: bool = False, tp: TensorParallel | None = None,
         quantize: str | QuantConfig | None = None) -> tuple[LlamaModel, Tokenizer]:
    """Load a HF checkpoint directory, a .gguf file (or a directory holding one), or the embedded model (None).

    With `tp`, only this rank's shard of the weights is kept (decoding.parallel). quantize: "int8" |
    "w8a8" | "w8a8-smooth" | a QuantConfig quantizes the projections on load (decoding.quant), after
    sharding; "w8a8-smooth" first calibrates on decoding.smoothquant.calibration_text(). A
    directory written by `quant.save_quantized` loads as the quantized model it holds; asking for
    another quantization of it is an error.
    """
    if isinstance(quantize, str):
        quantize = QuantConfig(quantize)
    if path is None:
        from decoding.gguf import embedded_gguf_path

        path = embedded_gguf_path()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    gguf_file = path if path.is_file() else None
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            gguf_file = found[0]
    if gguf_file is not None:
        if gguf_file.suffix != ".gguf":
            raise CheckpointError(f"{gguf_file} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        from decoding.gguf import load_gguf

        ckpt = load_gguf(gguf_file, progress=progress)
        config = ModelConfig.from_hf(ckpt.hf_config)
        model = build_model(config, device, dtype, tp)
        load_weights(model, iter(ckpt.tensors.items()), total=len(ckpt.tensors), progress=progress)
        tokenizer = Tokenizer.from_gguf(ckpt, config)
        return _quantize(model, quantize, progress, tokenizer), tokenizer

    config = ModelConfig.from_file(path / "config.json")
    files = _safetensors_files(path)
    tokenizer = Tokenizer.from_dir(path, config)
    marker = quant.checkpoint_marker(files)
    if marker is not None:
        if tp is not None:
            raise CheckpointError(f"{path} is a quantized checkpoint; tensor parallelism loads unquantized "
                                  "checkpoints (and can quantize them on load)")
        model = quant.load_quantized(config, files, marker, device, dtype, progress=progress)
        if quantize is not None and quantize.mode != model.quant.mode:
            raise CheckpointError(f"{path} is already quantized as {model.quant.mode!r}; it cannot be loaded "
                                  f"as {quantize.mode!r}")
        return model, tokenizer
    model = build_model(config, device, dtype, tp)
    load_weights(model, _iter_safetensors(files), total=_count_safetensors(files), progress=progress)
    return _quantize(model, quantize, progress, tokenizer), tokenizer


def _quantize(model: LlamaModel, quantize: QuantConfig | None, progress: bool, tokenizer: Tokenizer) -> LlamaModel:
    if quantize is None:
        return model
    calibration, name = None, ""
    if quantize.mode == "w8a8-smooth":  # SmoothQuant's scales come from the model's activations on real text
        from decoding import smoothquant

        calibration = smoothquant.calibration_windows(tokenizer, quantize.calibration_tokens)
        tokens = sum(len(w) for w in calibration)
        name = f"{smoothquant.CALIBRATION_SOURCE}, {len(calibration)} windows, {tokens} tokens"
    return quant.quantize_model(model, quantize, progress=progress, calibration=calibration, calibration_name=name)
