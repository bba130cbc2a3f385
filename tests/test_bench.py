"""`python -m decoding bench` on CPU with a tiny random shape: fields, arithmetic, JSON."""

from __future__ import annotations

import json

import pytest

from decoding import bench


def test_run_reports_consistent_figures():
    r = bench.run("tiny", batch=2, prompt=16, new=6, device="cpu", progress=False)
    assert (r.shape, r.batch, r.prompt, r.new, r.device, r.dtype) == ("tiny", 2, 16, 6, "cpu", "float32")
    assert r.ms_per_step > 0 and r.copy_GBps > 0 and r.ttft_ms > 0 and r.prefill_ms > 0
    assert r.tok_s == pytest.approx(2 / (r.ms_per_step / 1e3), rel=1e-6)
    expected_pct = 100 * r.weight_bytes / (r.ms_per_step / 1e3) / (r.copy_GBps * 1e9)
    assert r.pct_of_copy_bw == pytest.approx(expected_pct, rel=1e-6)


def test_timed_prefill_is_not_a_prefix_cache_hit():
    """The warm-up prompts differ from the timed ones: with the same tokens the timed prefill would reuse the
    cached blocks and compute only the last one, so TTFT would time a 16-token prefill (at sizes the
    warm-up never compiled for) instead of the whole prompt."""
    import time

    import torch

    config = bench.preset_config("tiny")
    with bench.random_generator(config, "cpu", torch.float32, max_num_seqs=2) as gen:
        bench._decode(gen, "tiny", config, 2, 32, 3, torch.device("cpu"), torch.float32, None, False, lambda: None,
                      time.perf_counter())
        metrics = gen.metrics()
    assert metrics["prefill_tokens_total"] == 2 * 2 * 32  # warm-up and timed batches, every prompt token computed
    assert metrics["prefix_cache_hit_rate"] == 0.0


def test_weight_bytes_count_the_lm_head_but_not_an_untied_embedding():
    untied = bench.random_generator(bench.preset_config("tiny"), "cpu", __import__("torch").float32).model
    params = sum(p.numel() for p in untied.parameters())
    assert bench.weight_bytes_per_step(untied) == 4 * (params - untied.embed_tokens.weight.numel())


def test_cli_json(tmp_path, capsys):
    from decoding.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny", "--random-weights", "--batch", "1", "--prompt", "8", "--new", "4",
                 "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"tok_s", "ms_per_step", "weight_bytes", "copy_GBps", "pct_of_copy_bw", "shape", "batch",
                         "device"}
    assert "% of the" in capsys.readouterr().out


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape 'llama-99b'"):
        bench.preset_config("llama-99b")


def test_serve_bench_cli(tmp_path, capsys):
    from decoding.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "--serve", "--shape", "tiny", "--random-weights", "--requests", "24", "--rate", "400",
                 "--prompt-len", "4:40", "--output-len", "2:12", "--static-baseline", "--device", "cpu",
                 "--max-num-batched-tokens", "64", "--num-kv-blocks", "12", "--no-progress",
                 "--json", str(out), "--profile", str(tmp_path / "trace.json"), "--profile-steps", "3",
                 "--step-trace", str(tmp_path / "steps.json")]) == 0
    data = json.loads(out.read_text())
    cont, static = data["results"]
    # The baseline's prefill is not chunked finer than the default budget's, whatever the continuous run's (64).
    from decoding.scheduler import SchedulerConfig
    from decoding.serve_bench import STATIC_MIN_TOKENS

    assert STATIC_MIN_TOKENS == SchedulerConfig().max_num_batched_tokens
    assert (cont["mode"], static["mode"]) == ("continuous", "static batches of 32 (max_num_batched_tokens 512)")
    for r in (cont, static):
        assert r["requests"] == 24 and r["output_tokens"] >= 24 * 2 and r["duration_s"] > 0
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and 0 < r["itl_ms"]["p50"] <= r["itl_ms"]["p99"]
    assert cont["output_tokens"] == static["output_tokens"]  # the same requests, run to their max_tokens
    assert data["continuous_over_static"] == pytest.approx(cont["output_tok_s"] / static["output_tok_s"])
    for r in (cont, static):  # the step log: every step of the run in some kind, all of them in "all"
        steps = r["steps"]
        assert steps["all"]["steps"] == sum(v["steps"] for k, v in steps.items() if k != "all") > 0
        assert steps["all"]["prefill_tokens"] > 0 and steps["all"]["decode_rows"] > 0
    assert cont["profile"]["steps"] == 3 and (tmp_path / "trace.json").exists() and static["profile"] is None
    text = capsys.readouterr().out
    assert data["batch1_step_ms"] > 0 and "continuous / static throughput" in text
    assert "launch interval ms" in text and "profile of 3 steps" in text and "Python GC pauses" in text
    # --step-trace: every step of the continuous run (not the baseline's), none in the JSON report
    trace = json.loads((tmp_path / "steps.json").read_text())
    assert list(trace) == ["continuous"] and len(trace["continuous"]["rows"]) == cont["steps"]["all"]["steps"]
    assert "trace" not in cont and set(cont["gc_pauses"]) == {"0", "1", "2"}


def test_gc_pauses_counts_collections():
    import gc

    from decoding.serve_bench import GcPauses

    with GcPauses() as pauses:
        gc.collect()
    assert pauses.stats[2]["count"] >= 1 and pauses.stats[2]["max_ms"] > 0
    assert pauses not in gc.callbacks


def test_cli_tp_runs_tp1_then_tp2_and_reports_speedup(tmp_path, capsys):
    """The one-command TP benchmark, over 2 CPU processes (gloo): both runs, their ratio, all-reduce time."""
    from decoding.cli import main

    out = tmp_path / "tp.json"
    assert main(["bench", "--shape", "tiny", "--random-weights", "--prompt", "8", "--new", "4", "--device", "cpu",
                 "--tp", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    one, two = data["runs"]
    assert (one["tensor_parallel_size"], two["tensor_parallel_size"]) == (1, 2)
    assert data["speedup"] == pytest.approx(two["tok_s"] / one["tok_s"])
    assert two["weight_bytes"] < one["weight_bytes"]  # rank 0 holds about half (norms are replicated)
    assert two["all_reduce"] == "gloo" and two["all_reduce_us"] > 0 and two["all_reduce_graph_us"] is None
    assert two["all_reduce_ms_per_step"] == pytest.approx(2 * 2 * two["all_reduce_us"] / 1e3)
    assert "TP=2 vs TP=1" in capsys.readouterr().out


def test_cli_tp_rejects_a_split_before_running(capsys):
    from decoding.cli import main

    assert main(["bench", "--shape", "smollm2-135m", "--device", "cpu", "--tp", "2"]) == 2
    assert "num_attention_heads (9)" in capsys.readouterr().err
