"""An optional log of the engine's steps: where serving time goes (`bench --serve` prints its summary).

Off by default: the engine holds `step_log = None` and pays one `is not None` test a step. Turned on
(`Engine.record_steps()`), each step appends a StepRecord to a bounded deque: host timestamps (before
scheduling, at the launch of the model step, once the step and its sampling are issued), the step's shape
(decode rows, prefill tokens and sequences, whether it replayed a decode graph) and, on CUDA, two timing
events around the step on the device, read only when the summary is made (no sync during the run).

Step kinds: "decode-graphed" (a CUDA-graph replay), "decode-eager" (one token per sequence, no graph),
"mixed" (decode rows next to prefill chunks: continuous batching), "prefill" (prefill chunks only).

The log can also run torch.profiler over a window of steps (`profile`): it starts at the first step for
which `start_when()` is true, stops `num_steps` steps later (or at `stop_profile`), exports a chrome trace
and keeps the top kernels by device time (CPU ops by CPU time without CUDA).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("decode-graphed", "decode-eager", "mixed", "prefill")


@dataclass(slots=True)
class StepRecord:
    t_schedule: float
    """perf_counter() before the scheduler ran for this step."""
    t_launch: float
    """... when the step was handed to the runner."""
    t_issued: float
    """... once the model step and its sampling were issued (on CUDA: queued, not finished)."""
    decode_rows: int
    prefill_tokens: int
    prefill_seqs: int
    decode_context: int
    """Tokens of context the decode rows' attention reads (their lengths, summed): their K/V traffic."""
    graphed: bool
    t_waited: float = 0.0
    """... once the previous step's tokens were on the host (the engine waited for them after issuing this step)."""
    t_accepted: float = 0.0
    """... once those tokens were handed to their sequences (stops checked, finished requests retired)."""
    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None

    @property
    def kind(self) -> str:
        if self.prefill_seqs == 0:
            return "decode-graphed" if self.graphed else "decode-eager"
        return "mixed" if self.decode_rows else "prefill"


class StepLog:
    """Bounded per-step records (the newest `capacity`), see the module docstring."""

    def __init__(self, capacity: int = 100_000, cuda: bool = False) -> None:
        self.records: deque[StepRecord] = deque(maxlen=capacity)
        self.cuda = cuda
        self._profiler = None
        self._profile: tuple[str, int, Callable[[], bool]] | None = None
        self._profiled = 0
        self.profile_result: dict | None = None

    # ------------------------------------------------------------------ the engine thread
    def begin(self, t_schedule: float, decode_rows: int, prefill_tokens: int, prefill_seqs: int,
              decode_context: int, graphed: bool) -> StepRecord:
        """A step is about to be handed to the runner (call right before runner.step)."""
        if self._profile is not None:
            self._profile_tick()
        rec = StepRecord(t_schedule, time.perf_counter(), 0.0, decode_rows, prefill_tokens, prefill_seqs,
                         decode_context, graphed)
        if self.cuda:
            rec.start = torch.cuda.Event(enable_timing=True)
            rec.start.record()
        return rec

    def end(self, rec: StepRecord) -> None:
        """The step and its sampling are issued."""
        if rec.start is not None:
            rec.end = torch.cuda.Event(enable_timing=True)
            rec.end.record()
        rec.t_issued = rec.t_waited = rec.t_accepted = time.perf_counter()
        self.records.append(rec)
        if self._profiler is not None:
            self._profiled += 1

    def profile(self, path: str, num_steps: int, start_when: Callable[[], bool]) -> None:
        """Profile `num_steps` steps from the first one for which start_when() holds (engine thread)."""
        self._profile = (path, num_steps, start_when)

    def _profile_tick(self) -> None:
        _, num_steps, start_when = self._profile
        if self._profiler is None and start_when():
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._profiled = 0
        elif self._profiler is not None and self._profiled >= num_steps:
            self.stop_profile()

    def stop_profile(self) -> None:
        """Stop a running profile (on the thread that started it): export the trace, keep the top kernels."""
        prof, self._profiler = self._profiler, None
        if prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof.stop()
        path = self._profile[0]
        self._profile = None
        prof.export_chrome_trace(path)
        records = list(self.records)[-self._profiled:] if self._profiled else []
        kinds = {k: sum(1 for r in records if r.kind == k) for k in KINDS}
        self.profile_result = {"trace": path, "steps": len(records), "kinds": kinds,
                               "top": top_ops(prof, 25, self.cuda)}

    # ------------------------------------------------------------------ after the run
    TRACE_COLUMNS = ("t_schedule", "t_launch", "t_issued", "t_waited", "t_accepted", "gpu_start_ms", "gpu_ms",
                     "decode_rows", "prefill_tokens", "prefill_seqs", "decode_context", "graphed")

    def trace(self) -> dict:
        """Every record as a row of TRACE_COLUMNS: host times in ms from the first step's t_schedule, the
        device's start in ms from the first step's start event (on CUDA; else None) and its duration."""
        recs = list(self.records)
        if self.cuda and recs:
            torch.cuda.synchronize()
        t0 = recs[0].t_schedule if recs else 0.0
        first = recs[0].start if recs else None
        rows = []
        for r in recs:
            host = [round((t - t0) * 1e3, 4) for t in (r.t_schedule, r.t_launch, r.t_issued, r.t_waited, r.t_accepted)]
            on_gpu = r.start is not None and r.end is not None and first is not None
            gpu = [None, None]
            if on_gpu:
                gpu = [round(first.elapsed_time(r.start), 4), round(r.start.elapsed_time(r.end), 4)]
            rows.append(host + gpu + [r.decode_rows, r.prefill_tokens, r.prefill_seqs, r.decode_context, r.graphed])
        return {"columns": list(self.TRACE_COLUMNS), "rows": rows}

    def summary(self) -> dict[str, dict]:
        """Per step kind (and "all"): steps, wall_s (sum of launch-to-next-launch intervals), interval_ms
        (p50/p90/p99 of those intervals), host_sched_ms and host_issue_ms (p50: scheduling and building the
        step, then issuing it), host_wait_ms and host_accept_ms (percentiles: waiting for the previous
        step's tokens after issuing this one, then handing them to their sequences), means of decode_rows,
        prefill_tokens, prefill_seqs,
        decode_context; on CUDA also gpu_s and
        gpu_ms (percentiles of each step's device time, start to end event) and gpu_idle_before_ms (mean
        device time between the previous step's end and this one's start: waiting for the host)."""
        recs = list(self.records)
        if self.cuda and recs:
            torch.cuda.synchronize()
        groups: dict[str, list[tuple[StepRecord, float | None, float | None, float | None]]] = {}
        for i, r in enumerate(recs):
            interval = recs[i + 1].t_launch - r.t_launch if i + 1 < len(recs) else None
            gpu = r.start.elapsed_time(r.end) if r.start is not None and r.end is not None else None
            idle = None
            if i and gpu is not None and recs[i - 1].end is not None:
                idle = recs[i - 1].end.elapsed_time(r.start)
            for key in (r.kind, "all"):
                groups.setdefault(key, []).append((r, interval, gpu, idle))
        return {k: _stats(groups[k]) for k in (*KINDS, "all") if k in groups}


def _pcts(values: list[float]) -> dict:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    qs = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98]}


def _stats(rows: list) -> dict:
    recs = [r for r, *_ in rows]
    intervals = [iv * 1e3 for _, iv, _, _ in rows if iv is not None]
    out = {
        "steps": len(rows),
        "wall_s": sum(intervals) / 1e3,
        "interval_ms": _pcts(intervals),
        "host_sched_ms": _pcts([(r.t_launch - r.t_schedule) * 1e3 for r in recs])["p50"],
        "host_issue_ms": _pcts([(r.t_issued - r.t_launch) * 1e3 for r in recs])["p50"],
        "host_wait_ms": _pcts([(r.t_waited - r.t_issued) * 1e3 for r in recs]),
        "host_accept_ms": _pcts([(r.t_accepted - r.t_waited) * 1e3 for r in recs]),
        "decode_rows": statistics.fmean(r.decode_rows for r in recs),
        "prefill_tokens": statistics.fmean(r.prefill_tokens for r in recs),
        "prefill_seqs": statistics.fmean(r.prefill_seqs for r in recs),
        "decode_context": statistics.fmean(r.decode_context for r in recs),
    }
    gpu = [g for _, _, g, _ in rows if g is not None]
    if gpu:
        idle = [x for _, _, _, x in rows if x is not None]
        out.update(gpu_s=sum(gpu) / 1e3, gpu_ms=_pcts(gpu), gpu_idle_before_ms=statistics.fmean(idle) if idle else 0.0)
    return out


def format_summary(summary: dict[str, dict]) -> str:
    """The summary as a table, one line per step kind."""
    gpu = any("gpu_ms" in s for s in summary.values())
    head = (f"    {'step kind':<15}{'steps':>7}{'wall s':>8}  {'launch interval ms p50/p90/p99':<31}"
            f"{'sched/issue ms':>15}{'wait p50/p99':>14}{'accept p50/p99':>16}"
            f"{'decodes':>9}{'(ctx)':>7}{'prefill tok':>12}{'(seqs)':>7}")
    if gpu:
        head += f"  {'GPU ms p50/p90/p99':<22}{'GPU s':>7}{'idle ms':>8}"
    lines = [head]
    for kind, s in summary.items():
        iv = s["interval_ms"]
        line = (f"    {kind:<15}{s['steps']:>7}{s['wall_s']:>8.2f}  "
                f"{iv['p50']:>9.2f}/{iv['p90']:>9.2f}/{iv['p99']:>9.2f}  "
                f"{s['host_sched_ms']:>7.2f}/{s['host_issue_ms']:<7.2f}"
                f"{s['host_wait_ms']['p50']:>7.2f}/{s['host_wait_ms']['p99']:<6.2f}"
                f"{s['host_accept_ms']['p50']:>8.2f}/{s['host_accept_ms']['p99']:<7.2f}{s['decode_rows']:>9.1f}"
                f"{s['decode_context'] / max(s['decode_rows'], 1e-9):>7.0f}"
                f"{s['prefill_tokens']:>12.1f}{s['prefill_seqs']:>7.2f}")
        if "gpu_ms" in s:
            g = s["gpu_ms"]
            line += f"  {g['p50']:>6.2f}/{g['p90']:>6.2f}/{g['p99']:>6.2f}  {s['gpu_s']:>7.2f}{s['gpu_idle_before_ms']:>8.3f}"
        lines.append(line)
    return "\n".join(lines)


def top_ops(prof, n: int, cuda: bool) -> list[dict]:
    """The n device kernels with the most total device time in a finished profile (on CPU: the n ops with
    the most self CPU time), as {name, calls, total_ms, pct}."""
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            t = e.self_cuda_time_total if t is None else t
        else:
            t = e.self_cpu_time_total
        rows.append((e.key, e.count, t / 1e3))
    total = sum(t for *_, t in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [{"name": k, "calls": c, "total_ms": t, "pct": 100 * t / total} for k, c, t in rows[:n]]


def format_top(result: dict) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in result["kinds"].items() if v)
    lines = [f"  profile of {result['steps']} steps ({kinds}) written to {result['trace']}; top by time:"]
    for r in result["top"]:
        lines.append(f"    {r['total_ms']:>9.2f} ms {r['pct']:>5.1f}% {r['calls']:>6}x  {r['name'][:100]}")
    return "\n".join(lines)
