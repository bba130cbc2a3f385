"""Device copy bandwidth, the roofline every GPU figure here is divided by.

    python benches/copy_bandwidth.py

One 2 GiB device-to-device copy at a time, host-synchronised, bytes read + written, median of 10
(shared/DESIGN.md: copies replayed back to back in a CUDA graph read ~20% lower and would flatter us).
The measurement itself lives in decoding.bench, which `python -m decoding bench` also uses.
"""

from __future__ import annotations

import torch

from decoding.bench import copy_bandwidth_gbps as _measure


def copy_bandwidth_gbps(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    return _measure("cuda", nbytes, repeats)


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()}: device copy {copy_bandwidth_gbps():.0f} GB/s (read + write, median of 10)")
