"""decoding::gemv and decoding::gemv_silu_mul (CUDA) against decoding.reference.linear_ref / linear_silu_mul_ref.

Tolerances: the kernel and the reference both sum fp32 products of the same 16-bit inputs and round once
to the 16-bit type; only the summation order differs (relative ~1e-6), so results differ by at most one
rounding step when a sum lands near a rounding boundary: rtol 2**-7 (one bf16 ulp is 2**-8..2**-7 of
the value). The fused activation rounds gate, up, silu and the product as the unfused ops do, so a flip
in gate or up can move the result by up to ~2 ulps: rtol 2**-6. atol covers values near zero. The same
holds for the split-K kernel (csrc/cuda/gemv.cu), which changes only the order of the fp32 sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import ops
from decoding.reference import linear_ref, linear_silu_mul_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.bfloat16, torch.float16]
# (N, K): the 8B and 1B decode projections, a vocab-sized LM head, and odd sizes (tail rows, short K).
SHAPES = [(6144, 4096), (4096, 14336), (3072, 2048), (2048, 8192), (128256, 2048), (1000, 72), (37, 8)]
# Shapes that take the split-K kernel on an H100 (its grid of ceil(N / R) blocks is under 12 per SM), at
# every M except the 1B o projection (M <= 2 only): an odd N (the last block's second row is a tail),
# K / 8 = 257 and 375 chunks (not a multiple of the 64-256 threads of a block, so some threads do one more
# round than others), and a long K with few rows (256 threads, 8 warps' partials).
SPLIT_SHAPES = [(255, 2056), (1000, 3000), (64, 16384), (2048, 2048)]


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
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", range(1, 9))
def test_gemv_split_matches_reference(shape, m, dtype, bias):
    """Split-K shapes at every M; even M reads x and writes out through row-strided views. Two calls give
    identical bits: the block's partial sums are added in a fixed order, with no atomics."""
    n, k = shape
    torch.manual_seed(n + k + m)
    pad = 8 * (m % 2 == 0)
    x = torch.randn(m, k + 3 * pad, device="cuda", dtype=dtype)[:, :k]
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    out = torch.empty(m, n + pad, device="cuda", dtype=dtype)[:, :n]
    torch.ops.decoding.gemv(out, x, w, b)
    torch.testing.assert_close(out.float(), linear_ref(x, w, b).float(), rtol=2**-7, atol=1e-3)
    again = torch.empty_like(out)
    torch.ops.decoding.gemv(again, x, w, b)
    assert torch.equal(again, out)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(14336, 4096), (8192, 2048), (1536, 576), (13, 16), (255, 2056), (1000, 3000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gemv_silu_mul_matches_reference(shape, m, dtype):
    inter, k = shape
    torch.manual_seed(inter + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = (torch.randn(2 * inter, k, device="cuda") * k ** -0.5).to(dtype)
    out = torch.empty(m, inter, device="cuda", dtype=dtype)
    torch.ops.decoding.gemv_silu_mul(out, x, w)
    torch.testing.assert_close(out.float(), linear_silu_mul_ref(x, w).float(), rtol=2**-6, atol=1e-3)


# Run under each DECODING_GEMV_SPLIT setting (read once per process, hence a subprocess): every case must
# match the reference, and the profiler names which kernel ran.
_SWITCH_SCRIPT = """
import json, torch
import decoding.ops  # loads decoding._C: registers the ops
from decoding.reference import linear_ref, linear_silu_mul_ref
cases = {"small": (255, 2056, 1, False), "big": (6144, 4096, 1, False), "tiny": (37, 8, 3, False),
         "glu_small": (255, 2056, 2, True), "glu_tiny": (13, 16, 4, True)}
report = {}
for name, (n, k, m, glu) in cases.items():
    torch.manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2 * n if glu else n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    b = None if glu else torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if glu:
            torch.ops.decoding.gemv_silu_mul(out, x, w)
        else:
            torch.ops.decoding.gemv(out, x, w, b)
        torch.cuda.synchronize()
    ref = linear_silu_mul_ref(x, w) if glu else linear_ref(x, w, b)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-6 if glu else 2**-7, atol=1e-3)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    report[name] = sorted({"split" if "gemv_split_kernel" in s else "rows" for s in names if "gemv" in s})
print(json.dumps(report))
"""


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("mode", ["default", "0", "force", "256"])
def test_gemv_split_switch(mode):
    """Default: the split kernel for the small matrices only; DECODING_GEMV_SPLIT=0: never; =force (or a
    block size): everywhere (also for K = 8 and 16, where most of a block's threads have no chunk)."""
    env = {key: value for key, value in os.environ.items() if key != "DECODING_GEMV_SPLIT"}
    if mode != "default":
        env["DECODING_GEMV_SPLIT"] = mode
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _SWITCH_SCRIPT], check=False, cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    split = {"default": {"small", "glu_small"}, "0": set()}.get(mode, set(report))
    assert report == {name: ["split" if name in split else "rows"] for name in report}, report


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


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("glu", [False, True], ids=["gemv", "silu_mul"])
@pytest.mark.parametrize("shape", [(2048, 2048), (3072, 2048), (255, 2056), (6144, 4096), (1536, 576)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_rows_do_not_depend_on_the_batch(shape, glu):
    """Each row of x gets the same bits at every M (1..8): the kernel and its summation order follow the
    weight's shape only. A decode graph padded to its bucket then gives what the unpadded step gives."""
    n, k = shape
    torch.manual_seed(n + k)
    x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2 * n if glu else n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    op = torch.ops.decoding.gemv_silu_mul if glu else (lambda o, a, b: torch.ops.decoding.gemv(o, a, b, None))
    alone = torch.empty(8, n, device="cuda", dtype=torch.bfloat16)
    for i in range(8):
        op(alone[i:i + 1], x[i:i + 1], w)
    for m in range(2, 9):
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        op(out, x[:m], w)
        assert torch.equal(out, alone[:m]), f"M={m}"
