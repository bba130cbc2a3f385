"""The engine's optional step log (decoding/steplog.py): records, the per-kind summary, the profile window."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from decoding import SamplingParams
from decoding.bench import preset_config, random_generator
from decoding.steplog import StepLog, StepRecord, format_summary, format_top


def rec(t: float, decodes: int, prefill_tokens: int = 0, prefill_seqs: int = 0, graphed: bool = False):
    """A record launched at t seconds, scheduled 1 ms before, issued 2 ms after, the previous step's tokens
    read 3 ms after and handed over 3.5 ms after; decodes of 100 tokens."""
    return StepRecord(t - 0.001, t, t + 0.002, decodes, prefill_tokens, prefill_seqs, 100 * decodes, graphed,
                      t + 0.003, t + 0.0035)


def test_summary_per_kind_from_known_timestamps():
    log = StepLog()
    # launches at 0, 10, 20, 50, 60, 100, 130 ms: intervals 10, 10, 30, 10, 40, 30 (the last step has none)
    steps = [rec(0.00, 4, 256, 1), rec(0.01, 4, 256, 2), rec(0.02, 0, 512, 1), rec(0.05, 8, graphed=True),
             rec(0.06, 8, graphed=True), rec(0.10, 8), rec(0.13, 7, graphed=True)]
    for r in steps:
        log.records.append(r)
    s = log.summary()
    assert list(s) == ["decode-graphed", "decode-eager", "mixed", "prefill", "all"]
    mixed, graphed, eager, prefill, total = s["mixed"], s["decode-graphed"], s["decode-eager"], s["prefill"], s["all"]
    assert (mixed["steps"], graphed["steps"], eager["steps"], prefill["steps"], total["steps"]) == (2, 3, 1, 1, 7)
    assert mixed["wall_s"] == pytest.approx(0.020) and mixed["interval_ms"]["p50"] == pytest.approx(10.0)
    assert prefill["wall_s"] == pytest.approx(0.030) and eager["wall_s"] == pytest.approx(0.030)
    assert graphed["wall_s"] == pytest.approx(0.050)  # 10 + 40; the last step has no next launch
    assert graphed["interval_ms"]["p99"] == pytest.approx(10 + 0.99 * 30)  # inclusive percentiles of [10, 40]
    assert total["wall_s"] == pytest.approx(0.130)
    assert mixed["decode_rows"] == 4 and mixed["prefill_tokens"] == 256 and mixed["prefill_seqs"] == 1.5
    assert mixed["decode_context"] == 400 and prefill["decode_context"] == 0
    assert graphed["decode_rows"] == pytest.approx(23 / 3) and graphed["prefill_tokens"] == 0
    assert total["host_sched_ms"] == pytest.approx(1.0) and total["host_issue_ms"] == pytest.approx(2.0)
    assert total["host_wait_ms"]["p99"] == pytest.approx(1.0) and total["host_accept_ms"]["p50"] == pytest.approx(0.5)
    assert "gpu_ms" not in total  # no CUDA events on CPU
    table = format_summary(s)
    assert all(k in table for k in s) and len(table.splitlines()) == 1 + len(s)


def test_log_is_bounded():
    log = StepLog(capacity=3)
    for i in range(5):
        log.records.append(rec(i * 0.01, 1))
    assert len(log.records) == 3 and log.summary()["all"]["steps"] == 3


@pytest.fixture(scope="module")
def gen():
    g = random_generator(preset_config("tiny"), torch.device("cpu"), torch.float32, max_num_batched_tokens=32)
    with g:
        yield g


def _prompts(n: int, seed: int) -> list[str]:
    rng = torch.Generator().manual_seed(seed)
    lengths = [5, 40, 70, 12, 33, 9][:n]
    return [" ".join(f"<{t}>" for t in torch.randint(0, 512, (m,), generator=rng).tolist()) for m in lengths]


def test_engine_logs_every_step_only_when_asked(gen, monkeypatch):
    """Prompts longer than the 32-token budget are prefilled in chunks next to other requests' decodes.
    With overlap off (each step's tokens read before the next), the log accounts for every token: prefill
    tokens sum to the prompt tokens (distinct prompts, no prefix-cache hit), decode rows to the tokens drawn
    after the first of each request."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    engine = gen.engine
    gen.generate(_prompts(2, 0), params)
    assert engine.step_log is None  # off by default
    monkeypatch.setattr(engine, "overlap", False)
    log = engine.record_steps()
    outs = gen.generate(_prompts(6, 1), params)
    engine.step_log = None
    recs = list(log.records)
    kinds = {r.kind for r in recs}
    assert {"mixed", "decode-eager"} <= kinds and "decode-graphed" not in kinds  # no graphs on CPU
    assert sum(r.prefill_tokens for r in recs) == sum(len(o.prompt_token_ids) for o in outs)
    assert sum(r.decode_rows for r in recs) == sum(len(o.token_ids) - 1 for o in outs)
    # a request's decode rows read contexts prompt + 1, ..., prompt + (tokens - 1)
    assert sum(r.decode_context for r in recs) == sum(
        sum(range(len(o.prompt_token_ids) + 1, len(o.prompt_token_ids) + len(o.token_ids))) for o in outs)
    assert all(r.decode_rows + r.prefill_tokens <= 32 for r in recs)  # the token budget
    assert all(r.t_schedule <= r.t_launch <= r.t_issued <= r.t_waited <= r.t_accepted for r in recs)
    assert all(a.t_accepted <= b.t_schedule for a, b in itertools.pairwise(recs))
    trace = log.trace()
    assert len(trace["rows"]) == len(recs) and trace["rows"][0][0] == 0.0
    col = {c: i for i, c in enumerate(trace["columns"])}
    assert [row[col["prefill_tokens"]] for row in trace["rows"]] == [r.prefill_tokens for r in recs]
    assert all(row[col["gpu_ms"]] is None for row in trace["rows"])  # no CUDA events on CPU
    assert trace["rows"][-1][col["t_accepted"]] == pytest.approx((recs[-1].t_accepted - recs[0].t_schedule) * 1e3, abs=1e-3)
    assert all(a.t_launch <= b.t_launch for a, b in itertools.pairwise(recs))
    s = log.summary()
    assert s["all"]["steps"] == len(recs) == sum(v["steps"] for k, v in s.items() if k != "all")
    assert s["all"]["wall_s"] == pytest.approx(recs[-1].t_launch - recs[0].t_launch)
    n = len(recs)
    gen.generate(_prompts(1, 2), params)
    assert len(log.records) == n  # off again


def test_profile_window_on_the_engine_thread(gen, tmp_path):
    """The profile starts at the first step whose start condition holds and covers num_steps steps."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    engine = gen.engine
    log = engine.record_steps()
    path = tmp_path / "trace.json"
    log.profile(str(path), 4, lambda: len(log.records) >= 2)
    gen.generate(_prompts(3, 3), params)
    engine.call(lambda e: log.stop_profile())  # a no-op once the window has closed by itself
    engine.step_log = None
    result = log.profile_result
    assert result is not None and result["steps"] == 4 and sum(result["kinds"].values()) == 4
    assert json.loads(path.read_text())["traceEvents"]
    top = result["top"]
    assert 0 < len(top) <= 25 and top == sorted(top, key=lambda r: -r["total_ms"])
    assert sum(r["pct"] for r in top) <= 100.0 + 1e-6
    assert str(path) in format_top(result)
