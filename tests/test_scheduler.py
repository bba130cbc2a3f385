"""Continuous batching on a small random Llama (CPU, fp32, reference ops): every request gives exactly the
tokens it gives alone, whatever it shares the batch with, however the pool runs short, and the pool is
whole again afterwards."""

from __future__ import annotations

import random
import threading

import pytest

from decoding import CacheExhausted, Generator, SamplingParams
from hf_utils import generate_in_threads, save_random_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_sched")
    save_random_checkpoint("llama", path, seed=3)
    return Generator.from_pretrained(path, device="cpu", progress=False)


def make(base: Generator, **options) -> Generator:
    """Another engine over the same model and tokenizer."""
    return Generator(base.model, base.tokenizer, **options)


def pool_whole(gen: Generator) -> bool:
    pool = gen.runner.cache.pool
    return pool.num_free == pool.num_blocks and all(pool.refcount(b) == 0 for b in range(pool.num_blocks))


def tokens(out):
    """Everything a request returns that must not depend on the batch: tokens, and each candidate's."""
    cands = None if out.candidates is None else sorted((c.temperature, c.token_ids) for c in out.candidates)
    return out.token_ids, out.finish_reason, cands


PROMPTS = ["def fibonacci(n):", "a", "The quick brown fox jumps over the lazy dog. " * 2, "x = [1, 2, 3]\n",
           "import numpy as np\n\n", "Once upon a time", "zzzz", "class Stack:\n    def push(self, item):"]
PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=14, temperature=0, frequency_penalty=1.0, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_tokens=7, temperature=1.2, top_k=4, min_p=0.05, seed=9, ignore_eos=True),
    SamplingParams(max_tokens=10, temperatures=[0.0, 0.8], n=2, seed=2, ignore_eos=True, cycle_min_repeats=0),
    SamplingParams(max_tokens=11, temperature=0.7, presence_penalty=0.5, seed=1, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=["zz"]),
    SamplingParams(max_tokens=8, temperature=1.0, seed=77, ignore_eos=True),
]


@pytest.fixture(scope="module")
def alone(base):
    """Each request run by itself on an ample pool."""
    return [tokens(base.generate(p, sp)) for p, sp in zip(PROMPTS, PARAMS)]


def test_concurrent_threads_mixed_params_equal_alone(base, alone):
    # A small token budget: prompts are prefilled in chunks, mixed into the same steps as other decodes.
    gen = make(base, max_num_batched_tokens=16, max_num_seqs=12)
    assert [tokens(out) for out in generate_in_threads(gen, PROMPTS, PARAMS)] == alone
    m = gen.metrics()
    assert m["requests_finished_total"] == len(PROMPTS) and m["requests_running"] == 0
    assert pool_whole(gen)


def test_one_call_with_per_prompt_params_equals_alone(base, alone):
    gen = make(base, max_num_batched_tokens=24)
    assert [tokens(o) for o in gen.generate(PROMPTS, PARAMS)] == alone
    assert pool_whole(gen)


@pytest.mark.parametrize("pool", [None, 8], ids=["ample", "preempting"])
def test_overlapped_steps_give_the_tokens_of_synchronous_ones(base, pool):
    """The engine launches step t+1 before it reads step t's tokens (they reach the next step on the
    device). Same outputs as reading every step's tokens first, including sequences that stop on a token
    while their next token is already drawn (it is dropped), and under preemption of such sequences."""
    stops = [p.replace(max_tokens=30, stop_token_ids=[22, 293, 268, 69]) for p in PARAMS]
    params = stops + [p.replace(max_tokens=30) for p in PARAMS]
    prompts = PROMPTS + PROMPTS
    runs = []
    for overlap in (False, True):
        gen = make(base, num_kv_blocks=pool, max_num_batched_tokens=32)
        gen.engine.overlap = overlap
        runs.append([tokens(o) for o in generate_in_threads(gen, prompts, params)])
        assert pool_whole(gen)
        if pool:
            assert gen.metrics()["preemptions_total"] > 0
    assert runs[0] == runs[1]
    assert sum(r[1] == "stop" for r in runs[1]) >= 3  # the stop-token path was taken


def test_preemption_under_a_tiny_pool_keeps_every_token(base):
    # 8 blocks of 16 tokens; each request ends up needing 3-4 blocks, and all are admitted while their
    # prompts fit, so growing sequences preempt the newest ones, which are recomputed (prompt + output so
    # far) later and still give exactly their tokens.
    prompts, params = PROMPTS[:2] + PROMPTS[3:], [p.replace(max_tokens=40) for p in PARAMS[:2] + PARAMS[3:]]
    want = [tokens(make(base).generate(p, sp)) for p, sp in zip(prompts, params)]
    gen = make(base, num_kv_blocks=8, max_num_batched_tokens=32)
    assert [tokens(o) for o in gen.generate(prompts, params)] == want
    assert gen.metrics()["preemptions_total"] > 0
    assert pool_whole(gen)


def test_request_that_can_never_fit_is_refused_up_front(base):
    gen = make(base, num_kv_blocks=4)
    with pytest.raises(CacheExhausted, match="needs 5 KV blocks .* the whole cache has 4"):
        gen.generate("a" * 40, SamplingParams(max_tokens=40))
    ok = gen.generate("a" * 40, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert len(ok.token_ids) == 20 and pool_whole(gen)


def test_prefix_cache_hits_give_identical_outputs_with_less_prefill(base):
    system = "You are a careful assistant. Answer in one line. " * 2  # 102 bytes: 6 full blocks of 16
    prompts = [system + "Q: what is 2+2?", system + "Q: name a color.", system + "Q: what is 2+2?"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    uncached = make(base, enable_prefix_caching=False)
    want = [uncached.generate(p, params).token_ids for p in prompts]
    gen = make(base)
    got, prefill = [], []
    for p in prompts:
        before = gen.metrics()["prefill_tokens_total"]
        got.append(gen.generate(p, params).token_ids)
        prefill.append(gen.metrics()["prefill_tokens_total"] - before)
    assert got == want
    n = [len(base.tokenizer.encode(p)) for p in prompts]
    assert prefill[0] == n[0]
    assert prefill[1] == n[1] - 96  # the 6 shared full blocks came from the cache
    assert prefill[2] == n[2] - 16 * ((n[2] - 1) // 16)  # the same prompt: all its full blocks
    assert 0 < gen.metrics()["prefix_cache_hit_rate"] < 1
    assert pool_whole(gen) and gen.runner.cache.pool.num_cached > 0  # cached blocks count as free


def test_candidates_fork_the_prompt_once(base):
    gen = make(base)
    calls = []
    step = gen.runner.step

    def counting_step(inp):
        calls.append(list(inp.query_lens))
        return step(inp)

    gen.runner.step = counting_step
    params = SamplingParams(temperatures=[0.0, 0.5, 1.0], n=2, max_tokens=5, seed=3, ignore_eos=True)
    out = gen.generate("abc", params)  # a partial last block: each candidate gets a copy
    assert calls[0] == [3] and all(q == [1] * 6 for q in calls[1:])
    assert len(out.candidates) == 6 and pool_whole(gen)


def test_cancel_running_and_waiting_requests_frees_blocks(base):
    gen = make(base, max_num_seqs=1, max_num_batched_tokens=8)
    running = gen.submit("long one", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), stream=True)
    waiting = gen.submit("never admitted", SamplingParams(max_tokens=5))
    pieces = iter(running)
    next(pieces)
    waiting.cancel()
    out = waiting.result(timeout=30)
    assert out.finish_reason == "cancelled" and out.token_ids == []
    running.cancel()
    out = running.result(timeout=30)
    assert out.finish_reason == "cancelled" and 0 < len(out.token_ids) < 200
    assert pool_whole(gen)
    assert gen.metrics()["requests_cancelled_total"] == 2


def test_abandoned_stream_frees_blocks_before_close_returns(base):
    gen = make(base)
    stream = gen.stream("abc", SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert pool_whole(gen)


def test_randomized_soak_leaks_no_block(base):
    """Hundreds of short requests from several threads, random parameters, a pool small enough to preempt,
    some cancelled; afterwards every block is free, and greedy requests kept their tokens."""
    rng = random.Random(0)
    gen = make(base, num_kv_blocks=14, max_num_batched_tokens=40, max_num_seqs=24)
    jobs = []
    for i in range(300):
        prompt = "".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(1, 40)))
        kind = rng.random()
        if kind < 0.3:
            params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=0, ignore_eos=True)
        elif kind < 0.4:
            params = SamplingParams(max_tokens=rng.randint(1, 6), n=2, temperature=0.8, seed=i)
        else:
            params = SamplingParams(max_tokens=rng.randint(1, 10), temperature=1.0, top_p=0.9, seed=i,
                                    stop=["ab"] if kind < 0.5 else ())
        jobs.append((prompt or "a", params, rng.random() < 0.1))
    results: list = [None] * len(jobs)

    def worker(k):  # each thread submits its share in waves, cancels some, then waits for them
        mine = list(range(k, len(jobs), 4))
        for wave in (mine[: len(mine) // 2], mine[len(mine) // 2:]):
            handles = {i: gen.submit(jobs[i][0], jobs[i][1]) for i in wave}
            for i in wave:
                if jobs[i][2]:
                    handles[i].cancel()
            for i in wave:
                results[i] = handles[i].result(timeout=120)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    assert pool_whole(gen)
    m = gen.metrics()
    assert m["requests_finished_total"] + m["requests_cancelled_total"] == len(jobs)
    assert m["preemptions_total"] > 0 and m["requests_running"] == 0 and m["requests_waiting"] == 0
    greedy = [i for i, (_, p, c) in enumerate(jobs) if p.temperature == 0 and not c][:12]
    ref = make(base)
    for i in greedy:
        assert results[i].token_ids == ref.generate(jobs[i][0], jobs[i][1]).token_ids
