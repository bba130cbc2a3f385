"""RMSNorm and fused add + RMSNorm in Triton, registered as `decoding::rms_norm_triton` and
`decoding::fused_add_rms_norm_triton` (the C++ schemas own the plain names).

One program per row. Rows up to `_MAX_BLOCK` elements stay in registers between the sum of squares
and the scaling; longer rows are streamed twice. Numerics as `decoding.reference` (HF): the residual
add is rounded to the dtype, the norm runs in fp32, x * rsqrt(mean(x^2) + eps) is rounded to the
dtype and then multiplied by the weight (a 16-bit product is exact in fp32, so one final rounding).

Set TRITON_INTERPRET=1 before importing this module to run on CPU tensors: `triton.jit` picks the
interpreter when it decorates the kernels, i.e. at import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# Largest row kept whole in registers: 8192 fp32 values over 16 warps is 16 registers a thread.
_MAX_BLOCK = 8192


@triton.jit
def _scale(x, w, inv_rms, dtype: tl.constexpr):
    normed = (x * inv_rms).to(dtype)
    return (normed.to(tl.float32) * w.to(tl.float32)).to(dtype)


@triton.jit
def _rms_norm_kernel(
    out_ptr, out_stride, x_ptr, x_stride, w_ptr, hidden, eps, BLOCK: tl.constexpr, SINGLE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    dtype = out_ptr.dtype.element_ty
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_row + cols, _scale(x, w, inv_rms, dtype), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            acc += x * x
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            tl.store(out_row + cols, _scale(x, w, inv_rms, dtype), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, x_stride, res_ptr, res_stride, w_ptr, hidden, eps, BLOCK: tl.constexpr, SINGLE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    dtype = x_ptr.dtype.element_ty
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
        r = (x + r).to(dtype)
        tl.store(res_row + cols, r, mask=mask)
        r = r.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(r * r, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(x_row + cols, _scale(r, w, inv_rms, dtype), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            r = (x + r).to(dtype)
            tl.store(res_row + cols, r, mask=mask)
            r = r.to(tl.float32)
            acc += r * r
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
        # Each program rereads only the residual elements it stored itself, so no barrier is needed.
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            tl.store(x_row + cols, _scale(r, w, inv_rms, dtype), mask=mask)


def _launch_config(hidden: int) -> dict:
    block = min(triton.next_power_of_2(hidden), _MAX_BLOCK)
    # ~16 bytes of bf16 per thread at full rows: 4096 -> 16 warps, 1024 -> 4, <= 256 -> 1.
    num_warps = min(max(block // 256, 1), 16)
    return {"BLOCK": block, "SINGLE": block >= hidden, "num_warps": num_warps}


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t [..., hidden] as [num_tokens, hidden] without copying; rows may be strided."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    return t.view(-1, t.shape[-1])


@triton_op("decoding::rms_norm_triton", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., hidden] times weight [hidden] (x's dtype); returns a new contiguous tensor.

    Example
    -------
    >>> y = rms_norm(torch.randn(7, 64, device="cuda"), torch.ones(64, device="cuda"), 1e-6)
    """
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # a view whenever the rows have one stride
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        wrap_triton(_rms_norm_kernel)[(x2.shape[0],)](
            out, out.stride(0), x2, x2.stride(0), weight.contiguous(), hidden, eps, **_launch_config(hidden)
        )
    return out.view(x.shape)


@triton_op("decoding::fused_add_rms_norm_triton", mutates_args=("x", "residual"))
def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- x + residual; x <- rms_norm(residual) * weight.

    x, residual: [..., hidden] of one dtype, last dim contiguous; weight: [hidden].

    Example
    -------
    >>> fused_add_rms_norm_(x, residual, weight, 1e-6)  # x now holds the normed sum, residual the sum
    """
    hidden = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    x2, r2 = _rows(x, "x"), _rows(residual, "residual")
    if x2.numel() > 0:
        wrap_triton(_fused_add_rms_norm_kernel)[(x2.shape[0],)](
            x2, x2.stride(0), r2, r2.stride(0), weight.contiguous(), hidden, eps, **_launch_config(hidden)
        )


# Explicit fakes instead of triton_op's default (tracing the wrapper above under FakeTensorMode): the
# default cannot run when the kernels are interpreted, since wrap_triton then returns the
# InterpretedFunction itself, which would execute on fake tensors.
@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@fused_add_rms_norm_.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    return None
