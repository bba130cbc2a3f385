"""CUDA work the engine issues while steps are in flight, without waiting for them.

The engine launches step t+1 before it reads step t's tokens (decoding/engine.py); host work that
waits for the device in between stalls it for the whole step in flight. A synchronizing call (a
blocking copy, `torch.tensor(..., device="cuda")`, .item()) in the engine's hot path cost ~13 ms in one
step of five on the 8B shape (benches/NOTES.md, serving v4); tests/test_scheduler_gpu.py serves a mixed
load under torch.cuda.set_sync_debug_mode("error") so that none comes back.

Graph capture: `torch.cuda.graph` first synchronizes the device and empties the CUDA and pinned-host
allocator caches. Captured in the middle of serving (the engine captures lazily), that stalls the engine
for the step in flight, and every allocation after it pays cudaMalloc / cudaHostAlloc again (both
synchronizing): steps of 170-600 ms on the 8B shape (benches/NOTES.md, serving v4). `capture` does what the capture itself needs and nothing else:
a side stream that waits for the current one, capture_begin / capture_end there, and the current stream
waits for the side stream after it. The capture error mode is thread-local: other threads may keep using
CUDA while the engine thread captures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied asynchronously: from pinned memory on CUDA (a copy from
    pageable memory may wait for the stream's queued work), directly elsewhere."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def capture(fn: Callable[[], object], pool=None, device: torch.device | None = None, warmup: bool = False
            ) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture fn() into a new CUDA graph (in memory pool `pool`, else a private one); returns the graph
    and what fn returned (the graph's static outputs). fn must have run once eagerly before (Triton
    compiles, cuBLAS picks its kernels; a capture records launches, it does not run them): `warmup` runs
    it once on the capture stream first, for an fn whose eager run may write what the graph writes."""
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        if warmup:
            fn()
        graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="thread_local")
        try:
            out = fn()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, out
