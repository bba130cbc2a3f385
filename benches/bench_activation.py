"""silu_and_mul on the GPU: the fused Triton kernel (kernels/activation.py) against the torch reference
(F.silu, then mul: two kernels and an intermediate), as achieved bandwidth over the device copy bandwidth
measured in the same run.

    python benches/bench_activation.py             # the table
    python benches/bench_activation.py --sweep     # also BLOCK x num_warps x exp/division of the kernel
    pytest benches/bench_activation.py --benchmark-columns=median --benchmark-group-by=param:shape

GB/s counts the bytes the op has to move: x [M, 2I] read once and out [M, I] written once, 3·M·I elements
(the reference moves 5·M·I: silu's output is written and read back). Both are divided into the same
bytes, so their ratio is a speed ratio. Columns:
  hbm    each call on its own copy of x (>= 512 MB of copies, 10x the H100's L2), all captured in one
         CUDA graph, median replay time / calls (benches/int8_timing.py); outputs kept, so none is reused
  hot    one x, called back to back in a CUDA graph: x stays in L2 where it fits (M = 256: 15 MB), as
         after the gate/up GEMM that wrote it in a model step
  eager  one x, called from Python back to back, one sync: at small M the host's launch rate (the
         triton_op's dispatch against two aten launches)
  exact  whether the fused output equals the reference's bit for bit on one x ~ N(0, 9)
--sweep times the kernel itself (no triton_op) at M = 256 and 2048, I = 14336, for every BLOCK, num_warps
and PRECISE (libdevice expf + div_rn, the default, or tl.exp and `/`), against the default config.
Skips without CUDA; not collected by a plain `pytest` (testpaths = tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from decoding import ops
from decoding.reference import silu_and_mul_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_timing import copies_for, time_rotating

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NUM_TOKENS = [256, 512, 2048]
INTER = [14336, 8192]  # Llama-3-8B, Llama-3.2-1B
SHAPES = [(m, i) for i in INTER for m in NUM_TOKENS]
SWEEP_SHAPES = [(256, 14336), (2048, 14336)]
SWEEP_BLOCKS = [512, 1024, 2048, 4096]
SWEEP_WARPS = [2, 4, 8]
EAGER_REPS = 100


def _bytes(m: int, inter: int, dtype: torch.dtype = torch.bfloat16) -> int:
    return 3 * m * inter * dtype.itemsize


def _fused():
    if "triton" not in ops._IMPLS["silu_and_mul"]:
        raise RuntimeError(f"triton silu_and_mul unavailable: {ops.describe()['triton']}")
    return ops._IMPLS["silu_and_mul"]["triton"]


def time_hbm(fn, m: int, inter: int) -> float:
    """Seconds per call, each call on its own copy of x, outputs kept alive (distinct addresses)."""
    xs = [torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(_bytes(m, inter)))]
    keep: list[torch.Tensor] = []
    seconds = time_rotating([lambda x=x: keep.append(fn(x)) for x in xs])
    xs.clear()
    keep.clear()
    torch.cuda.empty_cache()
    return seconds


def time_hot(fn, m: int, inter: int, calls: int = 20) -> float:
    x = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16)
    return time_rotating([lambda: fn(x)] * calls)


def time_eager(fn, m: int, inter: int) -> float:
    x = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16)
    fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(EAGER_REPS):
            fn(x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / EAGER_REPS)
    return statistics.median(times)


def main() -> None:
    from decoding.bench import copy_bandwidth_gbps

    copy = copy_bandwidth_gbps("cuda")
    fused = _fused()
    print(
        f"{torch.cuda.get_device_name()}: device copy {copy:.0f} GB/s (same run). bf16; GB/s = 3*M*I*2 bytes "
        "/ time; us per call. fused = decoding::silu_and_mul_triton, torch = F.silu(gate) * up."
    )
    print(
        f"{'M':>5} {'I':>6} | {'fused hbm':>14} {'% copy':>6} | {'torch hbm':>14} {'% copy':>6} | {'speedup':>7} | "
        f"{'hot us f/t':>12} {'x':>5} | {'eager us f/t':>13} | exact"
    )
    for m, inter in SHAPES:
        gb = _bytes(m, inter) / 1e9
        x = torch.randn(m, 2 * inter, device="cuda", dtype=torch.bfloat16) * 3
        exact = "yes" if torch.equal(fused(x), silu_and_mul_ref(x)) else "NO"
        del x
        tf, tt = time_hbm(fused, m, inter), time_hbm(silu_and_mul_ref, m, inter)
        hf, ht = time_hot(fused, m, inter), time_hot(silu_and_mul_ref, m, inter)
        ef, et = time_eager(fused, m, inter), time_eager(silu_and_mul_ref, m, inter)
        print(
            f"{m:>5} {inter:>6} | {tf * 1e6:6.1f} {gb / tf:7.0f} {100 * gb / tf / copy:5.0f}% | "
            f"{tt * 1e6:6.1f} {gb / tt:7.0f} {100 * gb / tt / copy:5.0f}% | {tt / tf:6.2f}x | "
            f"{hf * 1e6:5.1f} {ht * 1e6:6.1f} {ht / hf:4.2f}x | {ef * 1e6:6.1f} {et * 1e6:6.1f} | {exact}"
        )


def sweep() -> None:
    from decoding.bench import copy_bandwidth_gbps
    from decoding.kernels import activation

    copy = copy_bandwidth_gbps("cuda")
    print(
        f"\n--sweep: the kernel launched directly, hbm timing; copy {copy:.0f} GB/s. "
        f"default: {activation._launch_config(14336)}, PRECISE on"
    )
    for m, inter in SWEEP_SHAPES:
        gb = _bytes(m, inter) / 1e9
        results = []
        for precise in (True, False):
            for block in SWEEP_BLOCKS:
                for warps in SWEEP_WARPS:
                    if block // (32 * warps) > 32:  # more than 64 bytes of gate a thread: registers, not memory
                        continue

                    def fn(x, m=m, inter=inter, block=block, warps=warps, precise=precise):
                        out = torch.empty(m, inter, dtype=x.dtype, device=x.device)
                        activation._launch(out, x, block, warps, precise, wrap=False)
                        return out

                    results.append((time_hbm(fn, m, inter), block, warps, precise))
        best = min(results)[0]
        print(
            f"M={m} I={inter}: {'BLOCK':>5} {'warps':>5} {'precise':>7} {'us':>7} {'GB/s':>6} {'% copy':>6} {'/best':>6}"
        )
        for t, block, warps, precise in sorted(results):
            print(
                f"{'':>14} {block:>5} {warps:>5} {precise!s:>7} {t * 1e6:7.1f} {gb / t:6.0f} "
                f"{100 * gb / t / copy:5.0f}% {t / best:6.2f}"
            )


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def copy_gbps() -> float:
    from decoding.bench import copy_bandwidth_gbps

    return copy_bandwidth_gbps("cuda")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_silu_and_mul(benchmark, copy_gbps, backend, shape):
    if backend not in ops._IMPLS["silu_and_mul"]:
        pytest.skip(f"{backend} not available: {ops.describe()['triton']}")
    fn = ops._IMPLS["silu_and_mul"][backend]
    m, inter = shape
    seconds = benchmark.pedantic(lambda: time_hbm(fn, m, inter), rounds=3, warmup_rounds=1)
    gbps = _bytes(m, inter) / seconds / 1e9
    benchmark.extra_info.update(
        {"us_per_call": seconds * 1e6, "GB/s": gbps, "copy GB/s": copy_gbps, "fraction_of_copy": gbps / copy_gbps}
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's launch configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_activation: needs a CUDA device, skipped")
        sys.exit(0)
    main()
    if args.sweep:
        sweep()
