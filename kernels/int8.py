"""INT8 matmuls in Triton: W8A16 GEMM, and the registered W8A8 ops (their kernels are in kernels/w8a8.py).

Registered as `decoding::<name>_triton` ops (their references are in `decoding.reference`):
- `w8a16_linear`: out = x @ (qweight * scales)^T + bias; int8 weights converted to x's dtype in
  registers (exact: |q| <= 127), fp32 accumulation; per-output-channel scales applied once at the end,
  group-wise scales per K block.
- `int8_scaled_mm`: out = b_scale * (a_scale * (a @ b^T) + x_out @ b[:, out_idx]^T) + bias. The int8
  product accumulates in int32 on the tensor cores; the optional second product is LLM.int8()'s
  16-bit path for outlier columns, run in the same kernel on the gathered int8 weight columns (exact in
  16 bits), so the per-channel weight scale multiplies both parts once.
- `quantize_per_token`: symmetric int8 per row, optionally with some columns zeroed (outliers).
- `column_absmax`: max |x| per column over all rows (atomic max on the fp32 bit pattern).
`w8a8_linear` (the whole LLM.int8() linear, not a registered op) is `w8a8.w8a8_linear`.

Rounding is half away from zero, and 127 / amax is an IEEE division (div_rn), so the int8 values are
those of the reference bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import w8a8
from .w8a8 import _tile_coords
from .w8a8 import w8a8_linear  # noqa: F401  (ops.py's triton w8a8_linear)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # This program's tile in w8a8's grouped ordering (GROUP_M row-tiles share each column tile in L2).
    return _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)


@triton.jit
def _w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, group_size,
                       HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        if FP32_DOT:  # fp32 inputs, and the interpreter (whose 16-bit dot is wrong): exact fp32 products
            part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif GROUPED:
            part = tl.dot(x, tl.trans(w.to(dtype)))
        else:
            acc = tl.dot(x, tl.trans(w.to(dtype)), acc)
        if GROUPED:  # BLOCK_K divides group_size: one scale per row of this block
            s = tl.load(s_ptr + offs_n.to(tl.int64) * (K // group_size) + k // group_size, mask=mask_n, other=0.0)
            acc += part * s[None, :]
        elif FP32_DOT:
            acc += part
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not GROUPED:
        acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8a16_gemm_swapped_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                               HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # out^T = W @ x^T: the converted int8 weights are the left operand, which Hopper's wgmma may take
    # from registers, so x^T streams from shared memory untouched (per-output-channel scales only).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        xt = tl.load(x_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        if FP32_DOT:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(w.to(dtype), xt, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    ptrs = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    q = tl.load(q_ptr + ptrs, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    tl.store(out_ptr + ptrs, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _gemm_config(M: int) -> dict:
    """W8A16 tiles up to 32 tokens: tiny ones for the interpreter; on the GPU by M, from the H100 sweeps of
    benches/tune_int8.py (benches/NOTES.md, INT8). Past 32 tokens see _swapped_config."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    # Skinny: 16-token tiles, narrow column blocks and deep K blocks keep enough programs streaming.
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)


def _swapped_config(M: int) -> dict:
    """W8A16 at 33..256 tokens (weights as the left operand); interpreter: small tiles."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


# Past this many tokens W8A16 dequantizes the weights (one pass, 3 bytes a weight) and runs cuBLAS: on the
# H100 that beat every Triton mixed-precision tile at 512 and 2048 tokens (benches/NOTES.md, INT8).
DEQUANT_MIN_TOKENS = 256


def _grid(M: int, N: int, cfg: dict) -> tuple[int]:
    return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)


def _launch_w8a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor, cfg: dict) -> None:
    (M, K), N = x.shape, qweight.shape[0]
    cfg = dict(cfg)
    grouped = scales.dim() == 2
    group_size = K // scales.shape[1] if grouped else K
    if grouped:  # one scale per K block: the largest power-of-2 block that divides the group
        while group_size % cfg["BLOCK_K"] and cfg["BLOCK_K"] > 16:
            cfg["BLOCK_K"] //= 2
    wrap_triton(_w8a16_gemm_kernel)[_grid(M, N, cfg)](
        x, qweight, scales, bias if bias is not None else scales, out, M, N, K, x.stride(0), out.stride(0),
        group_size, HAS_BIAS=bias is not None, GROUPED=grouped, FP32_DOT=_INTERPRET or x.dtype == torch.float32,
        **cfg)


def _launch_w8a16_swapped(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None, out: torch.Tensor, cfg: dict) -> None:
    (M, K), N = x.shape, qweight.shape[0]
    wrap_triton(_w8a16_gemm_swapped_kernel)[_grid(M, N, cfg)](
        x, qweight, scales, bias if bias is not None else scales, out, M, N, K, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, FP32_DOT=_INTERPRET or x.dtype == torch.float32, **cfg)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight [N, K] int8 * per-channel scales [N] -> [N, K] of dtype, in one pass."""
    N, K = qweight.shape
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_n, block_k = (16, 32) if _INTERPRET else (32, 256)
    wrap_triton(_dequantize_kernel)[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        qweight, scales, out, N, K, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


@triton_op("decoding::w8a16_linear_triton", mutates_args=())
def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (qweight [N, K] int8 * scales)^T + bias -> [M, N] in x's dtype.

    scales: fp32 [N] (per output channel) or [N, K // group_size] (group-wise).

    Example
    -------
    >>> y = w8a16_linear(x, q, s)   # x: [7, 4096] bf16, q: [6144, 4096] int8, s: [6144] fp32
    """
    x = _rows(x, "x")
    M, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if M > DEQUANT_MIN_TOKENS and scales.dim() == 1 and not _INTERPRET and x.dtype != torch.float32:
        # Numerics: each dequantized weight is rounded to x's dtype before cuBLAS's fp32-accumulated product.
        return torch.nn.functional.linear(x, dequantize(qweight, scales, x.dtype), bias)
    if M > 32 and scales.dim() == 1:
        _launch_w8a16_swapped(x, qweight, scales, bias, out, _swapped_config(M))
    else:
        _launch_w8a16(x, qweight, scales, bias, out, _gemm_config(M))
    return out


@triton_op("decoding::int8_scaled_mm_triton", mutates_args=())
def int8_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype, x_out: torch.Tensor | None = None,
                   out_idx: torch.Tensor | None = None) -> torch.Tensor:
    """b_scale * (a_scale * (a @ b^T) + x_out @ b[:, out_idx]^T) + bias -> [M, N] of out_dtype.

    a: [M, K] int8, a_scale: [M] fp32, b: [N, K] int8 (contiguous), b_scale: [N] fp32; x_out: [M, KO]
    16-bit activations of the outlier columns (zero where a column is not an outlier), out_idx: [KO]
    their column indices. out_dtype=torch.int32 returns the raw int32 accumulators of a @ b^T.
    """
    a = _rows(a, "a")
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    has_outliers = x_out is not None and x_out.shape[1] > 0
    # The outlier columns of the weights, gathered once per call into a dense [N, KO] block (a gather
    # inside the kernel would be a scattered byte load per weight in every tile).
    w_out = b.index_select(1, out_idx) if has_outliers else None
    w8a8.launch_int8_gemm(a, a_scale, b, b_scale, bias, out, x_out if has_outliers else None, w_out)
    return out


@triton_op("decoding::quantize_per_token_triton", mutates_args=())
def quantize_per_token(x: torch.Tensor, col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [M, K] (times col_mask [K] of 0/1 when given): (q [M, K] int8, scale [M] fp32)."""
    x = _rows(x, "x")
    keep = None if col_mask is None else (col_mask != 0).to(torch.int8)
    q, scale, _, _ = w8a8.quantize(x, keep)
    return q, scale


@triton_op("decoding::column_absmax_triton", mutates_args=())
def column_absmax(x: torch.Tensor) -> torch.Tensor:
    """max over rows of |x| for x [M, K] -> fp32 [K]."""
    x = _rows(x, "x")
    return w8a8.absmax_plan(x, 0.0, 1, plan=False)[0]


# Explicit fakes (see kernels/norm.py: the default cannot trace interpreted kernels).
@w8a16_linear.register_fake
def _(x, qweight, scales, bias=None):
    return x.new_empty(x.shape[0], qweight.shape[0])


@int8_scaled_mm.register_fake
def _(a, a_scale, b, b_scale, bias, out_dtype, x_out=None, out_idx=None):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@quantize_per_token.register_fake
def _(x, col_mask=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@column_absmax.register_fake
def _(x):
    return x.new_empty(x.shape[1], dtype=torch.float32)
