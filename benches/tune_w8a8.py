"""W8A8 prefill on the Llama-3-8B projections: bf16 vs the int8 GEMMs and the whole W8A8 linear, one command.

    python benches/tune_w8a8.py [--tokens 2048] [--out $OUT/tune_w8a8.json]
    python benches/tune_w8a8.py --part prep [--out $OUT/tune_w8a8_prep.json]    # about a minute
    python benches/tune_w8a8.py --part epilogue [--out $OUT/tune_w8a8_epilogue.json]

--part prep sweeps the preparation kernels alone (kernels/w8a8_prep.py: the abs-max + plan kernel over
ABSMAX_CONFIGS, the quantize kernel over QUANT_CONFIGS with and without the abs-max kernel's row
maxima), each first checked bit for bit against the default config, and prints each time with its
bytes over the device-to-device copy bandwidth measured the same way in the same run.

--part epilogue times the TMA GEMM (table configs) with 6 live outlier columns of 64 against the same
GEMM without them, for each setting of w8a8.OUTLIER_QUARTER_STORES (quarter-width output stores, so the
outlier dot's shared memory does not cost a pipeline stage) and w8a8.PREFETCH_OUTLIERS (each tile's
outlier block prefetched into L1 before its K loop); outputs checked equal across settings.

For each projection (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) at --tokens:
- bf16 F.linear (cuBLAS), the baseline of every ratio;
- the pointer-based int8 GEMM (the old kernel), and the persistent TMA GEMM over CONFIGS (<= 8 per shape);
- the whole W8A8 linear (kernels/w8a8.w8a8_linear) with the best TMA config of this run: activations
  N(0, 1) with 6 columns scaled to 10-20 (the LLM.int8() path has work), the same with no column over
  the threshold, and the decomposition off (threshold 0); plus the preparation alone (memset, abs-max
  and plan, quantization and gathers) to show the overhead.
Timing as benches/int8_timing.py: weights rotate past the L2 inside one CUDA graph, median replay.

Every config is first compiled and checked against torch._int_mm in a child process (a compiler abort,
e.g. from Hopper warp specialization, then costs that config, not the run). At the end it prints the
TMA_CONFIGS table for kernels/w8a8.py; paste it there and a second run times the table's choice
("table" column) next to the sweep's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from int8_timing import copies_for, random_int8_weights, random_weights, time_rotating  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _cfg(bm, bn, bk, warps, stages, subtile=True, flatten=True, ws=False, group=8):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages,
                SUBTILE=subtile, FLATTEN=flatten, WS=ws)


# Triton 3.6 keeps an int8 wgmma synchronous (its accumulator is not fp32), so each K step waits for its
# MMAs: deeper K blocks (fewer waits) and two warpgroups per tile (one issues while the other waits) are
# the levers; warp specialization may overlap them further if it compiles.
CONFIGS = [
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 256, 128, 8, 4),
    _cfg(256, 128, 128, 8, 4),
    _cfg(128, 128, 256, 8, 3),
    _cfg(256, 128, 128, 8, 3, flatten=False),
    _cfg(128, 256, 128, 8, 3, flatten=False),
    _cfg(128, 256, 128, 8, 3, ws=True),
    _cfg(128, 128, 128, 4, 4, ws=True),
]


def _check_child(indices: list[int]) -> None:
    """Child process: compile and check each config (bf16 out, without and with outliers), print OK i."""
    from decoding.kernels import w8a8

    torch.manual_seed(0)
    m, n, k = 2048, 4096, 4096
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(m, device="cuda") * 1e-2, torch.rand(n, device="cuda") * 1e-2
    ref = (torch._int_mm(a, b.t()).double() * sa.double()[:, None] * sb.double()[None, :]).float()
    xo = torch.randn(m, 64, device="cuda").to(torch.bfloat16)
    wo = torch.randint(-127, 128, (n, 64), dtype=torch.int8, device="cuda")
    cnt = torch.tensor([5], dtype=torch.int32, device="cuda")
    ref_o = ref + (xo[:, :5].float() @ wo[:, :5].float().t()) * sb[None, :]
    for i in indices:
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        w8a8.launch_int8_gemm(a, sa, b, sb, None, out, cfg=CONFIGS[i], tma=True)
        ok = torch.allclose(out.float(), ref, rtol=2**-7, atol=1e-3 * ref.abs().max().item())
        w8a8.launch_int8_gemm(a, sa, b, sb, None, out, xo, wo, cnt, cfg=CONFIGS[i], tma=True)
        ok &= torch.allclose(out.float(), ref_o, rtol=2**-7, atol=1e-3 * ref_o.abs().max().item())
        torch.cuda.synchronize()
        print(f"{'OK' if ok else 'WRONG'} {i}", flush=True)


def precheck(indices: list[int], timeout: int = 240) -> dict[int, str]:
    """Config index -> "OK" / "WRONG" / "crash" / "timeout", each config compiled in a child process
    (one child for all; after a crash, a new child for the rest)."""
    status: dict[int, str] = {}
    todo = list(indices)
    while todo:
        cmd = [sys.executable, __file__, "--check", ",".join(map(str, todo))]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            out, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        for line in out.splitlines():
            word, _, i = line.partition(" ")
            if word in ("OK", "WRONG"):
                status[int(i)] = word
        rest = [i for i in todo if i not in status]
        if rest:  # the first unfinished one broke the child: count it out, retry the others
            status[rest[0]] = "timeout" if err == "timeout" else "crash"
            print(f"  config {rest[0]} {status[rest[0]]}: {(err or '').strip().splitlines()[-1:] }", flush=True)
        todo = rest[1:]
    return status


# --part prep. Abs-max kernel: rows per step, warps, programs per SM (the first is w8a8_prep.ABSMAX).
ABSMAX_CONFIGS = [dict(BLOCK_M=32, num_warps=8, PER_SM=2), dict(BLOCK_M=16, num_warps=8, PER_SM=4),
                  dict(BLOCK_M=32, num_warps=8, PER_SM=3), dict(BLOCK_M=16, num_warps=8, PER_SM=6),
                  dict(BLOCK_M=16, num_warps=4, PER_SM=6)]
# Quantize kernel by K: tokens a program, columns a step (>= K: the whole row in registers), warps.
QUANT_CONFIGS = {4096: [dict(ROWS=1, BLOCK=4096, num_warps=8), dict(ROWS=1, BLOCK=4096, num_warps=4),
                        dict(ROWS=1, BLOCK=4096, num_warps=16), dict(ROWS=2, BLOCK=4096, num_warps=16)],
                 14336: [dict(ROWS=1, BLOCK=4096, num_warps=8), dict(ROWS=1, BLOCK=2048, num_warps=4),
                         dict(ROWS=1, BLOCK=8192, num_warps=16), dict(ROWS=1, BLOCK=16384, num_warps=16)]}


def run_prep(m: int, out_path: str) -> None:
    """Each preparation kernel per config at the 8B input widths, as bytes / time against the copy bandwidth."""
    from decoding.kernels import w8a8, w8a8_prep

    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, f"M={m}", flush=True)
    results = []
    for k in (4096, 14336):
        xs = [_activations(m, k, True).roll(i, 0) for i in range(copies_for(2 * m * k, 256 << 20))]
        dst = [torch.empty_like(x) for x in xs]
        nbytes = 2 * m * k
        copy_s = time_rotating([lambda x=x, d=d: d.copy_(x) for x, d in zip(xs, dst)])
        copy_bw = 2 * nbytes / copy_s
        print(f"\nK={k}: x [{m}, {k}] bf16 {nbytes / 1e6:.1f} MB, x{len(xs)} copies; copy {copy_s * 1e6:.1f} us = "
              f"{copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
        ref = [w8a8.absmax_plan(x, 6.0, 64) for x in xs]
        w = torch.randint(-127, 128, (4096, k), dtype=torch.int8, device="cuda")

        def report(label: str, seconds: float, moved: int) -> None:
            print(f"  {label:<58} {seconds * 1e6:8.1f} us  {moved / seconds / 1e9:6.0f} GB/s = "
                  f"{100 * moved / seconds / copy_bw:3.0f}% of copy", flush=True)
            results.append(dict(k=k, label=label, us=seconds * 1e6, bytes=moved, copy_GBps=copy_bw / 1e9))

        for cfg in ABSMAX_CONFIGS:
            _, idx, cnt, keep, rmax = w8a8_prep.absmax_plan(xs[0], 6.0, 64, reuse=True, cfg=cfg)
            blocks, slices, _ = w8a8_prep.absmax_grid(m, k, xs[0].device, cfg)
            same = all(torch.equal(a, b) for a, b in zip((idx, cnt, keep), ref[0][1:4]))
            same &= torch.equal(rmax, w8a8_prep.absmax_plan(xs[0], 6.0, 64)[4])
            t = time_rotating([lambda x=x: w8a8_prep.absmax_plan(x, 6.0, 64, reuse=True, cfg=cfg) for x in xs])
            report(f"abs-max + plan {cfg} grid {blocks}x{slices}{'' if same else ' WRONG'}", t, nbytes)
        for row_max in (True, False):
            for cfg in QUANT_CONFIGS[k]:
                def call(x, r, cfg=cfg):
                    if row_max:
                        return w8a8.quantize(x, r[3], r[2], r[1], w, r[4], cfg=cfg)
                    return w8a8.quantize(x, cfg=cfg)

                expected = call(xs[0], ref[0], None)
                got = call(xs[0], ref[0])
                same = all(torch.equal(a[:, :6] if i >= 2 else a, b[:, :6] if i >= 2 else b)
                           for i, (a, b) in enumerate(zip(got, expected)) if a is not None)
                t = time_rotating([lambda x=x, r=r: call(x, r) for x, r in zip(xs, ref)])
                what = "quantize, row maxima + 6 outlier cols" if row_max else "quantize, plain (threshold 0)"
                report(f"{what} {cfg}{'' if same else ' WRONG'}", t, nbytes + m * k)
    Path(out_path).write_text(json.dumps(dict(m=m, device=torch.cuda.get_device_name(), results=results), indent=1))
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


def run_epilogue(m: int, out_path: str) -> None:
    """The TMA GEMM's outlier epilogue under each setting of the two module flags, against no outliers."""
    from decoding.kernels import w8a8

    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, f"M={m}", flush=True)
    results = []
    flags = (w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS)
    for name, (n, k) in SHAPES.items():
        weights = _weights(n, k)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        sa = torch.rand(m, device="cuda") * 1e-2
        x_out = torch.randn(m, 64, device="cuda").to(torch.bfloat16)
        w_outs = [q[:, :64].contiguous() for q, _ in weights]
        outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in weights]

        def gemm(live: int | None) -> tuple[float, torch.Tensor]:
            cnt = torch.tensor([live or 0], dtype=torch.int32, device="cuda")
            calls = [lambda q=q, s=s, o=o, wo=wo: w8a8.launch_int8_gemm(
                         a, sa, q, s, None, o, *((x_out, wo, cnt) if live is not None else ()), tma=True)
                     for (q, s), o, wo in zip(weights, outs, w_outs)]
            t = time_rotating(calls)
            calls[0]()
            return t, outs[0].clone()

        t_plain, _ = gemm(None)
        print(f"\n{name} {n}x{k} M={m}: no outlier columns {t_plain * 1e6:.1f} us", flush=True)
        first = None
        for quarter in (False, True):
            for prefetch in (False, True):
                w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS = quarter, prefetch
                t6, out = gemm(6)
                t0_live, _ = gemm(0)
                first = out if first is None else first
                same = torch.equal(out, first)
                print(f"  quarter stores {quarter!s:<5} prefetch {prefetch!s:<5}: 6 live cols {t6 * 1e6:7.1f} us "
                      f"(+{(t6 - t_plain) * 1e6:5.1f}), 0 live {t0_live * 1e6:7.1f} us (+{(t0_live - t_plain) * 1e6:5.1f})"
                      f"{'' if same else '  WRONG'}", flush=True)
                results.append(dict(name=name, quarter=quarter, prefetch=prefetch, plain_us=t_plain * 1e6,
                                    live6_us=t6 * 1e6, live0_us=t0_live * 1e6, same=same))
        w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS = flags
    Path(out_path).write_text(json.dumps(dict(m=m, device=torch.cuda.get_device_name(), results=results), indent=1))
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


def _weights(n: int, k: int):
    return random_int8_weights(n, k, copies_for(n * k, 256 << 20))


def _activations(m: int, k: int, outliers: bool) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, k, device="cuda", generator=g)
    if outliers:  # LLM.int8()-style feature outliers: a few whole columns of magnitude 10-20
        cols = torch.randperm(k, device="cuda", generator=g)[:6]
        x[:, cols] *= torch.linspace(10, 20, 6, device="cuda")
    return x.to(torch.bfloat16)


def _fmt(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            + ("" if cfg["FLATTEN"] else " nf") + (" ws" if cfg["WS"] else ""))


def run(m: int, out_path: str) -> None:
    from decoding.kernels import w8a8

    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, f"M={m}", flush=True)
    print("precheck (child processes):", flush=True)
    status = precheck(list(range(len(CONFIGS))))
    good = [i for i, s in sorted(status.items()) if s == "OK"]
    for i, cfg in enumerate(CONFIGS):
        print(f"  cfg{i}: {_fmt(cfg):<28} {status.get(i)}")
    print(f"precheck done in {time.time() - t0:.0f} s", flush=True)
    results, best_table, totals = [], {}, {"bf16": 0.0, "full": 0.0, "none": 0.0, "plain": 0.0, "gemm": 0.0}
    for name, (n, k) in SHAPES.items():
        ws = random_weights(n, k, copies_for(2 * n * k))
        xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in ws]
        t_bf16 = time_rotating([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])
        weights = _weights(n, k)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        sa = torch.rand(m, device="cuda") * 1e-2
        outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in weights]

        def gemm(cfg, tma):
            return time_rotating([lambda q=q, s=s, o=o: w8a8.launch_int8_gemm(a, sa, q, s, None, o, cfg=cfg, tma=tma)
                                  for (q, s), o in zip(weights, outs)])

        t_old = gemm(w8a8.gemm_config(m), False)
        cfg_us = {}
        for i in good:
            try:
                cfg_us[i] = gemm(CONFIGS[i], True) * 1e6
            except Exception as e:  # out of shared memory etc.: report, keep sweeping
                print(f"  cfg{i}: {type(e).__name__}: {str(e)[:120]}")
        t_table = gemm(None, True)
        best = min(cfg_us, key=cfg_us.get) if cfg_us else None
        best_cfg = CONFIGS[best] if best is not None else w8a8.tma_config(m, n, k)
        best_table[(n, k)] = best_cfg
        w8a8.TMA_CONFIGS[(n, k)] = best_cfg  # the full linear below runs the sweep's winner
        x_out, x_none = _activations(m, k, True), _activations(m, k, False)
        full = lambda x, thr: time_rotating([lambda q=q, s=s: w8a8.w8a8_linear(x, q, s, None, thr, 64)  # noqa: E731
                                             for q, s in weights])
        t_full, t_none, t_plain = full(x_out, 6.0), full(x_none, 6.0), full(x_out, 0.0)

        def prep():
            _, idx, cnt, keep, rmax = w8a8.absmax_plan(x_out, 6.0, 64, reuse=True)
            w8a8.quantize(x_out, keep, cnt, idx, weights[0][0], rmax)

        t_prep = time_rotating([prep] * 8)
        gemm_best = min(cfg_us.values()) / 1e6 if cfg_us else t_table
        row = dict(name=name, n=n, k=k, m=m, bf16_us=t_bf16 * 1e6, old_gemm_us=t_old * 1e6, cfg_us=cfg_us,
                   table_gemm_us=t_table * 1e6, best=best, best_cfg=best_cfg, full_us=t_full * 1e6,
                   no_outlier_cols_us=t_none * 1e6, threshold0_us=t_plain * 1e6, prep_us=t_prep * 1e6)
        results.append(row)
        for key, t in (("bf16", t_bf16), ("full", t_full), ("none", t_none), ("plain", t_plain), ("gemm", gemm_best)):
            totals[key] += t
        r = lambda t: t_bf16 / t  # noqa: E731
        print(f"\n{name} {n}x{k} M={m}: bf16 {t_bf16 * 1e6:.1f} us | old int8 GEMM {t_old * 1e6:.1f} ({r(t_old):.2f}x)"
              f" | TMA table {t_table * 1e6:.1f} ({r(t_table):.2f}x)")
        for i, us in sorted(cfg_us.items(), key=lambda kv: kv[1]):
            print(f"    cfg{i} {_fmt(CONFIGS[i]):<28} {us:8.1f} us  {t_bf16 * 1e6 / us:5.2f}x"
                  + ("   <- best" if i == best else ""))
        print(f"  W8A8 linear: 6 outlier cols {t_full * 1e6:.1f} us ({r(t_full):.2f}x); none over 6.0 "
              f"{t_none * 1e6:.1f} ({r(t_none):.2f}x); threshold 0 {t_plain * 1e6:.1f} ({r(t_plain):.2f}x); "
              f"prep alone {t_prep * 1e6:.1f} us", flush=True)
    b = totals["bf16"]
    print(f"\n8B layer, 4 projections at M={m}: bf16 {b * 1e6:.0f} us; best int8 GEMMs {totals['gemm'] * 1e6:.0f} "
          f"({b / totals['gemm']:.2f}x); W8A8 linear {totals['full'] * 1e6:.0f} ({b / totals['full']:.2f}x), "
          f"no outlier cols {totals['none'] * 1e6:.0f} ({b / totals['none']:.2f}x), threshold 0 "
          f"{totals['plain'] * 1e6:.0f} ({b / totals['plain']:.2f}x)")
    print("\n# paste into kernels/w8a8.py:\nTMA_CONFIGS: dict[tuple[int, int], dict] = {")
    for (n, k), cfg in best_table.items():
        print(f"    ({n}, {k}): {cfg!r},")
    print("}")
    Path(out_path).write_text(json.dumps(dict(m=m, device=torch.cuda.get_device_name(), configs=CONFIGS,
                                              precheck=status, shapes=results,
                                              totals_us={k: v * 1e6 for k, v in totals.items()}), indent=1))
    print(f"wrote {out_path} in {time.time() - t0:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--part", default="gemm", choices=["gemm", "prep", "epilogue"],
                        help="gemm: the GEMM sweep and the whole linear (default); prep: the preparation kernels; "
                             "epilogue: the outlier epilogue's two settings")
    parser.add_argument("--out", default=None, help="JSON results (default $OUT/tune_w8a8[_prep].json)")
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"tune_w8a8{'' if args.part == 'gemm' else '_' + args.part}.json")
    if args.check is not None:
        _check_child([int(i) for i in args.check.split(",")])
    elif args.part == "prep":
        run_prep(args.tokens, out)
    elif args.part == "epilogue":
        run_epilogue(args.tokens, out)
    else:
        run(args.tokens, out)


if __name__ == "__main__":
    main()
