"""The one place that picks an implementation per op: compiled extension, Triton, or reference.

`DECODING_BACKEND=reference|triton|cuda|cpu` forces a backend for every op that has it (the
others keep their default); unset, each call takes the fastest available for its tensors' device.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from decoding import reference

BACKENDS = ("reference", "triton", "cuda", "cpu")

# op name -> {backend name -> implementation}; fast backends add themselves below when importable.
_IMPLS: dict[str, dict[str, Callable]] = {
    "rms_norm": {"reference": reference.rms_norm_ref},
    "fused_add_rms_norm_": {"reference": reference.fused_add_rms_norm_ref},
    "rotary_embedding_": {"reference": reference.rotary_embedding_ref},
    "reshape_and_cache_": {"reference": reference.reshape_and_cache_ref},
    "paged_attention": {"reference": reference.paged_attention_ref},
    "silu_and_mul": {"reference": reference.silu_and_mul_ref},
}
# Preference order per device type when no backend is forced.
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def forced_backend() -> str | None:
    name = os.environ.get("DECODING_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DECODING_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def select(op: str, device: torch.device | str) -> str:
    """The backend name that `op` uses for tensors on `device`."""
    impls = _IMPLS[op]
    forced = forced_backend()
    if forced is not None and forced in impls:
        return forced
    for name in _PREFERENCE.get(torch.device(device).type, ("reference",)):
        if name in impls:
            return name
    return "reference"


def active_backends(device: torch.device | str) -> dict[str, str]:
    """{op: backend} for `device`, as `python -m decoding info` prints it."""
    return {op: select(op, device) for op in _IMPLS}


def _call(op: str, device: torch.device) -> Callable:
    return _IMPLS[op][select(op, device)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [num_tokens, hidden_size] times weight [hidden_size]; returns a new tensor."""
    return _call("rms_norm", x.device)(x, weight, eps)


def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- x + residual; x <- rms_norm(residual) * weight."""
    _call("fused_add_rms_norm_", x.device)(x, residual, weight, eps)


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In place RoPE on q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim]."""
    _call("rotary_embedding_", q.device)(positions, q, k, cos_sin_cache)


def reshape_and_cache_(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into the paged caches at slot_mapping."""
    _call("reshape_and_cache_", k.device)(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the new tokens over the paged cache (see reference.paged_attention_ref)."""
    return _call("paged_attention", q.device)(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] (gate | up) -> silu(gate) * up."""
    return _call("silu_and_mul", x.device)(x)
