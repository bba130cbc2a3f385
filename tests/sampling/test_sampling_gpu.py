"""Generation on CUDA with the fused Triton sampler equals generation with the reference sampler."""

from __future__ import annotations

import pytest
import torch

from decoding import Generator, SamplingParams
from hf_utils import save_random_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=1.0, top_k=20, min_p=0.05, seed=2, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3,
                   repetition_penalty=1.2, seed=3, ignore_eos=True),
]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gpu_s")
    save_random_checkpoint("llama", path, seed=5, vocab_size=32000, hidden_size=256, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=512)
    with Generator.from_pretrained(path, device="cuda", dtype="float32", progress=False) as g:
        yield g  # closed after the module: its KV pool claims most of the GPU


def _run(gen):
    return [o.token_ids for o in gen.generate([f"prompt {i}" for i in range(len(PARAMS))], PARAMS)]


def test_fused_sampler_generation_equals_reference(gen, monkeypatch):
    from decoding import ops

    assert ops.select("sample_tokens", "cuda") == "triton"
    fused = _run(gen)
    # Only the sampler changes: the model's ops keep their backends, so the logits are the same.
    monkeypatch.setitem(ops._IMPLS, "sample_tokens", {"reference": ops._IMPLS["sample_tokens"]["reference"]})
    assert ops.select("sample_tokens", "cuda") == "reference"
    reference = _run(gen)
    assert fused == reference
    assert [len(t) for t in fused] == [24, 24, 16, 20]  # different lengths: rows leave the batch mid-way


def test_candidates_on_cuda(gen):
    out = gen.generate("x", SamplingParams(temperatures=[0.0, 0.9], n=2, max_tokens=12, seed=4, ignore_eos=True))
    greedy = gen.generate("x", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in out.candidates if c.temperature == 0] == [greedy.token_ids] * 2
