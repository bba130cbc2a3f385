"""Timing helpers for the INT8 benchmarks (benches/bench_int8.py, benches/tune_int8.py), GPU only.

A decode matmul reads a weight once per step, so timing one call over and over on the same weight
measures L2 (50 MB on the H100), not HBM. Each measurement therefore rotates over enough copies of
the weights (and activations) to exceed the L2 several times, captures one call per copy in a CUDA
graph (no launch gaps, as in a captured decode step), and reports the median replay time / copies.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

ROTATE_BYTES = 512 << 20  # bytes of weights visited per replay: 10x the H100's L2


def copies_for(nbytes: int, rotate_bytes: int = ROTATE_BYTES) -> int:
    return max(2, -(-rotate_bytes // max(nbytes, 1)))


def capture_rotating(calls: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """`calls` (one per weight copy) run once (Triton compiles, cuBLAS picks its kernels), then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def time_rotating(calls: list[Callable[[], object]], replays: int = 20, warmup: int = 3) -> float:
    """Seconds per call: `calls` captured once in a CUDA graph, median of timed replays / len(calls)."""
    graph = capture_rotating(calls)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(calls)


def random_int8_weights(n: int, k: int, copies: int, device: str = "cuda") -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(copies):
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
        s = torch.rand(n, device=device) * 1e-3 + 1e-4
        out.append((q, s))
    return out


def random_weights(n: int, k: int, copies: int, dtype: torch.dtype = torch.bfloat16,
                   device: str = "cuda") -> list[torch.Tensor]:
    return [torch.randn(n, k, dtype=dtype, device=device) * 0.02 for _ in range(copies)]
