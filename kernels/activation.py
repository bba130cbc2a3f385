"""SiLU-and-mul (the MLP activation) in Triton, registered as `decoding::silu_and_mul_triton`.

x [num_tokens, 2 * intermediate] holds gate | up; out [num_tokens, intermediate] = silu(gate) * up. One
pass: x is read once and out written once (3 elements of traffic an output, against 5 for the reference's
two elementwise kernels and their intermediate). A 2-D grid, rows by column blocks, so every size from a
17-token step to a 2048-token prefill has enough programs; each thread moves 16 bytes of gate and of up.

Numerics as `decoding.reference.silu_and_mul_ref` (F.silu(gate) * up): silu in fp32 as torch's CUDA kernel
writes it, x / (1 + exp(-x)), rounded to the dtype; the product of that and up in fp32, rounded again. On
a GPU the exp is libdevice's expf (`__nv_expf`, the code nvcc inlines for `expf`) and the division IEEE
(div_rn), the functions torch's kernel uses, so the results should match it bit for bit (not yet run on a
GPU: tests/kernels/test_activation.py::test_exact_gpu says). Two details of the compiled code (PTX for
sm_90, read without a GPU): expf ends in a multiply by 2^j, which LLVM contracts with the `1 +` into one
FMA, as nvcc's default --fmad=true (and ptxas, for a plain mul.f32 then add.f32) does in torch's kernel;
the fp32 product of two 16-bit values becomes a native bf16x2 / f16x2 multiply, the same single rounding
of the exact product (bf16 differs only for products below 2^-126, which fp32 rounds twice).
tl.exp (ex2.approx of a rounded scaled argument) and `/` (div.full) differ in the last fp32 bits, which
bf16/fp16 rounding turns into 1-2 ulp differences on a few elements: PRECISE=False, for the benchmark's
comparison. The interpreter has no libdevice and always runs that form; it also truncates fp32 -> bf16
instead of rounding to nearest.

Set TRITON_INTERPRET=1 before importing this module to run on CPU tensors: `triton.jit` picks the
interpreter when it decorates the kernels, i.e. at import time.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns a program: 4 warps x 32 threads x 8 elements, one 16-byte load of bf16 gate (and of up) a thread.
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(out_ptr, out_stride, x_ptr, x_stride, inter, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * x_stride
    dtype = out_ptr.dtype.element_ty
    # Read once: evict_first leaves L2 to out, which the down projection reads next.
    gate = tl.load(x_row + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if PRECISE:
        silu = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate))
    else:
        silu = gate / (1.0 + tl.exp(-gate))
    # 16-bit silu times 16-bit up is exact in fp32, so the one rounding is the reference's (fp32: its product).
    out = (silu.to(dtype).to(tl.float32) * up).to(dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def _launch_config(inter: int) -> dict:
    block = min(triton.next_power_of_2(inter), _BLOCK)
    # 8 elements a thread at full blocks (4 warps); 1 warp for rows of at most 256 columns.
    return {"BLOCK": block, "num_warps": min(max(block // 256, 1), 4)}


def _launch(
    out: torch.Tensor,
    x: torch.Tensor,
    block: int,
    num_warps: int,
    precise: bool,
    wrap: bool = True,
    fp_fusion: bool = True,
) -> None:
    """out [M, I] <- silu(gate) * up of x [M, 2I] (rows strided, last dim contiguous), M and I > 0.

    wrap=False launches the kernel itself, for callers outside the triton_op (benches, GPU tests): there
    wrap_triton would dispatch every call through its higher-order op (see kernels/w8a8.py).
    fp_fusion=False (direct launches only) compiles without FMA contraction, to compare roundings."""
    inter = out.shape[1]
    grid = (x.shape[0], triton.cdiv(inter, block))
    kernel = wrap_triton(_silu_and_mul_kernel) if wrap else _silu_and_mul_kernel
    options = {} if fp_fusion else {"enable_fp_fusion": False}
    kernel[grid](
        out, out.stride(0), x, x.stride(0), inter, BLOCK=block, PRECISE=precise, num_warps=num_warps, **options
    )


def _check(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"silu_and_mul takes float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs x [..., 2 * intermediate] (gate | up), got shape {tuple(x.shape)}")


@triton_op("decoding::silu_and_mul_triton", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2 * intermediate] = gate | up; returns a new tensor [..., intermediate].

    Parameters
    ----------
    x: float32, bfloat16 or float16; rows may be strided (a view), the last dim must be contiguous or is
       copied. Any number of rows, 0 included.

    Returns
    -------
    out: [..., intermediate], contiguous, in x's dtype.

    Example
    -------
    >>> out = silu_and_mul(torch.randn(256, 2 * 14336, device="cuda", dtype=torch.bfloat16))  # [256, 14336]
    """
    _check(x)
    inter = x.shape[-1] // 2
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # a view whenever the rows have one stride
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        cfg = _launch_config(inter)
        _launch(out, x2, cfg["BLOCK"], cfg["num_warps"], precise=not _INTERPRET)
    return out.view(*x.shape[:-1], inter)


# Explicit fake (see kernels/norm.py: the default cannot trace interpreted kernels).
@silu_and_mul.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
