"""INT8 matmuls in Triton: W8A16 GEMM, W8A8 GEMM with scales fused into the epilogue, per-token
activation quantization, column abs-max for LLM.int8() outlier columns.

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

Rounding is half away from zero, and 127 / amax is an IEEE division (div_rn), so the int8 values are
those of the reference bit for bit.
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _round_half_away(v):
    return tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


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


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr, xo_ptr, wo_ptr, M, N, K, KO,
                      stride_am, stride_om, stride_xom, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                      OUT_INT32: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        y = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if HAS_OUTLIERS:  # LLM.int8(): outlier columns of x times the same (gathered) int8 weight columns
            offs_o = tl.arange(0, BLOCK_O)
            dtype = xo_ptr.dtype.element_ty
            fp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j in range(0, KO, BLOCK_O):
                mask_o = offs_o < KO - j
                xo = tl.load(xo_ptr + offs_m[:, None].to(tl.int64) * stride_xom + (j + offs_o)[None, :],
                             mask=mask_m[:, None] & mask_o[None, :], other=0.0)
                wo = tl.load(wo_ptr + offs_n[:, None].to(tl.int64) * KO + (j + offs_o)[None, :],
                             mask=mask_n[:, None] & mask_o[None, :], other=0)
                if FP32_DOT:
                    fp += tl.dot(xo.to(tl.float32), tl.trans(wo.to(tl.float32)), input_precision="ieee")
                else:
                    fp = tl.dot(xo, tl.trans(wo.to(dtype)), fp)
            y += fp
        y = y * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _quantize_per_token_kernel(x_ptr, stride_xm, mask_ptr, q_ptr, s_ptr, K, HAS_MASK: tl.constexpr,
                               BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if SINGLE:  # the whole row stays in registers between the max and the rounding
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if HAS_MASK:
            x = x * tl.load(mask_ptr + cols, mask=cols < K, other=0.0)
        amax_row = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            xk = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if HAS_MASK:
                xk = xk * tl.load(mask_ptr + cols, mask=cols < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(xk))
        amax_row = tl.max(amax, axis=0)
    nonzero = amax_row > 0
    scale = tl.where(nonzero, tl.math.div_rn(amax_row, 127.0), 1.0)
    inv = tl.where(nonzero, tl.math.div_rn(127.0, tl.where(nonzero, amax_row, 1.0)), 1.0)
    tl.store(s_ptr + row, scale)
    if SINGLE:
        q = tl.minimum(tl.maximum(_round_half_away(x * inv), -127), 127)
        tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=cols < K)
    else:
        for k in range(0, K, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            xk = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            if HAS_MASK:
                xk = xk * tl.load(mask_ptr + cols, mask=cols < K, other=0.0)
            q = tl.minimum(tl.maximum(_round_half_away(xk * inv), -127), 127)
            tl.store(q_ptr + row * K + cols, q.to(tl.int8), mask=cols < K)


@triton.jit
def _count_above(amax_ptr, K, t_bits, BLOCK: tl.constexpr):
    count = 0
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        bits = tl.load(amax_ptr + cols, mask=cols < K, other=0.0).to(tl.int32, bitcast=True)
        count += tl.sum((bits > t_bits).to(tl.int32), axis=0)
    return count


@triton.jit
def _outlier_plan_kernel(amax_ptr, idx_ptr, keep_ptr, mask_ptr, K, KO, threshold_bits, BLOCK: tl.constexpr):
    # One program. Column maxima are non-negative, so they order as their int32 bit patterns: a bisection
    # on the bits finds the smallest cut t >= threshold with at most KO columns above it (the (KO+1)-th
    # largest maximum when more than KO exceed the threshold). Then the columns above t, in column order
    # (a running prefix count), and the 0/1 column mask that keeps them out of the int8 part.
    t_bits = threshold_bits
    if _count_above(amax_ptr, K, threshold_bits, BLOCK) > KO:  # the usual case skips the 31 passes
        lo = threshold_bits
        hi = 0x7F800000  # +inf: nothing is above it
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            ok = _count_above(amax_ptr, K, mid, BLOCK) <= KO
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        t_bits = hi
    count = 0
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        bits = tl.load(amax_ptr + cols, mask=cols < K, other=0.0).to(tl.int32, bitcast=True)
        hit = (bits > t_bits) & (cols < K)
        pos = count + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + pos, cols.to(tl.int64), mask=hit)
        tl.store(keep_ptr + pos, tl.full([BLOCK], 1.0, tl.float32), mask=hit)
        tl.store(mask_ptr + cols, tl.where(hit, 0.0, 1.0), mask=cols < K)
        count += tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def _gather_columns_kernel(x_ptr, stride_xm, idx_ptr, keep_ptr, out_ptr, M, KO, BLOCK_M: tl.constexpr,
                           BLOCK_O: tl.constexpr):
    # out[m, j] = x[m, idx[j]] * keep[j]: the outlier columns' 16-bit activations.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < KO
    cols = tl.load(idx_ptr + offs_o, mask=mask_o, other=0)
    keep = tl.load(keep_ptr + offs_o, mask=mask_o, other=0.0)
    mask = (offs_m < M)[:, None] & mask_o[None, :]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    out = (x.to(tl.float32) * keep[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * KO + offs_o[None, :], out, mask=mask)


@triton.jit
def _column_absmax_kernel(x_ptr, stride_xm, out_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    amax = tl.max(tl.abs(x.to(tl.float32)), axis=0)
    # Non-negative floats order as their int32 bit patterns, so an integer atomic max does it.
    tl.atomic_max(out_ptr + offs_k, amax.to(tl.int32, bitcast=True), mask=offs_k < K)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _gemm_config(M: int, N: int, K: int, int8: bool) -> dict:
    """Tile shapes: tiny ones for the interpreter; on the GPU by M, from the H100 sweeps of
    benches/tune_int8.py (benches/NOTES.md, INT8). For W8A16 past 32 tokens see _SWAPPED_CONFIG."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if not int8:
        # Skinny: 16-token tiles, narrow column blocks and deep K blocks keep enough programs streaming.
        if M <= 16:
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
        if M <= 32:
            return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


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


def _launch_int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      bias: torch.Tensor | None, out: torch.Tensor, x_out: torch.Tensor | None,
                      out_idx: torch.Tensor | None, cfg: dict) -> None:
    (M, K), N = a.shape, b.shape[0]
    has_outliers = x_out is not None and x_out.shape[1] > 0
    # The outlier columns of the weights, gathered once per call into a dense [N, KO] block (a gather
    # inside the kernel would be a scattered byte load per weight in every tile).
    w_out = b.index_select(1, out_idx) if has_outliers else a_scale
    wrap_triton(_int8_gemm_kernel)[_grid(M, N, cfg)](
        a, b, out, a_scale, b_scale, bias if bias is not None else b_scale, x_out if has_outliers else a_scale,
        w_out, M, N, K, x_out.shape[1] if has_outliers else 0, a.stride(0),
        out.stride(0), x_out.stride(0) if has_outliers else 0, HAS_BIAS=bias is not None,
        HAS_OUTLIERS=has_outliers, OUT_INT32=out.dtype == torch.int32,
        FP32_DOT=_INTERPRET or (has_outliers and x_out.dtype == torch.float32),
        BLOCK_O=32 if _INTERPRET else 64, **cfg)


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
        _launch_w8a16(x, qweight, scales, bias, out, _gemm_config(M, N, K, int8=False))
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
    _launch_int8_gemm(a, a_scale, b, b_scale, bias, out, x_out, out_idx, _gemm_config(M, N, K, int8=True))
    return out


@triton_op("decoding::quantize_per_token_triton", mutates_args=())
def quantize_per_token(x: torch.Tensor, col_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [M, K] (times col_mask [K] of 0/1 when given): (q [M, K] int8, scale [M] fp32)."""
    x = _rows(x, "x")
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    # Whole rows in registers up to 8192 columns; longer rows (14336) stream twice in 4096-wide blocks.
    block = min(triton.next_power_of_2(K), 1024 if _INTERPRET else (8192 if K <= 8192 else 4096))
    wrap_triton(_quantize_per_token_kernel)[(M,)](
        x, x.stride(0), col_mask if col_mask is not None else scale, q, scale, K, HAS_MASK=col_mask is not None,
        BLOCK=block, SINGLE=block >= K, num_warps=max(1, min(16, block // 512)))
    return q, scale


@triton_op("decoding::column_absmax_triton", mutates_args=())
def column_absmax(x: torch.Tensor) -> torch.Tensor:
    """max over rows of |x| for x [M, K] -> fp32 [K]."""
    x = _rows(x, "x")
    M, K = x.shape
    out = torch.zeros(K, dtype=torch.int32, device=x.device)
    if M > 0:
        block_m, block_k = (16, 64) if _INTERPRET else (64, 128)
        wrap_triton(_column_absmax_kernel)[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            x, x.stride(0), out, M, K, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return out.view(torch.float32)


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


def outlier_plan(amax: torch.Tensor, threshold: float, ko: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx [ko] int64, keep [ko] bool, col_mask [K] fp32) as `reference.outlier_columns_ref`, from the
    column abs-max, in one launch (threshold > 0)."""
    K = amax.shape[0]
    idx = torch.zeros(ko, dtype=torch.int64, device=amax.device)
    keep = torch.zeros(ko, dtype=torch.float32, device=amax.device)
    col_mask = torch.empty(K, dtype=torch.float32, device=amax.device)
    block = min(triton.next_power_of_2(K), 1024 if _INTERPRET else 4096)
    threshold_bits = struct.unpack("<i", struct.pack("<f", threshold))[0]
    wrap_triton(_outlier_plan_kernel)[(1,)](amax, idx, keep, col_mask, K, ko, threshold_bits, BLOCK=block,
                                            num_warps=4)
    return idx, keep > 0, col_mask


def gather_columns(x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x[:, idx] * keep for x [M, K] -> [M, KO] in x's dtype."""
    M, ko = x.shape[0], idx.shape[0]
    out = torch.empty(M, ko, dtype=x.dtype, device=x.device)
    block_m = 16 if _INTERPRET else 64
    wrap_triton(_gather_columns_kernel)[(triton.cdiv(M, block_m),)](
        x, x.stride(0), idx, keep.to(torch.float32), out, M, ko, BLOCK_M=block_m,
        BLOCK_O=max(16, triton.next_power_of_2(ko)), num_warps=4)
    return out


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float = 6.0, max_outliers: int = 64) -> torch.Tensor:
    """W8A8 linear with LLM.int8()'s outlier decomposition, as `decoding.reference.w8a8_linear_ref`.

    Column abs-max, the outlier plan (the first max_outliers columns over the threshold: a fixed
    number, so no host sync), per-token quantization with those columns zeroed, their 16-bit
    activations gathered, then one GEMM kernel for both the int8 part and the 16-bit outlier part.
    """
    x = _rows(x, "x")
    K = x.shape[1]
    ko = min(max_outliers, K) if threshold > 0 else 0
    if ko == 0:
        q, s = quantize_per_token(x)
        return int8_scaled_mm(q, s, qweight, w_scale, bias, x.dtype)
    idx, keep, col_mask = outlier_plan(column_absmax(x), threshold, ko)
    q, s = quantize_per_token(x, col_mask)
    return int8_scaled_mm(q, s, qweight, w_scale, bias, x.dtype, gather_columns(x, idx, keep), idx)
