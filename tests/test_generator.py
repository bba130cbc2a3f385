"""Generator behaviour on a small random Llama checkpoint (CPU, fp32, reference ops)."""

from __future__ import annotations

import pytest

from decoding import Generator, InvalidRequest, Output, SamplingParams
from hf_utils import BYTE_VOCAB, save_random_checkpoint


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_random_checkpoint("llama", path, seed=1)
    return Generator.from_pretrained(path, device="cpu", progress=False)


def _pool_whole(gen: Generator) -> bool:
    return gen.runner.cache is None or gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks


def test_output_fields(gen):
    out = gen.generate("def fibonacci(n):", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert isinstance(out, Output)
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert out.text == gen.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == gen.tokenizer.encode("def fibonacci(n):")
    assert out.time_to_first_token > 0 and out.tokens_per_second > 0
    assert _pool_whole(gen)


def test_stream_pieces_concatenate_to_generate_text(gen):
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=3, ignore_eos=True)
    pieces = list(gen.stream("Once upon a time", params))
    assert len(pieces) > 1
    assert "".join(pieces) == gen.generate("Once upon a time", params).text
    assert _pool_whole(gen)


def test_abandoned_stream_frees_blocks(gen):
    stream = gen.stream("abc", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert _pool_whole(gen)


def test_seeded_sampling_is_independent_of_batch(gen):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = gen.generate("xyz", params).token_ids
    others = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.9, ignore_eos=True)
    batched = gen.generate(["first prompt", "xyz", "third"], params)[1].token_ids
    mixed = [gen.generate(["q", "xyz"], p) for p in (others, params)][1][1].token_ids
    assert alone == batched == mixed
    assert gen.generate("xyz", SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True)).token_ids != alone


def test_different_lengths_in_one_batch(gen):
    """Sequences finishing at different steps leave the others' tokens unchanged."""
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    outs = gen.generate(["a much longer prompt than the other one", "b"], short)
    assert [len(o.token_ids) for o in outs] == [3, 3]
    long = gen.generate("b", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert long.token_ids[:3] == outs[1].token_ids


def test_stop_token_ids_and_eos(gen):
    base = gen.generate("hello", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stop_at = base.token_ids[5]
    first = base.token_ids.index(stop_at)
    out = gen.generate("hello", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_at]))
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    assert BYTE_VOCAB in gen.tokenizer.eos_token_ids


def test_stop_string_split_across_tokens(gen):
    """The byte tokenizer gives one token per byte, so any stop string of 2+ chars spans tokens."""
    base = gen.generate("hello", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)).text
    stop = base[10:13]
    cut = base.index(stop)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "never-matches"])
    out = gen.generate("hello", params)
    assert out.finish_reason == "stop" and out.text == base[:cut]
    assert "".join(gen.stream("hello", params)) == base[:cut]


def test_context_window_clips_generation(gen):
    window = gen.config.max_position_embeddings
    prompt = "x" * (window - 3)
    out = gen.generate(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, match", [
    ("", "prompt 0 is empty"),
    ("y" * 256, "context window is 256"),
    (123, "must be a str"),
])
def test_bad_prompts(gen, prompt, match):
    with pytest.raises(InvalidRequest, match=match):
        gen.generate(prompt)
    assert _pool_whole(gen)


def test_bad_prompt_in_batch_rejects_before_any_work(gen):
    with pytest.raises(InvalidRequest, match="prompt 1 is empty"):
        gen.generate(["fine", ""])
    with pytest.raises(InvalidRequest, match="list is empty"):
        gen.generate([])
    assert _pool_whole(gen)


def test_chat_template_chatml_render(gen):
    gen.tokenizer.chat_template = None
    with pytest.raises(InvalidRequest, match="no chat template"):
        gen.render_chat("hi")


def test_info(gen):
    info = gen.info()
    assert info["architecture"] == "llama" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert set(info["op_backends"]) >= {"rms_norm", "paged_attention"}


def test_score_first_then_forked_candidates(tmp_path):
    """A pool first made by score() must still take the copy-on-write of forked candidates' partial block
    in a later generate() (before the engine, an inference-mode pool refused that in-place copy)."""
    save_random_checkpoint("llama", tmp_path, seed=5)
    fresh = Generator.from_pretrained(tmp_path, device="cpu", progress=False)
    assert len(fresh.score("abc", ["d", "de"])) == 2
    out = fresh.generate("abc", SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=4, ignore_eos=True))
    assert len(out.candidates) == 2
    fresh.close()
