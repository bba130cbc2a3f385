"""`python -m decoding bench --serve`: an in-process load generator for continuous batching.

N requests with prompt and output lengths drawn uniformly from ranges, arriving as a Poisson process at
a given rate (or all at once), over a random-weight model shape. Reports throughput, time to first
token and inter-token latency percentiles (exact, from every token's timestamp), and, measured in the
same process: the decode step time of one request alone (the inter-token latency floor) and, with
--static-baseline, the same requests in static batches of 32 (admitted together, none added until
all of them finish; with a token budget of at least 512, the default, whatever the continuous run's), as
the throughput ratio the issue asks for. Each run prints the engine's step log
per step kind (decoding/steplog.py); --profile FILE records a window of steps of the continuous run with
torch.profiler (a chrome trace, and the top 25 kernels by device time printed).
"""

from __future__ import annotations

import gc
import json
import math
import queue
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from decoding.sampling.params import SamplingParams
from decoding.steplog import format_summary, format_top

STATIC_BATCH = 32
STATIC_MIN_TOKENS = 512  # SchedulerConfig's default max_num_batched_tokens: the static baseline's least


@dataclass
class Workload:
    arrivals: list[float]  # seconds after the start
    prompts: list[str]
    max_tokens: list[int]


@dataclass
class ServeResult:
    mode: str
    requests: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float
    total_tok_s: float
    requests_per_s: float
    ttft_ms: dict
    itl_ms: dict
    preemptions: int
    prefix_cache_hit_rate: float
    steps: dict | None = None
    """The engine's step log summary per step kind (decoding.steplog.StepLog.summary)."""
    profile: dict | None = None
    """With --profile: the profiled window's steps and its top kernels (StepLog.profile_result)."""
    gc_pauses: dict | None = None
    """Python's cyclic garbage collections during the run, per generation: count, total and max pause ms."""
    trace: dict | None = None
    """With --step-trace: every step's record (StepLog.trace)."""


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' (or 'A') -> (A, B), 1 <= A <= B."""
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"a range must be A:B with 1 <= A <= B, got {text!r}")
    return lo, hi


def make_workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], rate: float, vocab: int,
                  seed: int = 0) -> Workload:
    """Random prompts of placeholder-tokenizer words "<id>" (one token each) and Poisson arrivals."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        arrivals.append(t)
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    prompts = [" ".join(f"<{rng.randrange(vocab)}>" for _ in range(rng.randint(*prompt_len))) for _ in range(n)]
    return Workload(arrivals, prompts, [rng.randint(*output_len) for _ in range(n)])


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98], "mean": statistics.fmean(values)}


class GcPauses:
    """Times Python's garbage collections (any thread's) while installed: gc.callbacks."""

    def __init__(self) -> None:
        self.stats = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)}
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            ms = (time.perf_counter() - self._t) * 1e3
            st = self.stats[info["generation"]]
            st["count"] += 1
            st["total_ms"] += ms
            st["max_ms"] = max(st["max_ms"], ms)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def run_load(gen, work: Workload, params: SamplingParams, mode: str, progress: bool = True,
             profile: str | None = None, profile_steps: int = 30, trace: bool = False) -> ServeResult:
    """Submit the workload at its arrival times (a driver thread) and wait for every request; the engine
    logs its steps meanwhile. With `profile` (a file name), torch.profiler records `profile_steps` steps
    from the one after half of the requests have finished, into a chrome trace there."""
    handles: queue.SimpleQueue = queue.SimpleQueue()
    before = gen.metrics()
    engine = gen.engine
    log = engine.record_steps()
    if profile:
        finished = engine.metrics.requests_finished
        log.profile(profile, profile_steps, lambda: engine.metrics.requests_finished - finished >= len(work.prompts) // 2)

    def driver() -> None:
        t0 = time.perf_counter()
        for arrival, prompt, max_tokens in zip(work.arrivals, work.prompts, work.max_tokens):
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            handles.put(gen.submit(prompt, params.replace(max_tokens=max_tokens)))

    start = time.perf_counter()
    thread = threading.Thread(target=driver, daemon=True)
    ttft, itl, out_tokens, prompt_tokens = [], [], 0, 0
    end = start
    with GcPauses() as pauses:
        thread.start()
        for _ in tqdm(range(len(work.prompts)), desc=mode, unit="req", disable=not progress):
            handle = handles.get()
            out = handle.result()
            req = handle._request
            times = req.seqs[0].token_times
            end = max(end, times[-1] if times else time.perf_counter())
            ttft.append((times[0] - req.t_arrival) * 1e3)
            itl.extend((b - a) * 1e3 for a, b in zip(times, times[1:]))
            out_tokens += len(out.token_ids)
            prompt_tokens += len(out.prompt_token_ids)
        thread.join()
    if profile:
        engine.call(lambda e: log.stop_profile())  # on the engine thread, which started it
    engine.step_log = None
    after = gen.metrics()
    duration = end - start
    queried = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    hit = 1.0 - (after["prefill_tokens_total"] - before["prefill_tokens_total"]) / queried if queried else 0.0
    return ServeResult(mode, len(work.prompts), duration, prompt_tokens, out_tokens, out_tokens / duration,
                       (out_tokens + prompt_tokens) / duration, len(work.prompts) / duration,
                       percentiles(ttft), percentiles(itl),
                       after["preemptions_total"] - before["preemptions_total"], max(0.0, hit), log.summary(),
                       log.profile_result, pauses.stats, log.trace() if trace else None)


def batch1_step_ms(gen, vocab: int, prompt: int = 128, new: int = 64) -> float:
    """Median decode step of one request alone (the inter-token latency floor)."""
    rng = random.Random(1)
    text = " ".join(f"<{rng.randrange(vocab)}>" for _ in range(prompt))
    handle = gen.submit(text, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, cycle_min_repeats=0))
    handle.result()
    times = handle._request.seqs[0].token_times
    return statistics.median(b - a for a, b in zip(times, times[1:])) * 1e3


def main(args) -> None:
    from decoding.bench import preset_config, random_generator
    from decoding.generator import resolve_device_dtype

    dev, dt = resolve_device_dtype(args.device, args.dtype)
    config = preset_config(args.shape)
    options = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                 ("max_num_batched_tokens", args.max_num_batched_tokens),
                                 ("gpu_memory_utilization", args.gpu_memory_utilization),
                                 ("num_kv_blocks", args.num_kv_blocks),
                                 ("context_cost", args.context_cost)) if v is not None}
    gen = random_generator(config, dev, dt, **options)
    work = make_workload(args.requests, parse_range(args.prompt_len), parse_range(args.output_len), args.rate,
                         config.vocab_size, args.seed)
    params = SamplingParams(temperature=args.temperature, seed=args.seed if args.temperature else None,
                            ignore_eos=True, cycle_min_repeats=0)
    gen.generate(work.prompts[0], params.replace(max_tokens=4))  # warm-up: kernels compiled, cache allocated
    cfg = gen.engine.config
    t0 = time.perf_counter()  # mixed-step graphs captured before the run, not by its first steps
    captured = gen.engine.call(lambda e: e.runner.capture_mixed_graphs(cfg.max_num_batched_tokens, cfg.max_num_seqs))
    if captured:
        print(f"  captured {captured} mixed-step CUDA graphs in {time.perf_counter() - t0:.1f} s")
    step_ms = batch1_step_ms(gen, config.vocab_size)
    pool = gen.runner.cache.pool
    pool.clear_cache()  # each run starts with no cached prefix
    print(f"{str(dev) if dev.type == 'cpu' else torch.cuda.get_device_name(dev)} {str(dt).removeprefix('torch.')}: "
          f"{args.shape}, {args.requests} requests, rate {args.rate}/s, prompt {args.prompt_len}, output "
          f"{args.output_len}; KV pool {pool.num_blocks} blocks of {gen.block_size} tokens, max_num_seqs "
          f"{gen.engine.config.max_num_seqs}, max_num_batched_tokens {gen.engine.config.max_num_batched_tokens}, "
          f"context_cost {gen.engine.config.context_cost}")
    print(f"  batch-1 decode step: {step_ms:.2f} ms")
    results = [run_load(gen, work, params, "continuous", args.progress, args.profile, args.profile_steps,
                        args.step_trace is not None)]
    if args.static_baseline:
        # A smaller token budget than the default chunks a static batch's prefill finer, which only slows
        # the baseline down: it gets at least the default's (its graphs captured ahead, as above).
        budget = cfg.max_num_batched_tokens
        cfg.max_num_batched_tokens = max(budget, STATIC_MIN_TOKENS)
        gen.engine.call(lambda e: e.runner.capture_mixed_graphs(cfg.max_num_batched_tokens, cfg.max_num_seqs))
        pool.clear_cache()  # the baseline starts as cold as the continuous run did
        cfg.static_batch_size = STATIC_BATCH
        results.append(run_load(gen, work, params, f"static batches of {STATIC_BATCH} (max_num_batched_tokens "
                                f"{cfg.max_num_batched_tokens})", args.progress))
        cfg.static_batch_size, cfg.max_num_batched_tokens = None, budget
    for r in results:
        print(f"  {r.mode}: {r.requests} requests in {r.duration_s:.1f} s: {r.output_tok_s:.0f} output tok/s "
              f"({r.total_tok_s:.0f} with prompts), {r.requests_per_s:.2f} req/s, {r.preemptions} preemptions, "
              f"prefix-cache hits {100 * r.prefix_cache_hit_rate:.1f}%")
        print(f"    TTFT ms p50 {r.ttft_ms['p50']:.1f} / p90 {r.ttft_ms['p90']:.1f} / p99 {r.ttft_ms['p99']:.1f}; "
              f"inter-token ms p50 {r.itl_ms['p50']:.2f} / p90 {r.itl_ms['p90']:.2f} / p99 {r.itl_ms['p99']:.2f} "
              f"(p99 = {r.itl_ms['p99'] / step_ms:.2f}x the batch-1 step)")
        print("    steps (launch interval: from this step's launch to the next one's; sched/issue: host time to\n"
              "    schedule and build the step, then to issue it and its sampling; GPU: device time from the step's\n"
              "    first to last kernel, and idle: device time waiting for the host before the step, on CUDA):")
        print(format_summary(r.steps))
        print("    Python GC pauses: " + "; ".join(
            f"gen {g}: {st['count']}x, {st['total_ms']:.1f} ms, max {st['max_ms']:.2f}" for g, st in r.gc_pauses.items()))
        if r.profile is not None:
            print(format_top(r.profile))
        elif args.profile and r.mode == "continuous":
            print("  profile: the window (after half of the requests finished) was never reached")
    report = {"shape": args.shape, "device": str(dev), "dtype": str(dt).removeprefix("torch."),
              "batch1_step_ms": step_ms, "kv_blocks": pool.num_blocks,
              "results": [{k: v for k, v in asdict(r).items() if k != "trace"} for r in results]}
    if len(results) == 2:
        ratio = results[0].output_tok_s / results[1].output_tok_s
        report["continuous_over_static"] = ratio
        print(f"  continuous / static throughput: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.step_trace:
        with open(args.step_trace, "w") as f:
            json.dump({r.mode: r.trace for r in results if r.trace is not None}, f)
    gen.close()
