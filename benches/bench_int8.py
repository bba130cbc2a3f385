"""INT8 matmuls against bf16 cuBLAS (F.linear) on the GPU, on the Llama-3-8B and Llama-3.2-1B projection
shapes, each ratio measured in the same run.

    pytest benches/bench_int8.py --benchmark-columns=median --benchmark-json=b.json
    python benches/bench_int8.py --summary b.json      # the table, and the per-layer ratios

- test_w8a16_decode: `ops.w8a16_linear` (cuda backend) at 1 token (the CUDA GEMV) and 16 (Triton).
- test_w8a16_prefill: W8A16 at 2048 tokens (one-pass dequantize + cuBLAS past 256 tokens).
- test_w8a8_prefill: the whole W8A8 linear (column abs-max, outlier top-k, per-token quantization, int8
  GEMM with fused scales and the 16-bit outlier part) at 2048 tokens, three outlier columns present.
Weights rotate past the L2 inside a CUDA graph (benches/int8_timing.py); pytest-benchmark times the
int8 graph's replays, and extra_info holds us per call, GB/s (bytes of weights, scales, activations and
outputs over the time) and the speed-up over bf16 timed the same way. Skips without CUDA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_timing import capture_rotating, copies_for, random_int8_weights, random_weights, time_rotating  # noqa: E402

SHAPES = {"8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
          "1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]}
CASES = [(model, n, k) for model, shapes in SHAPES.items() for n, k in shapes]


def _bench_graph(benchmark, calls, bf16_s: float, nbytes: int) -> None:
    graph = capture_rotating(calls)

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, warmup_rounds=3)
    seconds = benchmark.stats.stats.median / len(calls)
    benchmark.extra_info.update(us_per_call=seconds * 1e6, bf16_us=bf16_s * 1e6, speedup=bf16_s / seconds,
                                GBps=nbytes / seconds / 1e9)


def _bf16(m: int, n: int, k: int) -> float:
    ws = random_weights(n, k, copies_for(2 * n * k))
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in ws]
    return time_rotating([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])


if "pytest" in sys.modules:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("model,n,k", CASES, ids=[f"{m}-{n}x{k}" for m, n, k in CASES])
def test_w8a16_decode(benchmark, model, n, k, m):
    from decoding import ops

    if ops.select("w8a16_linear", "cuda") != "cuda":
        pytest.skip(f"no CUDA GEMV: {ops.describe()}")
    benchmark.group = f"w8a16 m={m}"
    bf16_s = _bf16(m, n, k)
    weights = random_int8_weights(n, k, copies_for(n * k))
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in weights]
    calls = [lambda q=q, s=s, x=x: ops.w8a16_linear(x, q, s) for (q, s), x in zip(weights, xs)]
    _bench_graph(benchmark, calls, bf16_s, n * k + 4 * n + 2 * m * (n + k))
    benchmark.extra_info.update(model=model, n=n, k=k, m=m)


@pytest.mark.parametrize("model,n,k", CASES, ids=[f"{m}-{n}x{k}" for m, n, k in CASES])
def test_w8a16_prefill(benchmark, model, n, k):
    from decoding import ops

    m = 2048
    benchmark.group = "w8a16 m=2048"
    bf16_s = _bf16(m, n, k)
    weights = random_int8_weights(n, k, copies_for(n * k, 256 << 20))
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    calls = [lambda q=q, s=s: ops.w8a16_linear(x, q, s) for q, s in weights]
    _bench_graph(benchmark, calls, bf16_s, n * k + 4 * n + 2 * m * (n + k))
    benchmark.extra_info.update(model=model, n=n, k=k, m=m)


@pytest.mark.parametrize("model,n,k", CASES, ids=[f"{m}-{n}x{k}" for m, n, k in CASES])
def test_w8a8_prefill(benchmark, model, n, k):
    from decoding import ops

    if ops.select("w8a8_linear", "cuda") == "reference":
        pytest.skip("no Triton")
    m = 2048
    benchmark.group = "w8a8 m=2048"
    bf16_s = _bf16(m, n, k)
    weights = random_int8_weights(n, k, copies_for(n * k, 256 << 20))
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    x[:, [7, 100, 2000]] *= 12.0  # LLM.int8()-style outlier columns: the 16-bit path has work to do
    calls = [lambda q=q, s=s: ops.w8a8_linear(x, q, s, None, 6.0, 64) for q, s in weights]
    _bench_graph(benchmark, calls, bf16_s, n * k + 4 * n + 2 * m * (n + k))
    benchmark.extra_info.update(model=model, n=n, k=k, m=m)


def summary(path: str) -> None:
    """Per-case table, and per model and group the ratio of summed times over the four projections of a
    layer: what the linear layers of a whole step gain."""
    rows = [b for b in json.load(open(path))["benchmarks"]]
    print(f"{'group':<14} {'model':<4} {'N x K':>13} {'bf16 us':>9} {'int8 us':>9} {'GB/s':>6} {'x bf16':>7}")
    totals: dict = {}
    for b in rows:
        e = b["extra_info"]
        print(f"{b['group']:<14} {e['model']:<4} {e['n']:>6}x{e['k']:<6} {e['bf16_us']:9.2f} {e['us_per_call']:9.2f} "
              f"{e['GBps']:6.0f} {e['speedup']:7.2f}")
        t = totals.setdefault((b["group"], e["model"]), [0.0, 0.0])
        t[0] += e["bf16_us"]
        t[1] += e["us_per_call"]
    for (group, model), (bf16, int8) in totals.items():
        print(f"{group} {model}: the four projections of a layer take {int8:.1f} us vs {bf16:.1f} us bf16: "
              f"{bf16 / int8:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
    else:
        sys.exit("usage: pytest benches/bench_int8.py ...  |  python benches/bench_int8.py --summary FILE.json")
