"""Sampling features end to end through Generator on a small random Llama (CPU, fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from decoding import Generator, InvalidRequest, SamplingParams
from decoding.sampling.candidates import rank
from decoding.sequence import Sequence
from hf_utils import decode_logits, prefill_logits, save_random_checkpoint


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_s")
    save_random_checkpoint("llama", path, seed=7)
    return Generator.from_pretrained(path, device="cpu", progress=False)


@pytest.fixture(scope="module")
def judge_gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_judge")
    save_random_checkpoint("llama", path, seed=8)
    return Generator.from_pretrained(path, device="cpu", progress=False)


def _pool_whole(gen):
    return gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks


def _manual_penalised_greedy(gen, prompt, steps, freq=0.0, pres=0.0, rep=1.0):
    """Direct reference: our model's logits, penalties applied with plain Python, argmax."""
    ids = gen.tokenizer.encode(prompt)
    logits, cache, blocks = prefill_logits(gen.model, ids, block_size=16, room=steps + 1)
    logits, out = logits[-1], []
    for _ in range(steps):
        x = logits.clone()
        for j in set(ids) | set(out):
            x[j] = x[j] / rep if x[j] > 0 else x[j] * rep
        for j in set(out):
            x[j] -= out.count(j) * freq + pres
        out.append(int(x.argmax()))
        logits = decode_logits(gen.model, cache, blocks, out[-1], len(ids) + len(out) - 1)
    return out


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                       dict(repetition_penalty=1.8),
                                       dict(frequency_penalty=-0.5, presence_penalty=0.7, repetition_penalty=1.2)])
def test_penalties_end_to_end(gen, penalties):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, cycle_min_repeats=0, **penalties)
    out = gen.generate("aaaa bbbb aaaa", params)
    want = _manual_penalised_greedy(gen, "aaaa bbbb aaaa", 24, penalties.get("frequency_penalty", 0.0),
                                    penalties.get("presence_penalty", 0.0), penalties.get("repetition_penalty", 1.0))
    assert out.token_ids == want


def test_batched_per_request_params_equal_alone(gen):
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.2, top_k=4, min_p=0.05, seed=9, ignore_eos=True)]
    prompts = ["one", "two two", "three", "four four four"]
    alone = [gen.generate(p, sp).token_ids for p, sp in zip(prompts, params)]
    # Different params per request, submitted together: they run in one batch.
    assert [o.token_ids for o in gen.generate(prompts, params)] == alone
    assert _pool_whole(gen)


def test_logprobs_in_output(gen):
    out = gen.generate("hello", SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == 6
    for step, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[step]
        assert len(entry.top) == 3 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
        assert entry.top[0][0] == entry.token_id  # greedy picks the most likely token
    assert gen.generate("hello", SamplingParams(max_tokens=3)).logprobs is None


def _mean_logprob(gen, prompt, token_ids):
    ids = gen.tokenizer.encode(prompt)
    logits, _, _ = prefill_logits(gen.model, ids + token_ids, block_size=16)
    lp = logits[len(ids) - 1: -1].log_softmax(-1)
    return lp.gather(1, torch.tensor(token_ids)[:, None]).mean().item()


@pytest.mark.parametrize("prompt", ["x" * 16, "abc"])  # a prompt filling whole blocks, and a partial block
def test_multi_temperature_candidates(gen, prompt):
    calls = []
    step = gen.runner.step

    def counting_step(inp):
        calls.append(inp.query_lens)
        return step(inp)

    gen.runner.step = counting_step
    try:
        params = SamplingParams(temperatures=[0.0, 0.7, 1.5], n=2, max_tokens=10, seed=3, ignore_eos=True,
                                cycle_min_repeats=0)
        out = gen.generate(prompt, params)
    finally:
        del gen.runner.step
    assert calls[0] == [len(gen.tokenizer.encode(prompt))], "the prompt must be prefilled once"
    assert len(out.candidates) == 6
    assert sorted(c.temperature for c in out.candidates) == [0.0, 0.0, 0.7, 0.7, 1.5, 1.5]
    greedy = gen.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for c in out.candidates:
        if c.temperature == 0:  # forked KV (shared full blocks, copied partial block) must be exact
            assert c.token_ids == greedy.token_ids
        assert c.score == pytest.approx(c.mean_logprob)
        # the chosen-token log-probs are the untempered model's: the same as scoring the tokens afterwards
        assert c.mean_logprob == pytest.approx(_mean_logprob(gen, prompt, c.token_ids), abs=1e-4)
    scores = [c.score for c in out.candidates]
    assert scores == sorted(scores, reverse=True)
    assert out.text == out.candidates[0].text and out.token_ids == out.candidates[0].token_ids
    assert _pool_whole(gen)


def test_seeded_candidates_reproducible(gen):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=11, ignore_eos=True)
    a, b = gen.generate("seed", params), gen.generate("seed", params)
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
    assert len({tuple(c.token_ids) for c in a.candidates}) > 1


def test_rank_by_sum_logprob(gen):
    out = gen.generate("rank", SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=2, rank_by="sum_logprob",
                                              ignore_eos=True))
    assert [c.score for c in out.candidates] == sorted((c.sum_logprob for c in out.candidates), reverse=True)


def test_callable_judge(gen):
    seen = {}

    def judge(prompt, texts):
        seen["args"] = (prompt, list(texts))
        return [float(t.count("e")) - 0.001 * i for i, t in enumerate(texts)]

    out = gen.generate("judge me", SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=4, judge=judge,
                                                  ignore_eos=True))
    assert seen["args"][0] == "judge me" and len(seen["args"][1]) == 4
    assert out.candidates[0].score == max(c.score for c in out.candidates)


def test_generator_judge(gen, judge_gen):
    out = gen.generate("judge", SamplingParams(temperatures=[0.5, 1.0], n=2, max_tokens=8, seed=6, judge=judge_gen,
                                               ignore_eos=True))
    for c in out.candidates:  # the judge sees the candidates' texts
        assert c.score == pytest.approx(judge_gen.score("judge", [c.text])[0], abs=1e-5)
    assert out.candidates[0].score == max(c.score for c in out.candidates)


def test_failing_judge_is_reported(gen):
    def judge(prompt, texts):
        raise RuntimeError("boom")

    with pytest.raises(Exception, match="judge failed: RuntimeError: boom"):
        gen.generate("x", SamplingParams(n=2, max_tokens=2, judge=judge))
    assert _pool_whole(gen)


def test_cycle_candidates_rank_last(gen):
    params = SamplingParams(n=3)
    seqs = []
    for reason, lp in (("length", -3.0), ("cycle", -0.1), ("stop", -2.0)):
        s = Sequence([1], params, 1.0, 10, gen.tokenizer, None)
        s.output_ids, s.chosen_logprobs, s.finish_reason = [5], [lp], reason
        seqs.append(s)
    assert [c.finish_reason for c in rank("p", seqs)] == ["stop", "length", "cycle"]


def test_nan_logits_fail_one_request_only(gen):
    compute = gen.model.compute_logits
    step = {"n": 0}

    def poisoned(hidden):
        logits = compute(hidden)
        step["n"] += 1
        if step["n"] == 3:
            logits[1] = float("nan")  # the second request's row, third step
        return logits

    gen.model.compute_logits = poisoned
    try:
        outs = gen.generate(["good", "bad"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    finally:
        del gen.model.compute_logits
    assert outs[1].finish_reason == "error" and "NaN or infinite logits" in outs[1].error
    assert len(outs[1].token_ids) == 2
    assert outs[0].token_ids == gen.generate("good", SamplingParams(max_tokens=6, temperature=0,
                                                                     ignore_eos=True)).token_ids
    assert _pool_whole(gen)


def test_stream_rejects_several_candidates(gen):
    with pytest.raises(InvalidRequest, match="stream"):
        list(gen.stream("x", SamplingParams(n=2)))


def test_score_empty_completion(gen):
    assert gen.score("x", [""]) == [-math.inf]


def test_stream_raises_on_model_failure(gen):
    from decoding import DecodingError

    compute = gen.model.compute_logits
    gen.model.compute_logits = lambda hidden: compute(hidden).fill_(float("nan"))
    try:
        with pytest.raises(DecodingError, match="NaN or infinite logits at generated token 0"):
            list(gen.stream("x", SamplingParams(max_tokens=4)))
    finally:
        del gen.model.compute_logits
    assert _pool_whole(gen)
