"""Decode-time linear layers: decoding::gemv (and the fused gate/up SiLU GEMV) against cuBLAS (F.linear),
reported as achieved weight bandwidth.

    pytest benches/bench_gemv.py --benchmark-columns=median        # pytest-benchmark suite
    python benches/bench_gemv.py                                   # one table, plus the copy bandwidth
    python benches/bench_gemv.py --graph                           # kernel times in CUDA graphs, A/B

Weights rotate over enough copies to exceed the 50 MB L2, so each call reads its matrix from HBM; each
round launches REPS calls back to back and synchronises once. Skips without CUDA.

Eager calls measure Python's launch rate on the small 1B matrices (~5 us a call), not the kernels.
`--graph` captures one call per weight copy (>= 512 MB of copies) in a CUDA graph and reports the median
replay time per call (benches/int8_timing.py), for the 1B and 8B projections at M = 1, 2:
  new    the default kernel choice (split-K for small matrices, csrc/cuda/gemv.cu)
  old    DECODING_GEMV_SPLIT=0: the row-parallel kernel everywhere
  force  DECODING_GEMV_SPLIT=force: the split-K kernel wherever it launches
  nopdl  the default choice with DECODING_PDL=0: consecutive calls in the graph no longer overlap, as
         cuBLAS's do not (the decode step's kernels trigger their dependents early, so it runs with PDL)
  cuBLAS F.linear (and silu_and_mul for gate_up)
  t64, t128, t256 (with --sweep) DECODING_GEMV_SPLIT=64|128|256: the split kernel on every shape with
         that many threads a block, to tune the choice in csrc/cuda/gemv.cu (pick_split_threads)
Both switches are read once per process, so each GEMV setting runs in a subprocess of this script; the
copy bandwidth and cuBLAS are measured in the parent, in the same run.

    python benches/bench_gemv.py --int8 [--sweep]                 # W8A16 GEMV (csrc/cuda/int8_gemv.cu)

The same graph timing for the int8 weights of the 8B and 1B projections (per-channel scales; gate_up is
the fused SiLU GEMV), at M = 1, 2, against our bf16 GEMV on the same shape (the decode path int8 replaces):
  new    the default block sizes (from the weight's shape, DECODING_INT8_GEMV_SPLIT unset)
  old    the path before them: DECODING_INT8_GEMV_SPLIT=legacy (launch shapes by M), DECODING_PDL=0, and
         gate_up as the plain GEMV then silu_and_mul
  rows   DECODING_INT8_GEMV_SPLIT=0: one warp a block, each warp owning its rows (row-parallel)
  nopdl  the default block sizes with DECODING_PDL=0
  t64, t128, t256 (with --sweep) DECODING_INT8_GEMV_SPLIT=64|128|256 on every shape, to tune pick_threads
int8 GB/s counts the int8 weights and their fp32 scales; bf16 GB/s the bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_timing import copies_for, random_int8_weights, random_weights, time_rotating

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPS = 50
# (name, N, K): the Llama-3-8B and 3.2-1B decode projections (gate_up is the fused [2I, K] matrix).
SHAPES = [("8b.qkv", 6144, 4096), ("8b.o", 4096, 4096), ("8b.gate_up", 28672, 4096), ("8b.down", 4096, 14336),
          ("1b.qkv", 3072, 2048), ("1b.o", 2048, 2048), ("1b.gate_up", 16384, 2048), ("1b.down", 2048, 8192),
          ("1b.lm_head", 128256, 2048)]
ROWS = [1, 2, 4, 8]


def _weights(n: int, k: int) -> list[torch.Tensor]:
    copies = max(2, -(-(160 << 20) // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


def time_per_call(fn, weights: list[torch.Tensor], reps: int = REPS) -> float:
    """Median seconds per call over 10 rounds of `reps` calls rotating through `weights`."""
    times = []
    for r in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fn(weights[i % len(weights)])
        end.record()
        torch.cuda.synchronize()
        if r >= 2:
            times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def _fns(kind: str, x: torch.Tensor):
    if kind == "gemv":
        return lambda w: ops._IMPLS["linear"]["cuda"](x, w)
    if kind == "gemv_silu_mul":
        return lambda w: ops._IMPLS["linear_silu_mul"]["cuda"](x, w)
    if kind == "cublas_silu_mul":
        return lambda w: ops.silu_and_mul(torch.nn.functional.linear(x, w))
    return lambda w: torch.nn.functional.linear(x, w)


@pytest.mark.parametrize("kind", ["gemv", "cublas"])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_linear(benchmark, shape, m, kind):
    if kind == "gemv" and "cuda" not in ops._IMPLS["linear"]:
        pytest.skip("extension without CUDA kernels")
    _name, n, k = shape
    weights = _weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fn = _fns(kind, x)
    benchmark.pedantic(lambda: time_per_call(fn, weights, 10), rounds=3, warmup_rounds=1)
    t = time_per_call(fn, weights)
    benchmark.extra_info["us_per_call"] = t * 1e6
    benchmark.extra_info["GB/s"] = n * k * 2 / t / 1e9


GRAPH_ROWS = [1, 2]
# label -> environment changes for a subprocess; None deletes the variable.
GRAPH_RUNS = {
    "new": {"DECODING_GEMV_SPLIT": None, "DECODING_PDL": None},
    "old": {"DECODING_GEMV_SPLIT": "0", "DECODING_PDL": None},
    "force": {"DECODING_GEMV_SPLIT": "force", "DECODING_PDL": None},
    "nopdl": {"DECODING_GEMV_SPLIT": None, "DECODING_PDL": "0"},
}
# --sweep: the split kernel everywhere with a fixed block size, to tune pick_split_threads.
SWEEP_RUNS = {f"t{n}": {"DECODING_GEMV_SPLIT": str(n), "DECODING_PDL": None} for n in (64, 128, 256)}


def _graph_kind(name: str, ours: bool) -> str:
    glu = name.endswith("gate_up")
    if ours:
        return "gemv_silu_mul" if glu else "gemv"
    return "cublas_silu_mul" if glu else "cublas"


def _kernel_kind(fn, w: torch.Tensor) -> str:
    """Which GEMV kernel one call ran, from the profiler: split (split-K) or rows (row-parallel)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(w)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return "split" if any("gemv_split_kernel" in n for n in names) else "rows"


def graph_times(ours: bool, names: bool = False) -> dict[str, list]:
    """{"shape/M": [seconds per call, kernel]} for every shape and GRAPH_ROWS, each call on its own copy;
    the kernel is read from the profiler when `names`, else "-"."""
    results = {}
    for name, n, k in SHAPES:
        weights = random_weights(n, k, copies_for(n * k * 2))
        rotation = [weights[i % len(weights)] for i in range(max(len(weights), 8))]
        for m in GRAPH_ROWS:
            fn = _fns(_graph_kind(name, ours), torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            seconds = time_rotating([lambda w=w, fn=fn: fn(w) for w in rotation])
            results[f"{name}/{m}"] = [seconds, _kernel_kind(fn, weights[0]) if names else "-"]
        del weights, rotation
        torch.cuda.empty_cache()
    return results


def _run_child(changes: dict[str, str | None], names: bool, extra: tuple[str, ...] = ()) -> dict[str, list] | None:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    command = [sys.executable, __file__, "--graph-child", *(["--kernel-names"] if names else []), *extra]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        print(f"subprocess {changes} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _speedup(t: dict[str, float], a: str, b: str) -> str:
    return f"{t[b] / t[a]:.2f}x" if a in t and b in t else "-"


def graph_main(sweep: bool = False) -> None:
    from decoding.bench import copy_bandwidth_gbps

    copy = copy_bandwidth_gbps("cuda")
    runs = {"cuBLAS": graph_times(ours=False)}
    torch.cuda.empty_cache()
    children = {**GRAPH_RUNS, **(SWEEP_RUNS if sweep else {})}
    for label, changes in children.items():
        runs[label] = _run_child(changes, names=label == "new")
    runs = {label: r for label, r in runs.items() if r is not None}
    labels = [label for label in [*children, "cuBLAS"] if label in runs]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (same run). Per call in a CUDA graph, "
          f"weights rotated over >= 512 MB: us, weight GB/s. kernel: what `new` ran (split-K or row-parallel).")
    head = "".join(f"{label:>14}" for label in labels)
    print(f"{'shape':<12} {'M':>1} {'kernel':>6} {head}  {'new/old':>7} {'new/cuBLAS':>10} {'new % copy':>10}")
    for name, n, k in SHAPES:
        gb = n * k * 2 / 1e9
        for m in GRAPH_ROWS:
            key = f"{name}/{m}"
            cells = "".join(f"{runs[label][key][0] * 1e6:7.2f} {gb / runs[label][key][0]:5.0f} " for label in labels)
            t = {label: runs[label][key][0] for label in labels}
            kernel = runs["new"][key][1] if "new" in runs else "?"
            pct = f"{100 * gb / t['new'] / copy:.0f}%" if "new" in t else "-"
            print(f"{name:<12} {m:>1} {kernel:>6} {cells} {_speedup(t, 'new', 'old'):>7} "
                  f"{_speedup(t, 'new', 'cuBLAS'):>10} {pct:>10}")


# ----------------------------------------------------------------------------- W8A16 (--int8)
INT8_SHAPES = [shape for shape in SHAPES if not shape[0].endswith("lm_head")]  # the LM head stays bf16
INT8_RUNS = {
    "new": ({"DECODING_INT8_GEMV_SPLIT": None, "DECODING_PDL": None}, ()),
    "old": ({"DECODING_INT8_GEMV_SPLIT": "legacy", "DECODING_PDL": "0"}, ("--unfused",)),
    "rows": ({"DECODING_INT8_GEMV_SPLIT": "0", "DECODING_PDL": None}, ()),
    "nopdl": ({"DECODING_INT8_GEMV_SPLIT": None, "DECODING_PDL": "0"}, ()),
}
INT8_SWEEP_RUNS = {f"t{n}": ({"DECODING_INT8_GEMV_SPLIT": str(n), "DECODING_PDL": None}, ()) for n in (64, 128, 256)}


def _int8_fn(glu: bool, unfused: bool, x: torch.Tensor):
    if glu and unfused:
        return lambda w: ops.silu_and_mul(ops._IMPLS["w8a16_linear"]["cuda"](x, *w))
    return lambda w: ops._IMPLS["w8a16_linear_silu_mul" if glu else "w8a16_linear"]["cuda"](x, *w)


def int8_graph_times(unfused: bool = False) -> dict[str, list]:
    """{"shape/M": [seconds per call, "-"]} of the W8A16 GEMV (gate_up: fused with its SiLU, or unfused)."""
    results = {}
    for name, n, k in INT8_SHAPES:
        weights = random_int8_weights(n, k, copies_for(n * k))
        rotation = [weights[i % len(weights)] for i in range(max(len(weights), 8))]
        for m in GRAPH_ROWS:
            fn = _int8_fn(name.endswith("gate_up"), unfused, torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            results[f"{name}/{m}"] = [time_rotating([lambda w=w, fn=fn: fn(w) for w in rotation]), "-"]
        del weights, rotation
        torch.cuda.empty_cache()
    return results


def int8_main(sweep: bool = False) -> None:
    from decoding.bench import copy_bandwidth_gbps

    if "cuda" not in ops._IMPLS["w8a16_linear_silu_mul"]:
        raise SystemExit("this build has no CUDA W8A16 GEMV (decoding._C without w8a16_gemv_silu_mul)")
    copy = copy_bandwidth_gbps("cuda")
    bf16 = {key: value[0] for key, value in graph_times(ours=True).items()}  # this process: default settings
    torch.cuda.empty_cache()
    children = {**INT8_RUNS, **(INT8_SWEEP_RUNS if sweep else {})}
    runs = {label: _run_child(changes, False, ("--int8", *extra)) for label, (changes, extra) in children.items()}
    runs = {label: {key: value[0] for key, value in r.items()} for label, r in runs.items() if r is not None}
    labels = list(runs)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s (same run). W8A16 GEMV per call in a CUDA "
          f"graph, weights rotated over >= 512 MB: us, GB/s (int8 weights + fp32 scales). bf16: our bf16 GEMV.")
    head = "".join(f"{label:>14}" for label in [*labels, "bf16"])
    print(f"{'shape':<12} {'M':>1} {head}  {'new % copy':>10} {'old/new':>7} {'rows/new':>8} {'bf16/new':>8}")
    for name, n, k in INT8_SHAPES:
        gb8, gb16 = (n * k + 4 * n) / 1e9, n * k * 2 / 1e9
        for m in GRAPH_ROWS:
            key = f"{name}/{m}"
            t = {label: runs[label][key] for label in labels}
            cells = "".join(f"{t[label] * 1e6:7.2f} {gb8 / t[label]:5.0f} " for label in labels)
            cells += f"{bf16[key] * 1e6:7.2f} {gb16 / bf16[key]:5.0f} "
            t["bf16"] = bf16[key]
            pct = f"{100 * gb8 / t['new'] / copy:.0f}%" if "new" in t else "-"
            print(f"{name:<12} {m:>1} {cells} {pct:>10} {_speedup(t, 'new', 'old'):>7} {_speedup(t, 'new', 'rows'):>8} "
                  f"{_speedup(t, 'new', 'bf16'):>8}")
    if "new" in runs:  # one decoder layer's four projections at M = 1, as the decode step runs them
        for model in ("8b", "1b"):
            keys = [f"{name}/1" for name, _, _ in INT8_SHAPES if name.startswith(model)]
            new, ref = sum(runs["new"][key] for key in keys), sum(bf16[key] for key in keys)
            old = sum(runs["old"][key] for key in keys) if "old" in runs else float("nan")
            print(f"{model} layer, M=1: int8 new {new * 1e6:.1f} us, old {old * 1e6:.1f} us, bf16 {ref * 1e6:.1f} us: "
                  f"{ref / new:.2f}x bf16, {old / new:.2f}x old")


def main() -> None:
    from decoding.bench import copy_bandwidth_gbps

    copy = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy:.0f} GB/s; weight GB/s (% of copy), "
          f"ours / cuBLAS")
    for name, n, k in SHAPES:
        weights = _weights(n, k)
        row = []
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            glu = name.endswith("gate_up")
            ours = time_per_call(_fns("gemv_silu_mul" if glu else "gemv", x), weights)
            ref = time_per_call(_fns("cublas_silu_mul" if glu else "cublas", x), weights)
            gb = n * k * 2 / 1e9
            row.append(f"M={m}: {gb / ours:5.0f} ({100 * gb / ours / copy * 1e9 / 1e9:3.0f}%) / {gb / ref:5.0f}")
        print(f"  {name:<12} " + "  ".join(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", action="store_true", help="kernel times in CUDA graphs: new/old/force/nopdl/cuBLAS")
    parser.add_argument("--sweep", action="store_true", help="with --graph: also the split kernel at 64/128/256 "
                        "threads a block on every shape (DECODING_GEMV_SPLIT=64|128|256)")
    parser.add_argument("--int8", action="store_true", help="the W8A16 GEMV in CUDA graphs: new/old/rows/nopdl and "
                        "our bf16 GEMV (--sweep: also 64/128/256 threads a block, DECODING_INT8_GEMV_SPLIT)")
    parser.add_argument("--graph-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kernel-names", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unfused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.graph_child:
        times = int8_graph_times(args.unfused) if args.int8 else graph_times(ours=True, names=args.kernel_names)
        print(json.dumps(times))
    elif args.int8:
        int8_main(args.sweep)
    elif args.graph:
        graph_main(args.sweep)
    else:
        main()
