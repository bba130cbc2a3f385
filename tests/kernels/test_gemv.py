"""decoding::gemv and decoding::gemv_silu_mul (CUDA) against decoding.reference.linear_ref / linear_silu_mul_ref.

Tolerances: the kernel and the reference both sum fp32 products of the same 16-bit inputs and round once
to the 16-bit type; only the summation order differs (relative ~1e-6), so results differ by at most one
rounding step when a sum lands near a rounding boundary: rtol 2**-7 (one bf16 ulp is 2**-8..2**-7 of
the value). The fused activation rounds gate, up, silu and the product as the unfused ops do, so a flip
in gate or up can move the result by up to ~2 ulps: rtol 2**-6. atol covers values near zero.
"""

from __future__ import annotations

import pytest
import torch

from decoding import ops
from decoding.reference import linear_ref, linear_silu_mul_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.bfloat16, torch.float16]
# (N, K): the 8B and 1B decode projections, a vocab-sized LM head, and odd sizes (tail rows, short K).
SHAPES = [(6144, 4096), (4096, 14336), (3072, 2048), (2048, 8192), (128256, 2048), (1000, 72), (37, 8)]


def _has_gemv() -> bool:
    return ops.select("linear", "cuda") == "cuda"


needs_ext = pytest.mark.skipif(not torch.cuda.is_available() or not _has_gemv(), reason="needs the CUDA extension")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gemv_matches_reference(shape, m, dtype):
    n, k = shape
    torch.manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype) if n % 2 else None
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    torch.ops.decoding.gemv(out, x, w, bias)
    torch.testing.assert_close(out.float(), linear_ref(x, w, bias).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(14336, 4096), (8192, 2048), (1536, 576), (13, 16)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gemv_silu_mul_matches_reference(shape, m, dtype):
    inter, k = shape
    torch.manual_seed(inter + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(2 * inter, k, device="cuda") * k ** -0.5).to(dtype)
    out = torch.empty(m, inter, device="cuda", dtype=dtype)
    torch.ops.decoding.gemv_silu_mul(out, x, w)
    torch.testing.assert_close(out.float(), linear_silu_mul_ref(x, w).float(), rtol=2**-6, atol=1e-3)


@pytest.mark.gpu
@needs_ext
def test_gemv_strided_rows_and_fallbacks():
    """x may be a row-strided view (e.g. one slice of a wider buffer); ops.linear sends shapes the kernel
    does not take (more rows than ops.GEMV_MAX_ROWS, K not a multiple of 8, fp32) to F.linear."""
    torch.manual_seed(0)
    buf = torch.randn(4, 3072, device="cuda", dtype=torch.bfloat16)
    x = buf[:, :2048]
    w = (torch.randn(512, 2048, device="cuda") * 0.02).to(torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, w).float(), linear_ref(x, w).float(), rtol=2**-7, atol=1e-3)
    for xx, ww in [(torch.randn(ops.GEMV_MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16), w[:, :64]),
                   (torch.randn(2, 60, device="cuda", dtype=torch.bfloat16), w[:, :60].contiguous()),
                   (torch.randn(2, 64, device="cuda"), w[:, :64].float())]:
        torch.testing.assert_close(ops.linear(xx, ww), torch.nn.functional.linear(xx, ww))


@pytest.mark.gpu
@needs_ext
def test_gemv_rejects_bad_arguments():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="1..8 rows"):
        torch.ops.decoding.gemv(torch.empty(9, 32, device="cuda", dtype=torch.bfloat16),
                                torch.randn(9, 64, device="cuda", dtype=torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.decoding.gemv(torch.empty(2, 32, device="cuda", dtype=torch.bfloat16), x, w[:, :32], None)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.decoding.gemv(torch.empty(2, 32, device="cuda"), x.float(), w.float(), None)
    with pytest.raises(RuntimeError, match="rows, expected"):
        torch.ops.decoding.gemv_silu_mul(torch.empty(2, 15, device="cuda", dtype=torch.bfloat16), x, w[:31])


def test_cpu_linear_ops_are_torch_and_the_reference():
    """On CPU the ops are F.linear and the unfused activation; the fp32 references agree with them."""
    torch.manual_seed(1)
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    assert ops.select("linear", "cpu") == "reference"
    torch.testing.assert_close(ops.linear(x, w, b), linear_ref(x, w, b))
    torch.testing.assert_close(ops.linear_silu_mul(x, w), linear_silu_mul_ref(x, w))
