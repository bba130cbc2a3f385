"""Sweeps the INT8 kernels' launch shapes on the GPU, each against bf16 in the same run.

    python benches/tune_int8.py [--part gemv,w8a8,w8a16] [--out results.json]

- gemv: the CUDA W8A16 GEMV built stand-alone with every rows-per-block variant (-DDECODING_GEMV_TUNE),
  for rows in {1, 2, 4, 8} x threads in {64, 128, 256}, at 1..16 tokens, on the Llama-3-8B and
  Llama-3.2-1B projection shapes; bf16 cuBLAS (F.linear) on the same shapes is the baseline.
- w8a8: the Triton int8 GEMM over tile configs at 2048 tokens (and 256), against torch._int_mm plus a
  separate scaling pass, and bf16 cuBLAS.
- w8a16: the Triton W8A16 GEMM over tile configs at 32..2048 tokens, against dequantize + cuBLAS.
All timings rotate weights past the L2 inside a CUDA graph (benches/int8_timing.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from int8_timing import copies_for, random_int8_weights, random_weights, time_rotating  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
          "1b": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]}


def _bf16_time(m: int, n: int, k: int) -> float:
    ws = random_weights(n, k, copies_for(2 * n * k))
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in ws]
    return time_rotating([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])


def _load_tune_module() -> None:
    from torch.utils.cpp_extension import load

    load(name="decoding_gemv_tune", sources=[str(ROOT / "csrc/cuda/int8_gemv.cu")],
         extra_include_paths=[str(ROOT / "csrc")], is_python_module=False, verbose=False,
         extra_cuda_cflags=["-O3", "-DDECODING_GEMV_TUNE", "-gencode=arch=compute_90,code=sm_90"])


def tune_gemv(results: dict) -> None:
    _load_tune_module()
    op = torch.ops.decoding_gemv_tune.w8a16_gemv
    variants = [(r, t) for r in (1, 2, 4, 8) for t in (64, 128, 256)]
    print(f"{'shape':>14} {'M':>3} {'bf16 us':>8} {'best':>10} {'int8 us':>8} {'GB/s':>6} {'x bf16':>7}   "
          f"default(4|2 rows) us")
    for name, shapes in SHAPES.items():
        for n, k in shapes:
            weights = random_int8_weights(n, k, copies_for(n * k))
            for m in (1, 2, 4, 8, 16):
                t_bf16 = _bf16_time(m, n, k)
                xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in weights]
                outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in weights]
                times = {}
                for rows, threads in variants:
                    if threads * 16 > k * 2:  # more than twice the threads the row has chunks for
                        continue
                    calls = [lambda q=q, s=s, x=x, o=o, r=rows, t=threads: op(o, x, q, s, None, r, t)
                             for (q, s), x, o in zip(weights, xs, outs)]
                    times[(rows, threads)] = time_rotating(calls)
                best = min(times, key=times.get)
                t = times[best]
                default_rows = 2 if m > 8 else 4
                default_threads = 256 if k // 16 >= 256 else (128 if k // 16 >= 128 else 64)
                t_def = times.get((default_rows, default_threads), float("nan"))
                gbps = (n * k + 4 * n + 2 * m * (k + n)) / t / 1e9
                print(f"{name} {n:>5}x{k:<5} {m:>3} {t_bf16 * 1e6:8.2f} {str(best):>10} {t * 1e6:8.2f} {gbps:6.0f} "
                      f"{t_bf16 / t:7.2f}   {t_def * 1e6:.2f}")
                results.setdefault("gemv", []).append(dict(
                    model=name, n=n, k=k, m=m, bf16_us=t_bf16 * 1e6, best=list(best), int8_us=t * 1e6,
                    default_us=t_def * 1e6, GBps=gbps, speedup=t_bf16 / t,
                    all={f"{r}x{th}": v * 1e6 for (r, th), v in times.items()}))
            del weights
            torch.cuda.empty_cache()


W8A8_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]


def tune_w8a8(results: dict) -> None:
    """The pointer-based int8 GEMM (the persistent TMA one: benches/tune_w8a8.py)."""
    from decoding.kernels import int8 as K
    from decoding.kernels import w8a8 as W

    print(f"{'shape':>14} {'M':>5} {'bf16 us':>8} {'_int_mm+scale':>14} " +
          " ".join(f"cfg{i:<6}" for i in range(len(W8A8_CONFIGS))) + "  full-linear  x bf16")
    for n, k in SHAPES["8b"]:
        for m in (2048, 256):
            t_bf16 = _bf16_time(m, n, k)
            weights = random_int8_weights(n, k, copies_for(n * k, 256 << 20))
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
            sa = torch.rand(m, device="cuda")
            outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in weights]

            def int_mm(q, s):
                return (torch._int_mm(a, q.t()).float() * sa[:, None] * s[None, :]).to(torch.bfloat16)

            t_int_mm = time_rotating([lambda q=q, s=s: int_mm(q, s) for q, s in weights])
            cfg_times = []
            for cfg in W8A8_CONFIGS:
                try:
                    cfg_times.append(time_rotating([lambda q=q, s=s, o=o, c=cfg: W.launch_int8_gemm(
                        a, sa, q, s, None, o, cfg=c, tma=False) for (q, s), o in zip(weights, outs)]))
                except Exception as e:  # out of shared memory etc.: report, keep sweeping
                    print(f"  cfg {cfg}: {type(e).__name__}: {str(e)[:100]}")
                    cfg_times.append(float("inf"))
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            x[:, [7, 100, 2000]] *= 12.0  # three outlier columns: the 16-bit path does work
            t_full = time_rotating([lambda q=q, s=s: K.w8a8_linear(x, q, s, None, 6.0, 64) for q, s in weights])
            t_plain = time_rotating([lambda q=q, s=s: K.w8a8_linear(x, q, s, None, 0.0, 64) for q, s in weights])
            t_quant = time_rotating([lambda: K.quantize_per_token(x)] * 8)
            t_absmax = time_rotating([lambda: K.column_absmax(x)] * 8)
            print(f"  full linear {t_full * 1e6:.1f} us (no decomposition: {t_plain * 1e6:.1f}); quantize "
                  f"{t_quant * 1e6:.1f} us, column abs-max {t_absmax * 1e6:.1f} us")
            print(f"{n:>6}x{k:<6} {m:>5} {t_bf16 * 1e6:8.1f} {t_int_mm * 1e6:14.1f} " +
                  " ".join(f"{t * 1e6:9.1f}" for t in cfg_times) + f"  {t_full * 1e6:9.1f}  {t_bf16 / t_full:6.2f}",
                  flush=True)
            results.setdefault("w8a8", []).append(dict(n=n, k=k, m=m, bf16_us=t_bf16 * 1e6, int_mm_us=t_int_mm * 1e6,
                                                       cfg_us=[t * 1e6 for t in cfg_times], full_us=t_full * 1e6))
            del weights, outs
            torch.cuda.empty_cache()


SWAPPED_CONFIGS = [  # BLOCK_M: tokens, BLOCK_N: output channels (the left operand), for _launch_w8a16_swapped
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
]


def tune_w8a16(results: dict) -> None:
    """Small M: the CUDA GEMV vs what ops.w8a16_linear picks; large M: swapped Triton configs vs dequantize
    (one Triton pass) + cuBLAS."""
    from decoding import ops
    from decoding.kernels import int8 as K

    print(f"{'shape':>14} {'M':>5} {'bf16 us':>8} {'gemv':>8} {'ops':>8} {'deq+mm':>8} " +
          " ".join(f"swap{i:<4}" for i in range(len(SWAPPED_CONFIGS))))
    gemv = torch.ops.decoding.w8a16_gemv
    for n, k in (SHAPES["8b"][0], SHAPES["8b"][2], SHAPES["8b"][3], SHAPES["1b"][0]):
        weights = random_int8_weights(n, k, copies_for(n * k, 256 << 20))
        for m in (2, 3, 4, 8, 16, 32, 128, 512, 2048):
            t_bf16 = _bf16_time(m, n, k)
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in weights]
            t_ops = time_rotating([lambda q=q, s=s: ops.w8a16_linear(x, q, s) for q, s in weights])
            t_gemv = time_rotating([lambda q=q, s=s, o=o: gemv(o, x, q, s, None) for (q, s), o in zip(weights, outs)]) \
                if m <= 16 else float("nan")
            t_deq = time_rotating([lambda q=q, s=s: F.linear(x, K.dequantize(q, s, torch.bfloat16))
                                   for q, s in weights]) if m >= 32 else float("nan")
            cfg_times = [float("nan")] * len(SWAPPED_CONFIGS)
            if m >= 32:
                for i, cfg in enumerate(SWAPPED_CONFIGS):
                    if cfg["BLOCK_M"] > 2 * m:
                        continue
                    cfg_times[i] = time_rotating([lambda q=q, s=s, o=o, c=cfg: K._launch_w8a16_swapped(
                        x, q, s, None, o, c) for (q, s), o in zip(weights, outs)])
            print(f"{n:>6}x{k:<6} {m:>5} {t_bf16 * 1e6:8.1f} {t_gemv * 1e6:8.1f} {t_ops * 1e6:8.1f} "
                  f"{t_deq * 1e6:8.1f} " + " ".join(f"{t * 1e6:8.1f}" for t in cfg_times), flush=True)
            results.setdefault("w8a16", []).append(dict(n=n, k=k, m=m, bf16_us=t_bf16 * 1e6, gemv_us=t_gemv * 1e6,
                                                        ops_us=t_ops * 1e6, deq_us=t_deq * 1e6,
                                                        swapped_us=[t * 1e6 for t in cfg_times]))
        del weights
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="gemv,w8a8,w8a16")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tune_int8.json"))
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    results: dict = {}
    for part in args.part.split(","):
        {"gemv": tune_gemv, "w8a8": tune_w8a8, "w8a16": tune_w8a16}[part](results)
        sys.stdout.flush()
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
