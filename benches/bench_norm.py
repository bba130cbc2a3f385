"""rms_norm / fused_add_rms_norm_ per backend on the GPU, reported as achieved memory bandwidth.

    pytest benches/bench_norm.py --benchmark-columns=median,ops --benchmark-group-by=param:shape

Each round launches the op REPS times back to back and synchronises once, so launch gaps count but one
host sync is spread over REPS calls. GB/s (bytes moved / median time per call) lands in extra_info.
Skips without CUDA; not collected by a plain `pytest` (testpaths = tests).
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from decoding import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPS = 100
# (num_tokens, hidden): decode batch 1 and 32 at Llama-3-8B and 3.2-1B widths, then a 4096-token prefill.
SHAPES = [(1, 4096), (32, 4096), (1, 2048), (32, 2048), (4096, 4096)]
BACKENDS = ["cuda", "triton", "reference"]


def _bench(benchmark, fn, bytes_per_call: int) -> None:
    def run() -> None:
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    seconds_per_call = benchmark.stats.stats.median / REPS
    benchmark.extra_info["us_per_call"] = seconds_per_call * 1e6
    benchmark.extra_info["GB/s"] = bytes_per_call / seconds_per_call / 1e9


def _impl(op: str, backend: str):
    if backend not in ops._IMPLS[op] or "cuda" not in ops._DEVICES.get(backend, {"cuda"}):
        pytest.skip(f"{backend} not available for {op}: {ops.describe()}")
    return ops._IMPLS[op][backend]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rms_norm(benchmark, backend, shape):
    impl = _impl("rms_norm", backend)
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(shape[1], dtype=torch.bfloat16, device="cuda")
    _bench(benchmark, lambda: impl(x, w, 1e-6), (2 * x.numel() + w.numel()) * x.element_size())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_add_rms_norm(benchmark, backend, shape):
    impl = _impl("fused_add_rms_norm_", backend)
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    residual = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(shape[1], dtype=torch.bfloat16, device="cuda")
    # Reads x and residual, writes both back, reads the weight.
    _bench(benchmark, lambda: impl(x, residual, w, 1e-6), (4 * x.numel() + w.numel()) * x.element_size())
