"""Decode-time linear layers: decoding::gemv (and the fused gate/up SiLU GEMV) against cuBLAS (F.linear),
reported as achieved weight bandwidth.

    pytest benches/bench_gemv.py --benchmark-columns=median        # pytest-benchmark suite
    python benches/bench_gemv.py                                   # one table, plus the copy bandwidth

Weights rotate over enough copies to exceed the 50 MB L2, so each call reads its matrix from HBM; each
round launches REPS calls back to back and synchronises once. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from decoding import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPS = 50
# (name, N, K): the Llama-3-8B and 3.2-1B decode projections (gate_up is the fused [2I, K] matrix).
SHAPES = [("8b.qkv", 6144, 4096), ("8b.o", 4096, 4096), ("8b.gate_up", 28672, 4096), ("8b.down", 4096, 14336),
          ("1b.qkv", 3072, 2048), ("1b.o", 2048, 2048), ("1b.gate_up", 16384, 2048), ("1b.down", 2048, 8192),
          ("1b.lm_head", 128256, 2048)]
ROWS = [1, 2, 4, 8]


def _weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(2, -(-(160 << 20) // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def time_per_call(fn, weights: list[torch.Tensor], reps: int = REPS) -> float:
    """Median seconds per call over 10 rounds of `reps` calls rotating through `weights`."""
    times = []
    for r in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fn(weights[i % len(weights)])
        end.record()
        torch.cuda.synchronize()
        if r >= 2:
            times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _fns(kind: str, x: torch.Tensor):
    if kind == "gemv":
        return lambda w: ops._IMPLS["linear"]["cuda"](x, w)
    if kind == "gemv_silu_mul":
        return lambda w: ops._IMPLS["linear_silu_mul"]["cuda"](x, w)
    if kind == "cublas_silu_mul":
        return lambda w: ops.silu_and_mul(torch.nn.functional.linear(x, w))
    return lambda w: torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("kind", ["gemv", "cublas"])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_linear(benchmark, shape, m, kind):
    if kind == "gemv" and "cuda" not in ops._IMPLS["linear"]:
        pytest.skip("extension without CUDA kernels")
    name, n, k = shape
    weights = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fn = _fns(kind, x)
    benchmark.pedantic(lambda: time_per_call(fn, weights, 10), rounds=3, warmup_rounds=1)
    t = time_per_call(fn, weights)
    benchmark.extra_info["us_per_call"] = t * 1e6
    benchmark.extra_info["GB/s"] = n * k * 2 / t / 1e9


def main() -> None:
    from decoding.bench import copy_bandwidth_gbps

    copy = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s; weight GB/s (% of copy), "
          f"ours / cuBLAS")
    for name, n, k in SHAPES:
        weights = _weights(n, k)
        row = []
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            glu = name.endswith("gate_up")
            ours = time_per_call(_fns("gemv_silu_mul" if glu else "gemv", x), weights)
            ref = time_per_call(_fns("cublas_silu_mul" if glu else "cublas", x), weights)
            gb = n * k * 2 / 1e9
            row.append(f"M={m}: {gb / ours:5.0f} ({100 * gb / ours / copy * 1e9 / 1e9:3.0f}%) / {gb / ref:5.0f}")
        print(f"  {name:<12} " + "  ".join(row))


if __name__ == "__main__":
    main()
