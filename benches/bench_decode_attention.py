"""Decode attention (kernels/attention.py: split-K partials, then the merge) on the 8B shape, against the
device copy bandwidth measured in the same run.

    python benches/bench_decode_attention.py            # the kernel as configured
    python benches/bench_decode_attention.py --sweep    # MIN_PART x BLOCK_N x warps x stages (24 configurations)

Each case: `batch` sequences of `ctx` tokens (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token
blocks), the partition count fixed by the engine's bound (8192). Each timed call reads its own block
tables over a disjoint part of a pool much larger than the L2, 16 calls captured in one CUDA graph (the
layers of a step), median of the replays. Bytes: the K and V each call reads (ctx x 8 x 128 x 2 x 2 per
sequence); the queries, partials and outputs are not counted. Every configuration's output is checked
against the reference configuration's (same bits are not expected across BLOCK_N: the online softmax
order changes; a bf16 ulp of the output's scale is the bound).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from int8_timing import time_rotating

from decoding.bench import copy_bandwidth_gbps
from decoding.kernels import attention as att

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
BOUND = 8192
CALLS = 16
CASES = [(48, 1285), (32, 2048), (8, 4096), (1, 1285), (1, 8192), (128, 512)]


def make_case(batch: int, ctx: int, gen: torch.Generator):
    per_seq = -(-ctx // BLOCK)
    blocks = per_seq * batch * CALLS
    k = torch.randn(blocks, BLOCK, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(blocks, BLOCK, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    perm = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32)
    tables = [perm[c * batch * per_seq:(c + 1) * batch * per_seq].view(batch, per_seq) for c in range(CALLS)]
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return q, k, v, tables, lens


def time_case(case) -> tuple[float, torch.Tensor]:
    """us per call (benches/int8_timing.py: the calls captured in one graph, median replay / calls) and the
    first call's output."""
    q, k, v, tables, lens = case
    calls = [lambda t=t: att.paged_decode_attention(q, k, v, t, lens, DIM ** -0.5, None, BOUND) for t in tables]
    out = calls[0]()
    return time_rotating(calls) * 1e6, out


def configure(min_part: int, block_n: int, warps: int, stages: int | None) -> None:
    att.MIN_PART, att.BLOCK_N, att.DECODE_WARPS, att.DECODE_STAGES = min_part, block_n, warps, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    copy = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s")
    default = (att.MIN_PART, att.BLOCK_N, att.DECODE_WARPS, att.DECODE_STAGES)
    configs = [default]
    if args.sweep:
        configs += [c for c in itertools.product((128, 256, 512), (64, 128), (4, 8), (None, 2)) if c != default]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, ctx in CASES:
        case = make_case(batch, ctx, gen)
        nbytes = batch * ctx * KV_HEADS * DIM * 2 * 2
        rows, ref = [], None
        for cfg in configs:
            configure(*cfg)
            try:
                us, out = time_case(case)
            except Exception as e:  # a configuration Triton cannot build (shared memory, registers)
                rows.append((float("inf"), cfg, f"failed: {type(e).__name__}"))
                continue
            if ref is None:
                ref = out.float()
            err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
            rows.append((us, cfg, f"{nbytes / us / 1e3:7.0f} GB/s {100 * nbytes / us / 1e3 / copy:5.1f}% of copy, "
                                  f"max rel diff {err:.1e}" + (" (!)" if err > 2 ** -7 else "")))
        configure(*default)
        print(f"batch {batch} x ctx {ctx} ({nbytes / 1e6:.0f} MB of K/V per call):")
        for us, cfg, text in sorted(rows, key=lambda r: r[0])[: 8 if args.sweep else 1] + (
                [r for r in rows if r[1] == default] if args.sweep else []):
            mark = " <- current" if cfg == default else ""
            print(f"  MIN_PART {cfg[0]:>4} BLOCK_N {cfg[1]:>3} warps {cfg[2]} stages {cfg[3]}: "
                  f"{us:8.2f} us  {text}{mark}")
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
