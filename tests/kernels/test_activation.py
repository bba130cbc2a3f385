"""silu_and_mul: the Triton kernel (kernels/activation.py) against decoding.reference.silu_and_mul_ref.

Reached through ops.py with DECODING_BACKEND=triton, which also exercises dispatch: on CPU the interpreted
kernel (TRITON_INTERPRET=1, tests/conftest.py) at small shapes, on a GPU the compiled one at the Llama-3
8B / 3.2-1B intermediate sizes. Differences are counted in ulps of the output dtype.

What holds, and is asserted:
- GPU, every dtype: bit-identical. The kernel computes silu with libdevice's expf and an IEEE division,
  the functions torch's CUDA silu uses, rounds it to the dtype as torch stores it, and multiplies in fp32
  (exact for two 16-bit values) with the one rounding of torch's mul. test_exact_gpu prints the counts.
- CPU, interpreted: the interpreter has no libdevice (tl.exp is numpy's float32 exp, measured within
  2.5 ulps of exact) and torch's CPU silu has its own exp (within 2.3 ulps): fp32 within 8 ulps. Where
  the two fp32 silus straddle a rounding boundary of the dtype, the 16-bit silu differs by an ulp, and so
  the product by up to 2 (silu's ulp can be twice the product's, relatively): rare, at most 2 ulps.
  The interpreter truncates fp32 -> bf16 instead of rounding to nearest, so interpreted bf16 is compared
  with a reference that truncates at the same two places (a kernel missing the intermediate rounding
  would differ on about half of the elements).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from decoding import ops
from decoding.reference import silu_and_mul_ref

# Triton 3.6's interpreter turns a 1-element array into a loop bound with int(), which numpy deprecates.
# numpy warns when the interpreter's exp overflows to inf on the SPECIALS, as it should.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (num_tokens, intermediate): odd and small widths, one under a block, several blocks with a partial last one.
SHAPES = [(1, 72), (7, 40), (3, 1536), (2, 2500)]
# Interpreted CPU bounds in ulps of the dtype (see the docstring).
CPU_MAX_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}
GPU_NUM_TOKENS = [1, 17, 256, 2048]
GPU_INTER = [14336, 8192]  # Llama-3-8B, Llama-3.2-1B
# Gate values at the edges of silu: exp(-g) overflowing (g < -88.7), flushed to a subnormal or zero, 0, -0.
SPECIALS = [-1e4, -104.0, -89.0, -88.0, -20.0, -1e-3, -0.0, 0.0, 1e-3, 20.0, 88.0, 89.0, 104.0, 1e4]


def _triton_available() -> None:
    if "triton" not in ops._IMPLS["silu_and_mul"]:
        pytest.skip(f"triton unavailable: {ops.describe()['triton']['error']}")


def _inputs(num_tokens: int, inter: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """x [num_tokens, 2 * inter] = gate | up, gate ~ N(0, 3^2) with SPECIALS at the start of row 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 2 * inter, generator=g)
    x[:, :inter] *= 3
    if num_tokens > 0:
        n = min(len(SPECIALS), inter)
        x[0, :n] = torch.tensor(SPECIALS[:n])
    return x.to(dtype=dtype, device=device)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns as integers in the floats' order (+0 and -0 both 0): ulp distances are differences."""
    bits = t.view(torch.int32 if t.element_size() == 4 else torch.int16).to(torch.int64)
    magnitude = bits & (2 ** (8 * t.element_size() - 1) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _ulps(out: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    return (_ordered(out) - _ordered(expected)).abs()


def _truncate_bf16(t: torch.Tensor) -> torch.Tensor:
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _reference_truncating(x: torch.Tensor) -> torch.Tensor:
    """silu_and_mul_ref with the interpreter's fp32 -> bf16 truncation at both of its roundings."""
    gate, up = x.float().chunk(2, dim=-1)
    return _truncate_bf16(_truncate_bf16(F.silu(gate)).float() * up)


def _expected(x: torch.Tensor) -> torch.Tensor:
    if INTERPRETED and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return _reference_truncating(x)
    return silu_and_mul_ref(x)


def _run(monkeypatch, x: torch.Tensor) -> torch.Tensor:
    monkeypatch.setenv("DECODING_BACKEND", "triton")
    assert ops.select("silu_and_mul", x.device) == "triton"
    out = ops.silu_and_mul(x)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], x.shape[-1] // 2) and out.is_contiguous()
    return out


def _check_cpu(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ulps = _ulps(out, _expected(x))
    assert ulps.max().item() <= CPU_MAX_ULPS[x.dtype], f"max {ulps.max().item()} ulps"
    if x.dtype != torch.float32:  # a handful of flips at most (test_rare_differences_cpu bounds the rate)
        assert (ulps > 0).float().mean().item() <= 0.05, f"{(ulps > 0).sum().item()} of {ulps.numel()} differ"
    return ulps


# ----------------------------------------------------------------------------- CPU (interpreted)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_silu_and_mul_cpu(monkeypatch, dtype, shape):
    _triton_available()
    x = _inputs(*shape, dtype, "cpu")
    _check_cpu(_run(monkeypatch, x), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rare_differences_cpu(monkeypatch, dtype):
    """The interpreted 16-bit results differ from the reference on a tiny fraction of elements."""
    _triton_available()
    x = _inputs(64, 1536, dtype, "cpu", seed=1)
    ulps = _check_cpu(_run(monkeypatch, x), x)
    mismatches = (ulps > 0).sum().item()
    print(f"\n{dtype} interpreted: {mismatches} of {ulps.numel()} elements differ, max {ulps.max().item()} ulps")
    assert mismatches <= ulps.numel() // 1000


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1])  # 1: rows start one element off 16-byte alignment
def test_strided_rows_cpu(monkeypatch, dtype, offset):
    _triton_available()
    x = _inputs(5, 72, dtype, "cpu")
    buf = torch.zeros(5, 144 + offset + 5, dtype=dtype)
    view = buf[:, offset : offset + 144]
    view.copy_(x)
    assert not view.is_contiguous()
    # Same values, same kernel: the strided launch must give the contiguous one's bits exactly.
    assert torch.equal(_run(monkeypatch, view), _run(monkeypatch, x))
    _check_cpu(_run(monkeypatch, view), x)


def test_shapes_cpu(monkeypatch):
    _triton_available()
    x = _inputs(6, 40, torch.float32, "cpu")
    flat = _run(monkeypatch, x)
    assert torch.equal(_run(monkeypatch, x.view(2, 3, 80)), flat.view(2, 3, 40))  # leading dims flatten
    assert torch.equal(_run(monkeypatch, x.t().contiguous().t()), flat)  # last dim strided: copied first
    for empty in (torch.empty(0, 80), torch.empty(3, 0), torch.empty(2, 0, 80)):
        out = _run(monkeypatch, empty)
        assert out.numel() == 0 and out.shape == silu_and_mul_ref(empty).shape


def test_bad_inputs():
    _triton_available()
    from decoding.kernels import activation

    with pytest.raises(ValueError, match="2 \\* intermediate"):
        activation.silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        activation.silu_and_mul(torch.randn(3, 8, dtype=torch.float64))


def test_dispatch(monkeypatch):
    monkeypatch.delenv("DECODING_BACKEND", raising=False)
    assert ops.select("silu_and_mul", "cpu") == "reference"  # interpreted Triton only when forced
    _triton_available()
    assert ops.select("silu_and_mul", "cuda") == "triton"  # no CUDA kernel of its own: Triton on every GPU
    assert ops.describe()["backends"]["cuda"]["silu_and_mul"] == "triton"


def test_opcheck_triton_silu_and_mul():
    """Schema, fake kernel, no mutation or aliasing lies (AOT dispatch on the GPU only: under the
    interpreter wrap_triton would run the kernel on fake tensors)."""
    _triton_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if INTERPRETED:
        tests = tests[:-1]
    for x in (_inputs(3, 40, torch.float32, device), _inputs(4, 72, torch.bfloat16, device)[:, :100]):
        torch.library.opcheck(torch.ops.decoding.silu_and_mul_triton.default, (x,), test_utils=tests)


# ----------------------------------------------------------------------------- GPU
def _gpu_backend() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _triton_available()


def _assert_exact(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    ulps = _ulps(out, silu_and_mul_ref(x))
    mismatches = (ulps > 0).sum().item()
    print(f"\n{what}: {mismatches} of {ulps.numel()} elements differ from the reference, max {ulps.max().item()} ulps")
    assert mismatches == 0, f"{what}: {mismatches} elements differ, max {ulps.max().item()} ulps"


@pytest.mark.gpu
@pytest.mark.parametrize("inter", GPU_INTER)
@pytest.mark.parametrize("num_tokens", GPU_NUM_TOKENS)
def test_exact_gpu(monkeypatch, num_tokens, inter):
    _gpu_backend()
    monkeypatch.delenv("DECODING_BACKEND", raising=False)
    x = _inputs(num_tokens, inter, torch.bfloat16, "cuda")
    assert ops.select("silu_and_mul", x.device) == "triton"  # the default on CUDA, unforced
    _assert_exact(ops.silu_and_mul(x), x, f"bf16 {num_tokens}x{inter}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("inter", GPU_INTER + [1536, 72])
def test_exact_dtypes_gpu(monkeypatch, dtype, inter):
    _gpu_backend()
    x = _inputs(256, inter, dtype, "cuda")
    _assert_exact(_run(monkeypatch, x), x, f"{dtype} 256x{inter}")


# Compiled variants that are not the default, for the record: (PRECISE, enable_fp_fusion).
VARIANTS = {"tl.exp and div.full": (False, True), "libdevice without FMA contraction": (True, False)}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_variants_gpu(dtype, variant):
    """How far the other compiled forms of silu are from torch's, printed (the default is asserted exact
    above); at most the 2 ulps of one flipped silu rounding."""
    _gpu_backend()
    from decoding.kernels import activation

    precise, fp_fusion = VARIANTS[variant]
    x = _inputs(2048, 14336, dtype, "cuda")
    out = torch.empty(2048, 14336, dtype=dtype, device="cuda")
    activation._launch(out, x, 1024, 4, precise, wrap=False, fp_fusion=fp_fusion)
    ulps = _ulps(out, silu_and_mul_ref(x))
    print(f"\n{variant}, {dtype}: {(ulps > 0).sum().item()} of {ulps.numel()} differ, max {ulps.max().item()} ulps")
    assert ulps.max().item() <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned rows, no 16-byte vector loads
def test_strided_rows_gpu(monkeypatch, dtype, offset):
    _gpu_backend()
    x = _inputs(33, 14336, dtype, "cuda")
    buf = torch.zeros(33, 2 * 14336 + 64 + offset, dtype=dtype, device="cuda")
    view = buf[:, offset : offset + 2 * 14336]
    view.copy_(x)
    out = _run(monkeypatch, view)
    assert torch.equal(out, _run(monkeypatch, x))
    _assert_exact(out, view, f"{dtype} strided offset {offset}")


@pytest.mark.gpu
def test_empty_gpu(monkeypatch):
    _gpu_backend()
    assert _run(monkeypatch, torch.empty(0, 2 * 14336, dtype=torch.bfloat16, device="cuda")).shape == (0, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [17, 256])
def test_cuda_graph_gpu(num_tokens):
    """Captured once, replayed on new values in the same buffer (as the runner's mixed-step graphs do)."""
    _gpu_backend()
    x = _inputs(num_tokens, 14336, torch.bfloat16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.silu_and_mul(x)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.silu_and_mul(x)
    x.copy_(_inputs(num_tokens, 14336, torch.bfloat16, "cuda", seed=7))
    graph.replay()
    torch.cuda.synchronize()
    _assert_exact(out, x, f"graph replay {num_tokens}x14336")
