"""rms_norm and fused_add_rms_norm_: every available implementation against decoding.reference.

Backends are reached through ops.py with DECODING_BACKEND forced, which also exercises dispatch. On CPU
that is the C++ kernel ("cpu") and, under TRITON_INTERPRET=1 (tests/conftest.py), the Triton kernels;
on a GPU the CUDA kernel and compiled Triton.
"""

import os

import pytest
import torch

from decoding import ops
from decoding.reference import fused_add_rms_norm_ref, rms_norm_ref

# Triton 3.6's interpreter turns a 1-element array into a loop bound with int(), which numpy deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

NUM_TOKENS = [1, 7, 33]
HIDDEN = [64, 576, 769, 4096]
GPU_NUM_TOKENS = [1, 7, 33, 1024]
GPU_HIDDEN = [64, 576, 769, 4096, 8192, 16384]  # 16384 > Triton's _MAX_BLOCK: the streamed path
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6

# fp32: only the reduction order and rsqrt vs 1/sqrt differ (a few fp32 ulps) -> 1e-5.
# bf16/fp16: the output is round(w * round(x * inv_rms)); an ulp of difference in inv_rms can flip the
# inner rounding, and the flipped product then rounds again, so allow 2 ulps relative (bf16: 2 * 2^-7,
# fp16: 2 * 2^-10) plus an atol for values near zero. The Triton interpreter truncates fp32 -> bf16
# instead of rounding to nearest: up to 1 ulp at each of the three bf16 roundings (residual, normed,
# product), hence 3 ulps for interpreted bf16.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 1e-3},
}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRETED_BF16_TOL = {"rtol": 2.4e-2, "atol": 1e-2}


def _tol(backend: str, dtype: torch.dtype) -> dict:
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        return INTERPRETED_BF16_TOL
    return TOL[dtype]


def _backends(device: str) -> list[str]:
    device_type = torch.device(device).type
    return [b for b in ops._IMPLS["rms_norm"] if b != "reference" and device_type in ops._DEVICES[b]]


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype=dtype, device=device)
    residual = torch.randn(num_tokens, hidden, generator=g).to(dtype=dtype, device=device)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype=dtype, device=device)
    return x, residual, weight


def _check_rms_norm(monkeypatch, backend: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    monkeypatch.setenv("DECODING_BACKEND", backend)
    assert ops.select("rms_norm", x.device) == backend
    expected = rms_norm_ref(x, weight, EPS)
    out = ops.rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, **_tol(backend, x.dtype))
    if x.dtype != torch.float32 and not (backend == "triton" and INTERPRETED):
        # Same roundings in the same order as the reference: nearly every element is bit-identical.
        assert (out == expected).float().mean().item() > 0.99


def _check_fused(monkeypatch, backend: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    monkeypatch.setenv("DECODING_BACKEND", backend)
    assert ops.select("fused_add_rms_norm_", x.device) == backend
    x_ref, res_ref = x.clone(), residual.clone()
    fused_add_rms_norm_ref(x_ref, res_ref, weight, EPS)  # reference first: the kernel works in place
    ops.fused_add_rms_norm_(x, residual, weight, EPS)
    if backend == "triton" and INTERPRETED and x.dtype == torch.bfloat16:
        torch.testing.assert_close(residual, res_ref, rtol=2**-7, atol=0)  # truncated, 1 ulp
    else:
        torch.testing.assert_close(residual, res_ref, rtol=0, atol=0)  # one rounded add: exact
    torch.testing.assert_close(x, x_ref, **_tol(backend, x.dtype))


CPU_BACKENDS = _backends("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_cpu(monkeypatch, backend, dtype, hidden, num_tokens):
    x, _, weight = _inputs(num_tokens, hidden, dtype, "cpu")
    _check_rms_norm(monkeypatch, backend, x, weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_add_rms_norm_cpu(monkeypatch, backend, dtype, hidden, num_tokens):
    x, residual, weight = _inputs(num_tokens, hidden, dtype, "cpu")
    _check_fused(monkeypatch, backend, x, residual, weight)


def _strided(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x's values in a wider buffer: rows one stride apart, starting `offset` elements in (misaligned if odd)."""
    num_tokens, hidden = x.shape
    buf = torch.zeros(num_tokens, hidden + 2 * offset + 3, dtype=x.dtype, device=x.device)
    view = buf[:, offset : offset + hidden]
    view.copy_(x)
    return view


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_strided_cpu(monkeypatch, backend, dtype, offset):
    x, residual, weight = _inputs(5, 576, dtype, "cpu")
    xs, rs = _strided(x, offset), _strided(residual, offset)
    assert not xs.is_contiguous()
    _check_rms_norm(monkeypatch, backend, xs, weight)
    _check_fused(monkeypatch, backend, xs, rs, weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_rows_and_3d_cpu(monkeypatch, backend):
    # hidden 9000 > Triton's _MAX_BLOCK takes its streamed path; [2, 3, hidden] flattens leading dims.
    x, residual, weight = _inputs(2, 9000, torch.bfloat16, "cpu")
    _check_rms_norm(monkeypatch, backend, x, weight)
    _check_fused(monkeypatch, backend, x, residual, weight)
    x3, r3, w3 = _inputs(6, 64, torch.float32, "cpu")
    _check_fused(monkeypatch, backend, x3.view(2, 3, 64), r3.view(2, 3, 64), w3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", GPU_HIDDEN)
@pytest.mark.parametrize("num_tokens", GPU_NUM_TOKENS)
def test_norms_gpu(monkeypatch, backend, dtype, hidden, num_tokens):
    if backend not in _backends("cuda"):
        pytest.skip(f"{backend} backend not available: {ops.describe()}")
    x, residual, weight = _inputs(num_tokens, hidden, dtype, "cuda")
    _check_rms_norm(monkeypatch, backend, x, weight)
    _check_fused(monkeypatch, backend, x, residual, weight)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1])  # 1: rows misaligned for 16-byte loads, the scalar CUDA path
def test_strided_gpu(monkeypatch, backend, dtype, offset):
    if backend not in _backends("cuda"):
        pytest.skip(f"{backend} backend not available")
    x, residual, weight = _inputs(33, 4096, dtype, "cuda")
    xs, rs = _strided(x, offset), _strided(residual, offset)
    _check_rms_norm(monkeypatch, backend, xs, weight)
    _check_fused(monkeypatch, backend, xs, rs, weight)


# opcheck: schema, fake kernel, and that the op neither lies about mutations nor aliases outputs.
def _opcheck_devices() -> list[str]:
    devices = []
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if ops.extension_error() is None and ops._has_kernel("rms_norm", key):
            devices.append(device)
    return devices


@pytest.mark.parametrize("device", _opcheck_devices() or ["none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_extension(device, dtype):
    if device == "none":
        pytest.skip(f"decoding._C has no kernels: {ops.extension_error()}")
    x, residual, weight = _inputs(7, 576, dtype, device)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.decoding.rms_norm.default, (out, x, weight, EPS))
    torch.library.opcheck(torch.ops.decoding.fused_add_rms_norm.default, (x, residual, weight, EPS))


def test_opcheck_triton():
    if "triton" not in ops._IMPLS["rms_norm"]:
        pytest.skip(f"triton unavailable: {ops.describe()['triton']['error']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, residual, weight = _inputs(3, 64, torch.float32, device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if INTERPRETED:
        # AOT dispatch decomposes a triton_op into its Python body on fake tensors; wrap_triton can
        # only trace compiled kernels, so the interpreter would run on fake data. Checked on the GPU.
        tests = tests[:-1]
    torch.library.opcheck(torch.ops.decoding.rms_norm_triton.default, (x, weight, EPS), test_utils=tests)
    torch.library.opcheck(
        torch.ops.decoding.fused_add_rms_norm_triton.default, (x, residual, weight, EPS), test_utils=tests
    )


def test_extension_rejects_bad_inputs():
    if "cpu" not in ops._IMPLS["rms_norm"]:
        pytest.skip(f"decoding._C not loaded: {ops.extension_error()}")
    x, residual, weight = _inputs(4, 64, torch.float32, "cpu")
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="weight dtype"):
        torch.ops.decoding.rms_norm(out, x, weight.half(), EPS)
    with pytest.raises(RuntimeError, match="last dim"):
        torch.ops.decoding.rms_norm(out, torch.randn(64, 4).t(), weight, EPS)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.decoding.rms_norm(out.double(), x.double(), weight.double(), EPS)
    with pytest.raises(RuntimeError, match="residual shape"):
        torch.ops.decoding.fused_add_rms_norm(x, residual[:2], weight, EPS)
