"""One layer's attention of a mixed (prefill + decode) serving step on the GPU: the one-launch Triton
prefill kernel against the old loop of SDPA calls, on the Llama-3-8B attention shape (32 q heads, 8 KV
heads, head_dim 128, bf16, KV blocks of 16 tokens as the engine's default).

    python benches/bench_prefill_attention.py [--json FILE] [--sweep]

Scenarios (cached tokens, new tokens per sequence):
  mixed        64 decodes with 1136..1262 tokens of context, two 256-token chunks after 0 and 1024 cached
               tokens (the serving benchmark's steady state at --max-num-batched-tokens 576)
  prompt-2048  one whole 2048-token prompt
  chunks-4x512 four 512-token chunks after 0, 512, 1024 and 1536 cached tokens

Variants, each timed over REPS back-to-back calls between two CUDA events (median of ROUNDS), with the
host's own time to issue the calls alongside:
  old          the op as it was: .tolist() of the lengths (a sync), decode rows through the split-K
               kernel, one SDPA call per prefill sequence over K/V gathered from the cache (and repeated
               per GQA group for chunks after cached tokens)
  sdpa         the same loop with the host lists (no sync): what is left of the old cost without the syncs
  new          host lists, split-K decode kernel + one launch of the Triton prefill kernel (the default)
  prefill-only the Triton kernel alone on the prefill rows, and "sdpa-prefill-only" the SDPA loop alone
  flash        (prompt-2048) torch SDPA, causal, over contiguous K/V with GQA: a roofline for the kernel
               (no paging, no gather), not something the engine can call on its paged cache
The ratios old / new and sdpa-prefill-only / prefill-only are the figures to read. --sweep also times
the Triton kernel over tile shapes (BLOCK_M rows, BLOCK_N keys, warps, stages) on each scenario, to pick
PREFILL_BLOCK_M/N, PREFILL_WARPS and PREFILL_STAGES in kernels/prefill_attention.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from decoding.kernels import attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
REPS, ROUNDS = 20, 7
SCENARIOS = {
    "mixed": [(1136 + 2 * i, 1) for i in range(64)] + [(0, 256), (1024, 256)],
    "prompt-2048": [(0, 2048)],
    "chunks-4x512": [(0, 512), (512, 512), (1024, 512), (1536, 512)],
}
BOUND = 131072  # the runner's attention bound on the 8B shape (max_position_embeddings): the decode partitioning


class Step:
    """One layer's inputs for a list of (cached, new) sequences: q, paged K/V (blocks scattered), metadata."""

    def __init__(self, chunks: list[tuple[int, int]], dtype: torch.dtype = torch.bfloat16) -> None:
        g = torch.Generator(device="cuda").manual_seed(0)
        self.seq_lens = [c + n for c, n in chunks]
        self.starts = [0]
        for _, n in chunks:
            self.starts.append(self.starts[-1] + n)
        need = [-(-n // BLOCK) for n in self.seq_lens]
        perm = torch.randperm(sum(need), device="cuda", generator=g).int()
        width = max(need)
        tables = torch.zeros(len(chunks), width, dtype=torch.int32, device="cuda")
        at = 0
        for b, n in enumerate(need):
            tables[b, :n] = perm[at:at + n]
            at += n
        shape = (sum(need), BLOCK, NUM_KV_HEADS, HEAD_DIM)
        self.k = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
        self.v = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
        qkv = torch.randn(self.starts[-1], (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda", dtype=dtype,
                          generator=g)
        self.q = qkv[:, : NUM_HEADS * HEAD_DIM].view(-1, NUM_HEADS, HEAD_DIM)
        self.tables = tables
        self.lens = torch.tensor(self.seq_lens, dtype=torch.int32, device="cuda")
        self.starts_dev = torch.tensor(self.starts, dtype=torch.int32, device="cuda")
        self.scale = HEAD_DIM ** -0.5
        self.prefill = [b for b, (_, n) in enumerate(chunks) if n > 1]
        self.has_decodes = len(self.prefill) < len(chunks)

    def op(self, host_lists: bool):
        lists = (self.starts, self.seq_lens) if host_lists else (None, None)
        return attention.paged_attention(self.q, self.k, self.v, self.tables, self.lens, self.starts_dev, self.scale,
                                         None, BOUND, *lists)

    def kernel(self, **tile):
        return attention.paged_prefill_attention(self.q, self.k, self.v, self.tables, self.lens, self.starts_dev,
                                                 self.scale, None, min_query=2 if self.has_decodes else 1, **tile)

    def sdpa_loop(self):
        out = torch.empty_like(self.q)
        attention.prefill_attention_sdpa(self.q, self.k, self.v, self.tables, self.scale, None, self.starts,
                                         self.seq_lens, self.prefill, out)
        return out

    def flash(self):
        """Causal SDPA of the first sequence over contiguous K/V (prompt scenarios only)."""
        n = self.seq_lens[0]
        if not hasattr(self, "_kv"):
            blocks = self.tables[0, : -(-n // BLOCK)].long()
            self._kv = [c[blocks].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:n].transpose(0, 1).contiguous()
                        for c in (self.k, self.v)]
        q = self.q[:n].transpose(0, 1)
        return F.scaled_dot_product_attention(q, *self._kv, is_causal=True, scale=self.scale, enable_gqa=True)

    def flops(self, rows: list[int]) -> float:
        """Useful q.k and p.v FLOPs of the given sequences (causal: a query at position p sees p + 1 keys)."""
        total = 0
        for b in rows:
            n, L = self.starts[b + 1] - self.starts[b], self.seq_lens[b]
            keys = n * (L - n) + n * (n + 1) // 2
            total += 4 * keys * NUM_HEADS * HEAD_DIM
        return float(total)


def time_call(fn, reps: int = REPS, rounds: int = ROUNDS) -> tuple[float, float]:
    """(GPU ms per call, host ms per call to issue it): median over rounds of reps calls between events."""
    fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / reps)
        host.append((t1 - t0) * 1e3 / reps)
    return statistics.median(gpu), statistics.median(host)


def check(step: Step) -> float:
    """Largest difference between the new op and the old SDPA path on this step (both bf16)."""
    os.environ["DECODING_PREFILL_ATTENTION"] = "sdpa"
    old = step.op(host_lists=True).float()
    os.environ["DECODING_PREFILL_ATTENTION"] = "triton"
    return (step.op(host_lists=True).float() - old).abs().max().item()


def run_scenario(name: str, sweep: bool) -> dict:
    step = Step(SCENARIOS[name])
    res: dict = {"scenario": name, "chunks": SCENARIOS[name], "max_abs_diff_new_vs_sdpa": check(step)}
    os.environ["DECODING_PREFILL_ATTENTION"] = "sdpa"
    res["old"] = time_call(lambda: step.op(host_lists=False))
    res["sdpa"] = time_call(lambda: step.op(host_lists=True))
    os.environ["DECODING_PREFILL_ATTENTION"] = "triton"
    res["new"] = time_call(lambda: step.op(host_lists=True))
    res["prefill-only"] = time_call(step.kernel)
    res["sdpa-prefill-only"] = time_call(step.sdpa_loop)
    if not step.has_decodes and len(step.prefill) == 1:
        res["flash"] = time_call(step.flash)
    res["prefill_tflops"] = step.flops(step.prefill) / (res["prefill-only"][0] * 1e-3) / 1e12
    res["old_over_new"] = res["old"][0] / res["new"][0]
    res["sdpa_prefill_over_kernel"] = res["sdpa-prefill-only"][0] / res["prefill-only"][0]
    if sweep:
        res["sweep"] = []
        for bm, bn, warps, stages in itertools.product((32, 64, 128), (32, 64), (4, 8), (2, 3)):
            tile = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
            try:
                ms = time_call(lambda tile=tile: step.kernel(**tile))[0]
            except (RuntimeError, OutOfResources) as e:  # e.g. out of shared memory for the largest tiles
                ms = None
                tile["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            res["sweep"].append({**tile, "ms": ms})
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel over tile shapes")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="default: all")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}: one layer, {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
          f"bf16, blocks of {BLOCK}; tiles BLOCK_M {attention.PREFILL_BLOCK_M}, BLOCK_N {attention.PREFILL_BLOCK_N}, "
          f"warps {attention.PREFILL_WARPS}, stages {attention.PREFILL_STAGES}")
    results = []
    with torch.inference_mode():
        for name in args.scenario or list(SCENARIOS):
            r = run_scenario(name, args.sweep)
            results.append(r)
            print(f"\n{name}: new vs SDPA path max |diff| {r['max_abs_diff_new_vs_sdpa']:.3g}")
            print(f"  {'variant':<20}{'GPU ms/call':>12}{'host ms/call':>14}")
            for key in ("old", "sdpa", "new", "prefill-only", "sdpa-prefill-only", "flash"):
                if key in r:
                    print(f"  {key:<20}{r[key][0]:>12.3f}{r[key][1]:>14.3f}")
            print(f"  old / new: {r['old_over_new']:.2f}x; SDPA loop / kernel (prefill rows): "
                  f"{r['sdpa_prefill_over_kernel']:.2f}x; kernel {r['prefill_tflops']:.0f} TFLOP/s on the prefill rows")
            if "flash" in r:
                print(f"  kernel / flash SDPA on contiguous K/V: {r['prefill-only'][0] / r['flash'][0]:.2f}x the time")
            if "sweep" in r:
                ok = sorted((s for s in r["sweep"] if s["ms"] is not None), key=lambda s: s["ms"])
                print("  sweep, fastest first (block_m, block_n, warps, stages: ms):")
                for s in ok[:8]:
                    print(f"    {s['block_m']:>4} {s['block_n']:>4} {s['num_warps']:>2} {s['num_stages']}: {s['ms']:.3f}")
                failed = [s for s in r["sweep"] if s["ms"] is None]
                if failed:
                    print(f"    {len(failed)} shapes failed, e.g. {failed[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
