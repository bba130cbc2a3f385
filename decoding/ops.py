"""The one place that picks an implementation per op: compiled extension, Triton, or reference.

`DECODING_BACKEND=reference|triton|cuda|cpu` forces a backend for every op that has it and that can
run on the tensors' device (the others keep their default); unset, each call takes the fastest
available for its tensors' device. Interpreted Triton (TRITON_INTERPRET=1) only runs when forced.

The compiled extension `decoding._C` registers `torch.ops.decoding.*` on import. When it is missing
or broken the reference still works; `extension_error()` says why it did not load.
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
    "paged_attention": {"reference": reference.paged_attention_ref},
    # The rows' split (decode_lens, gather_rows, scatter_rows) only matters to the fast kernels.
    "paged_mixed_attention": {"reference": lambda q, kc, vc, bt, lens, starts, scale, window, bound, *split:
                              reference.paged_attention_ref(q, kc, vc, bt, lens, starts, scale, window, bound)},
    "silu_and_mul": {"reference": reference.silu_and_mul_ref},
    "rope_and_cache_": {"reference": reference.rope_and_cache_ref},
    # The linear layers' reference is torch's own F.linear (cuBLAS on GPU); reference.linear_ref is the
    # fp32 yardstick the kernel tests compare with.
    "linear": {"reference": torch.nn.functional.linear},
    "linear_silu_mul": {"reference": lambda x, w: reference.silu_and_mul_ref(torch.nn.functional.linear(x, w))},
    "sample_tokens": {"reference": lambda logits, state: _sampler().sample_tokens_ref(logits, state)},
    "w8a16_linear": {"reference": reference.w8a16_linear_ref},
    "w8a16_linear_silu_mul": {"reference": reference.w8a16_linear_silu_mul_ref},
    "w8a8_linear": {"reference": reference.w8a8_linear_ref},
    "quantize_per_token": {"reference": reference.quantize_per_token_ref},
    "column_absmax": {"reference": reference.column_absmax_ref},
    "int8_scaled_mm": {"reference": reference.int8_scaled_mm_ref},
}
# Preference order per device type when no backend is forced.
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Device types each backend can run on (reference: any); triton adds "cpu" when interpreted.
_DEVICES: dict[str, set[str]] = {"cuda": {"cuda"}, "cpu": {"cpu"}, "triton": {"cuda"}}


def _load_extension() -> str | None:
    """Imports decoding._C (registering its ops); returns why it failed, or None."""
    try:
        import decoding._C  # noqa: F401
    except (ImportError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _load_triton() -> tuple[object | None, str | None]:
    """(decoding.kernels.norm, None) when Triton can run here, else (None, why not)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (interpret or torch.cuda.is_available()):
        return None, "no CUDA device and TRITON_INTERPRET is not 1"
    try:
        from decoding.kernels import norm
    except (ImportError, RuntimeError) as e:  # RuntimeError: triton present but no usable driver
        return None, f"{type(e).__name__}: {e}"
    if interpret:
        _DEVICES["triton"] = {"cuda", "cpu"}
    return norm, None


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"decoding::{op}", dispatch_key)
    except RuntimeError:  # the schema is missing: an extension built from older sources
        return False


def _ext_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.decoding.rms_norm(out, x, weight, eps)
    return out


def _ext_fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    torch.ops.decoding.fused_add_rms_norm(x, residual, weight, eps)


# Rows of activations up to which decoding::gemv / gemv_silu_mul beat cuBLAS on the Llama-3 8B and 1B
# projections (benches/bench_gemv.py, H100: at M = 4 and 8 cuBLAS's tensor-core kernels win, except for
# the fused gate/up at M = 4). The kernels themselves take up to 8 rows.
GEMV_MAX_ROWS = 2
GEMV_SILU_MUL_MAX_ROWS = 4


def _gemv_ok(x: torch.Tensor, weight: torch.Tensor, max_rows: int = GEMV_MAX_ROWS) -> bool:
    """Whether decoding::gemv takes these operands (else the caller uses F.linear)."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= max_rows and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.shape[1] % 8 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0
            and weight.is_contiguous() and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def _ext_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if not _gemv_ok(x, weight):
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.decoding.gemv(out, x, weight, bias)
    return out


def _ext_linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not _gemv_ok(x, weight, GEMV_SILU_MUL_MAX_ROWS):
        return silu_and_mul(torch.nn.functional.linear(x, weight))
    out = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    torch.ops.decoding.gemv_silu_mul(out, x, weight)
    return out


def _ext_rope_and_cache_(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping) -> None:
    torch.ops.decoding.rope_and_cache(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)




# The CUDA GEMV's limits (csrc/int8_checks.h); other calls of the cuda backend take the tensor-core path.
_GEMV_MAX_TOKENS = 16
_GEMV_CHUNK = 16
# Past this many tokens the Triton GEMM on tensor cores beats the GEMV's fp32 FMAs (H100 sweep,
# benches/NOTES.md, INT8); the GEMV still serves up to _GEMV_MAX_TOKENS when Triton is missing.
_GEMV_PREFERRED_TOKENS = 3


def _w8a16_many_tokens(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """W8A16 past the GEMV's reach on CUDA: the Triton GEMM, else dequantize + cuBLAS."""
    triton_impl = _IMPLS["w8a16_linear"].get("triton")
    if triton_impl is not None:
        return triton_impl(x, qweight, scales, bias)
    from decoding.quant import dequantize_weight

    return torch.nn.functional.linear(x, dequantize_weight(qweight, scales).to(x.dtype), bias)


def _w8a16_gemv_ok(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the CUDA W8A16 GEMV serves this call (else the tensor-core path does)."""
    num_tokens, k = x.shape
    group = k // scales.shape[1] if scales.dim() == 2 else k
    most = _GEMV_PREFERRED_TOKENS if "triton" in _IMPLS["w8a16_linear"] else _GEMV_MAX_TOKENS
    return (1 <= num_tokens <= most and x.dtype in (torch.bfloat16, torch.float16)
            and k % _GEMV_CHUNK == 0 and group % _GEMV_CHUNK == 0)


def _gemv_rows(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy when its rows are not 16-byte aligned as the GEMV reads them."""
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        return x.contiguous()
    return x


def _ext_w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    if not _w8a16_gemv_ok(x, scales):
        return _w8a16_many_tokens(x, qweight, scales, bias)
    x = _gemv_rows(x)
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.decoding.w8a16_gemv(out, x, qweight, scales, bias)
    return out


def _ext_w8a16_linear_silu_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if not _w8a16_gemv_ok(x, scales):
        return silu_and_mul(_w8a16_many_tokens(x, qweight, scales, None))
    x = _gemv_rows(x)
    out = torch.empty(x.shape[0], qweight.shape[0] // 2, dtype=x.dtype, device=x.device)
    torch.ops.decoding.w8a16_gemv_silu_mul(out, x, qweight, scales)
    return out


def _register_extension() -> None:
    # The same torch.ops entry serves both backends (the dispatcher picks the kernel by device), so a
    # backend is claimed only for the dispatch keys the build really has: a CPU-only build claims no "cuda".
    for op, schema, impl in (("rms_norm", "rms_norm", _ext_rms_norm),
                             ("fused_add_rms_norm_", "fused_add_rms_norm", _ext_fused_add_rms_norm_),
                             ("linear", "gemv", _ext_linear),
                             ("linear_silu_mul", "gemv_silu_mul", _ext_linear_silu_mul),
                             ("rope_and_cache_", "rope_and_cache", _ext_rope_and_cache_)):
        for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if _has_kernel(schema, key):
                _IMPLS[op][backend] = impl

    if _has_kernel("w8a16_gemv", "CUDA"):
        _IMPLS["w8a16_linear"]["cuda"] = _ext_w8a16_linear
    if _has_kernel("w8a16_gemv_silu_mul", "CUDA"):
        _IMPLS["w8a16_linear_silu_mul"]["cuda"] = _ext_w8a16_linear_silu_mul

    # Fake (meta) kernels: these ops only write their Tensor! arguments, so tracing needs no outputs.
    @torch.library.register_fake("decoding::rms_norm")
    def _(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
        return None

    @torch.library.register_fake("decoding::fused_add_rms_norm")
    def _(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
        return None

    def _w8a16_fake(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None) -> None:
        return None

    def _w8a16_silu_mul_fake(out: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        return None

    for schema, fake in (("w8a16_gemv", _w8a16_fake), ("w8a16_gemv_silu_mul", _w8a16_silu_mul_fake)):
        try:
            torch.library.register_fake(f"decoding::{schema}")(fake)
        except RuntimeError:  # an extension built from older sources has no such schema
            pass


_EXTENSION_ERROR = _load_extension()
if _EXTENSION_ERROR is None:
    _register_extension()


def _sampler():
    # Imported on use: decoding.sampling.sampler calls back into this module.
    from decoding.sampling import sampler

    return sampler


_TRITON_NORM, _TRITON_ERROR = _load_triton()
if _TRITON_NORM is not None:
    from decoding.kernels import activation as _triton_activation
    from decoding.kernels import attention as _triton_attention
    from decoding.kernels import sampling as _triton_sampling

    _IMPLS["rms_norm"]["triton"] = _TRITON_NORM.rms_norm
    _IMPLS["fused_add_rms_norm_"]["triton"] = _TRITON_NORM.fused_add_rms_norm_
    # Every token count on CUDA: decode sizes of gate_up mostly run the fused GEMV (linear_silu_mul) instead.
    _IMPLS["silu_and_mul"]["triton"] = _triton_activation.silu_and_mul
    _IMPLS["sample_tokens"]["triton"] = _triton_sampling.sample_tokens_graphed
    _IMPLS["paged_attention"]["triton"] = _triton_attention.paged_attention
    _IMPLS["paged_mixed_attention"]["triton"] = _triton_attention.paged_mixed_attention
    from decoding.kernels import int8 as _triton_int8

    _IMPLS["w8a16_linear"]["triton"] = _triton_int8.w8a16_linear
    _IMPLS["w8a16_linear_silu_mul"]["triton"] = lambda x, q, s: silu_and_mul(_triton_int8.w8a16_linear(x, q, s, None))
    _IMPLS["w8a8_linear"]["triton"] = _triton_int8.w8a8_linear
    _IMPLS["quantize_per_token"]["triton"] = _triton_int8.quantize_per_token
    _IMPLS["column_absmax"]["triton"] = _triton_int8.column_absmax
    _IMPLS["int8_scaled_mm"]["triton"] = _triton_int8.int8_scaled_mm


def extension_error() -> str | None:
    """Why `decoding._C` did not import (e.g. not built, ABI mismatch), or None when it did."""
    return _EXTENSION_ERROR


def describe() -> dict:
    """What `python -m decoding info` reports about the kernels: what loaded, and each op's backend.

    Returns
    -------
    dict with "extension" (loaded, error, cpu, cuda: whether it has kernels for that device),
    "triton" (available, interpreted, error), "forced_backend", and "backends": {"cpu"|"cuda": {op: backend}}.
    """
    loaded = _EXTENSION_ERROR is None
    return {
        "extension": {
            "loaded": loaded,
            "error": _EXTENSION_ERROR,
            "cpu": loaded and _has_kernel("rms_norm", "CPU"),
            "cuda": loaded and _has_kernel("rms_norm", "CUDA"),
        },
        "triton": {
            "available": _TRITON_NORM is not None,
            "interpreted": _TRITON_NORM is not None and "cpu" in _DEVICES["triton"],
            "error": _TRITON_ERROR,
        },
        "forced_backend": forced_backend(),
        "backends": {device: active_backends(device) for device in ("cpu", "cuda")},
    }


def forced_backend() -> str | None:
    name = os.environ.get("DECODING_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DECODING_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def select(op: str, device: torch.device | str) -> str:
    """The backend name that `op` uses for tensors on `device`."""
    impls = _IMPLS[op]
    device_type = torch.device(device).type
    forced = forced_backend()
    if forced is not None and forced in impls and device_type in _DEVICES.get(forced, {device_type}):
        return forced
    for name in _PREFERENCE.get(device_type, ("reference",)):
        if name in impls and device_type in _DEVICES.get(name, {device_type}):
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


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    query_start_loc_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """Causal GQA attention of the new tokens over the paged cache (see reference.paged_attention_ref).

    max_seq_len: a host-side bound on seq_lens (lets the decode kernel size its launch without a sync);
    query_start_loc_cpu, seq_lens_cpu: host copies of those tensors (a mixed step reads them instead of
    syncing with the device)."""
    return _call("paged_attention", q.device)(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, max_seq_len,
        query_start_loc_cpu, seq_lens_cpu
    )


def paged_mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                          sliding_window: int | None, max_seq_len: int, decode_lens: torch.Tensor,
                          gather_rows: torch.Tensor, scatter_rows: torch.Tensor) -> torch.Tensor:
    """paged_attention of a mixed step whose decode/prefill split is given as device tensors (a graphed mixed
    step, see kernels/attention.py paged_mixed_attention); padding tokens and sequences are allowed."""
    return _call("paged_mixed_attention", q.device)(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, max_seq_len,
        decode_lens, gather_rows, scatter_rows)


def sample_tokens(logits: torch.Tensor, state) -> torch.Tensor:
    """One token per row of fp32 logits [B, V] under SamplingState `state`, recorded in it; [B] int64,
    -1 for rows with NaN / +inf / all -inf logits (see decoding.sampling.sampler)."""
    return _call("sample_tokens", logits.device)(logits, state)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] (gate | up) -> silu(gate) * up."""
    return _call("silu_and_mul", x.device)(x)


def rope_and_cache_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """In place RoPE on q and k, then k and v written to the paged caches at slot_mapping (see
    reference.rope_and_cache_ref: rotary_embedding_ref then reshape_and_cache_ref), in one op."""
    _call("rope_and_cache_", q.device)(positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias): a GEMV kernel for a few rows, cuBLAS otherwise."""
    return _call("linear", x.device)(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T), weight = gate rows | up rows [2I, K]."""
    return _call("linear_silu_mul", x.device)(x, weight)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, K] @ (qweight [N, K] int8 * scales)^T + bias -> [num_tokens, N] in x's dtype.

    scales: fp32 [N] per output channel, or [N, K // group_size]. On CUDA, 1..16 tokens run the GEMV.
    """
    return _call("w8a16_linear", x.device)(x, qweight, scales, bias)


def w8a16_linear_silu_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of w8a16_linear(x, qweight, scales), qweight = gate rows | up rows [2I, K] int8.

    -> [num_tokens, I] in x's dtype. On CUDA, decode sizes run one fused GEMV (the MLP's gate/up projection
    and its activation), with the unfused ops' roundings (see reference.w8a16_linear_silu_mul_ref).
    """
    return _call("w8a16_linear_silu_mul", x.device)(x, qweight, scales)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float = 6.0, max_outliers: int = 64) -> torch.Tensor:
    """W8A8 with LLM.int8() outlier columns (see reference.w8a8_linear_ref); [num_tokens, N] in x's dtype."""
    return _call("w8a8_linear", x.device)(x, qweight, w_scale, bias, threshold, max_outliers)


def quantize_per_token(x: torch.Tensor, col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M]); col_mask [K] of 0/1 zeroes columns first."""
    return _call("quantize_per_token", x.device)(x, col_mask)


def column_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| over the rows of x [M, K] -> fp32 [K]."""
    return _call("column_absmax", x.device)(x)


def int8_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype, x_out: torch.Tensor | None = None,
                   out_idx: torch.Tensor | None = None) -> torch.Tensor:
    """b_scale * (a_scale * (a @ b^T) + x_out @ b[:, out_idx]^T) + bias (see reference.int8_scaled_mm_ref)."""
    return _call("int8_scaled_mm", a.device)(a, a_scale, b, b_scale, bias, out_dtype, x_out, out_idx)
