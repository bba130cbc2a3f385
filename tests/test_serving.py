"""The service API: asyncio, cancellation from asyncio, metrics (dict and Prometheus), clean exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decoding import DecodingError, Generator, SamplingParams
from hf_utils import save_random_checkpoint


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_serve")
    save_random_checkpoint("llama", path, seed=4)
    return Generator.from_pretrained(path, device="cpu", progress=False, max_num_batched_tokens=32)


def pool_whole(gen: Generator) -> bool:
    return gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, seed=21, ignore_eos=True)


def test_asyncio_generate_and_stream_equal_sync(gen):
    want = [gen.generate(p, sp).token_ids for p, sp in (("async one", GREEDY), ("async two", SEEDED))]
    want_text = gen.generate("streamed", SEEDED).text

    async def main():
        outs = await asyncio.gather(gen.generate_async("async one", GREEDY), gen.generate_async("async two", SEEDED),
                                    gen.generate_async(["a", "b"], GREEDY))
        pieces = [piece async for piece in gen.stream_async("streamed", SEEDED)]
        return outs, pieces

    (one, two, pair), pieces = asyncio.run(main())
    assert [one.token_ids, two.token_ids] == want
    assert [o.token_ids for o in pair] == [o.token_ids for o in gen.generate(["a", "b"], GREEDY)]
    assert "".join(pieces) == want_text and len(pieces) > 1
    assert pool_whole(gen)


def test_asyncio_break_and_task_cancel_free_blocks(gen):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        async for _ in gen.stream_async("break out early", long):
            break  # the async generator is closed when collected: it cancels the request
        await wait_until(lambda: pool_whole(gen) and gen.metrics()["requests_running"] == 0)
        task = asyncio.create_task(gen.generate_async("cancel me", long))
        await wait_until(lambda: gen.metrics()["requests_running"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: pool_whole(gen) and gen.metrics()["requests_running"] == 0)

    before = gen.metrics()["requests_cancelled_total"]
    asyncio.run(main())
    assert gen.metrics()["requests_cancelled_total"] == before + 2


def test_stream_async_raises_on_model_failure(gen):
    compute = gen.model.compute_logits
    gen.model.compute_logits = lambda hidden: compute(hidden).fill_(float("nan"))

    async def main():
        return [p async for p in gen.stream_async("x", SamplingParams(max_tokens=4))]

    try:
        with pytest.raises(DecodingError, match="NaN or infinite logits at generated token 0"):
            asyncio.run(main())
    finally:
        del gen.model.compute_logits
    assert pool_whole(gen)


def test_engine_error_fails_only_that_step_and_keeps_serving(gen):
    step = gen.runner.step

    def broken(inp):
        raise RuntimeError("device on fire")

    gen.runner.step = broken
    try:
        with pytest.raises(DecodingError, match="device on fire"):
            gen.generate("x", GREEDY)
    finally:
        del gen.runner.step
    assert gen.runner.step == step and pool_whole(gen)
    assert len(gen.generate("x", GREEDY).token_ids) == 12


def test_metrics_dict(gen):
    gen.generate(["m1", "m2", "m3"], GREEDY)
    m = gen.metrics()
    for key in ("requests_running", "requests_waiting", "tokens_per_second", "kv_blocks_used", "kv_blocks_free",
                "preemptions_total", "prefix_cache_hit_rate", "generation_tokens_total"):
        assert key in m, key
    assert m["requests_running"] == m["requests_waiting"] == m["kv_blocks_used"] == 0
    assert m["kv_blocks_free"] == m["kv_blocks_total"] == gen.runner.cache.num_blocks
    assert m["tokens_per_second"] > 0 and m["generation_tokens_total"] >= 36
    ttft, itl = m["time_to_first_token"], m["inter_token_latency"]
    assert ttft["count"] >= 3 and itl["count"] >= 3 * 11
    assert 0 < ttft["p50"] <= ttft["p99"] and 0 < itl["p50"] <= itl["p99"]
    assert list(ttft["buckets"].values())[-1] == ttft["count"]  # cumulative, +Inf holds them all


def test_prometheus_metrics(gen):
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    gen.register_prometheus(registry)
    gen.generate("prom", GREEDY)
    text = prometheus_client.generate_latest(registry).decode()
    assert "decoding_requests_running 0.0" in text
    assert "decoding_time_to_first_token_seconds_bucket" in text and "decoding_preemptions_total" in text
    assert registry.get_sample_value("decoding_generation_tokens_total") >= 12
    assert registry.get_sample_value("decoding_inter_token_latency_seconds_count") >= 11


def test_process_exits_without_close(tmp_path):
    """The engine thread is a daemon and stops at exit: a script that never closes its Generator ends."""
    script = tmp_path / "script.py"
    script.write_text(
        "import torch\n"
        "from decoding import SamplingParams\n"
        "from decoding.bench import preset_config, random_generator\n"
        "gen = random_generator(preset_config('tiny'), torch.device('cpu'), torch.float32)\n"
        "print(len(gen.generate('<1> <2>', SamplingParams(max_tokens=3, ignore_eos=True)).token_ids))\n"
        "gen.submit('<3> <4>', SamplingParams(max_tokens=500, ignore_eos=True))  # still running at exit\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_bad_options_and_params_are_refused(gen):
    from decoding import InvalidRequest

    with pytest.raises(InvalidRequest, match="unknown Generator option\\(s\\) \\['max_seqs'\\]"):
        Generator(gen.model, gen.tokenizer, max_seqs=4)
    with pytest.raises(InvalidRequest, match="2 SamplingParams for 3 prompts"):
        gen.generate(["a", "b", "c"], [GREEDY, GREEDY])
    small = Generator(gen.model, gen.tokenizer, max_num_seqs=2, max_num_batched_tokens=8)
    with pytest.raises(InvalidRequest, match="3 candidates; at most max_num_seqs \\(2\\)"):
        small.generate("a", SamplingParams(n=3))
    small.close()
    with pytest.raises(DecodingError, match="closed"):
        small.generate("a")


def test_dropped_generator_frees_its_cache_at_once(gen):
    """The engine thread holds its engine only while working: a Generator its owner drops is freed (the
    KV cache with it) without close(), so another one can size its cache from free memory right after."""
    import gc
    import weakref

    other = Generator(gen.model, gen.tokenizer, num_kv_blocks=8)
    other.generate("x", GREEDY)
    engine, k_cache = weakref.ref(other.engine), weakref.ref(other.runner.cache.k[0])
    del other
    deadline = time.monotonic() + 5
    while (engine() is not None or k_cache() is not None) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert engine() is None and k_cache() is None
