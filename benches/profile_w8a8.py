"""Per-kernel CUDA time of the W8A8 linear on the Llama-3-8B projections, next to bf16 cuBLAS (torch.profiler).

    python benches/profile_w8a8.py [--tokens 2048]        # about 30 s on an H100

For each projection and each case (6 activation columns scaled to 10-20 with threshold 6.0; no column
over 6.0; threshold 0, the plain W8A8 that "w8a8-smooth" runs), three activation tensors rotate (so x
is not always in L2) and every kernel's mean CUDA time is printed, then the sum per linear against
F.linear in bf16 on the same shapes, profiled the same way in the same run.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CASES = (("6 outlier cols", True, 6.0), ("none over 6", False, 6.0), ("threshold 0", True, 0.0))


def activations(m: int, k: int, outliers: bool, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(k + seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    if outliers:
        cols = torch.randperm(k, device="cuda", generator=g)[:6]
        x[:, cols] *= torch.linspace(10, 20, 6, device="cuda")
    return x.to(torch.bfloat16)


def kernel_times(fn, calls: int) -> list[tuple[float, str]]:
    """(mean CUDA us per call, kernel name) of every kernel fn launches, over `calls` calls."""
    fn()  # compile and warm up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sorted(((e.device_time_total / calls, e.key) for e in prof.key_averages() if e.device_time_total > 0),
                  reverse=True)


def main() -> None:
    from decoding.kernels import w8a8

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    m = args.tokens
    print(torch.cuda.get_device_name(), torch.__version__, f"M={m}")
    totals: dict[str, float] = defaultdict(float)
    for name, (n, k) in SHAPES.items():
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        s = torch.rand(n, device="cuda") * 1e-3
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        xs = [activations(m, k, False, i) for i in range(3)]

        def bf16_calls(xs=xs, w=w) -> None:
            for x in xs:
                F.linear(x, w)

        bf16 = sum(us for us, _ in kernel_times(bf16_calls, args.repeats)) / len(xs)
        totals["bf16"] += bf16
        for label, outliers, threshold in CASES:
            xs = [activations(m, k, outliers, i) for i in range(3)]

            def w8a8_calls(xs=xs, q=q, s=s, threshold=threshold) -> None:
                for x in xs:
                    w8a8.w8a8_linear(x, q, s, None, threshold, 64)

            rows = [(us / len(xs), key) for us, key in kernel_times(w8a8_calls, args.repeats)]
            ours = sum(us for us, _ in rows)
            totals[label] += ours
            print(f"== {name} {n}x{k}, {label}: W8A8 {ours:.1f} us per linear vs cuBLAS bf16 {bf16:.1f} us "
                  f"({bf16 / ours:.2f}x)")
            for us, key in rows:
                print(f"   {us:9.1f} us  {key[:90]}")
    print("\n8B layer (4 projections):")
    for label, _, _ in CASES:
        print(f"  {label:<15} W8A8 {totals[label]:7.1f} us vs bf16 {totals['bf16']:7.1f} us: "
              f"{totals['bf16'] / totals[label]:.2f}x")


if __name__ == "__main__":
    main()
