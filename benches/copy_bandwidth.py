"""Device copy bandwidth, the roofline every GPU figure here is divided by.

    python benches/copy_bandwidth.py

One 2 GiB device-to-device copy at a time, host-synchronised, bytes read + written, median of 10
(shared/DESIGN.md: copies replayed back to back in a CUDA graph read ~20% lower and would flatter us).
"""

from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth_gbps(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}: device copy {copy_bandwidth_gbps():.0f} GB/s (read + write, median of 10)")
