"""Continuous batching on CUDA: the fused sampler replayed from per-bucket graphs while the batch changes,
preemption, KV pool sized from free memory."""

from __future__ import annotations


import pytest
import torch

from decoding import Generator, SamplingParams
from hf_utils import generate_in_threads, save_random_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=1.0, top_k=20, min_p=0.05, seed=2, ignore_eos=True),
    SamplingParams(max_tokens=28, temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3,
                   repetition_penalty=1.2, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=12, temperatures=[0.0, 0.9], n=2, seed=4, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=1.1, seed=5, logprobs=3, ignore_eos=True),
]
PROMPTS = [f"prompt number {i} " * (1 + i) for i in range(len(PARAMS))]  # up to 96 + 30 tokens: fits 12 blocks


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gpu_sched")
    save_random_checkpoint("llama", path, seed=6, vocab_size=32000, hidden_size=256, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=512)
    with Generator.from_pretrained(path, device="cuda", dtype="float32", progress=False) as g:
        yield g  # closed after the module: its KV pool claims most of the GPU


def _tokens(out):
    return out.token_ids, None if out.candidates is None else sorted((c.temperature, c.token_ids)
                                                                      for c in out.candidates)


def _pool_whole(gen):
    return gen.runner.cache.pool.num_free == gen.runner.cache.num_blocks


def test_kv_pool_sized_from_free_memory(base):
    base.generate("x", SamplingParams(max_tokens=2))
    free, total = torch.cuda.mem_get_info()
    pool_bytes = sum(t.numel() * t.element_size() for t in (*base.runner.cache.k, *base.runner.cache.v))
    assert pool_bytes > 0.3 * total  # a tiny model: most of the 90% budget goes to the cache
    assert free > 0.05 * total  # and gpu_memory_utilization=0.9 leaves the rest alone


# `base` holds most of the GPU's memory in its KV cache: these engines get explicit, small pools.
@pytest.mark.parametrize("options", [dict(max_num_batched_tokens=64, num_kv_blocks=256), dict(num_kv_blocks=12)],
                         ids=["chunked-prefill", "preemption"])
def test_concurrent_requests_on_cuda_equal_alone(base, options):
    from decoding import ops

    assert ops.select("sample_tokens", "cuda") == "triton"
    alone = [_tokens(base.generate(p, sp)) for p, sp in zip(PROMPTS, PARAMS)]
    gen = Generator(base.model, base.tokenizer, **options)
    assert [_tokens(out) for out in generate_in_threads(gen, PROMPTS, PARAMS)] == alone
    assert _pool_whole(gen)
    if options["num_kv_blocks"] < 64:  # the preemption case
        assert gen.metrics()["preemptions_total"] > 0
    graphs = [k for k in gen.engine.sampler.fused_graphs if k != "pool"]
    # one graph per (bucket, flags) met, not one per composition: the batch changed at most steps
    assert 0 < len(graphs) <= 12, graphs
    assert gen.metrics()["steps_total"] > 3 * len(graphs)


@pytest.mark.parametrize("options", [dict(max_num_batched_tokens=64, num_kv_blocks=256), dict(num_kv_blocks=12)],
                         ids=["chunked-prefill", "preemption"])
def test_serving_never_waits_for_the_device(base, options):
    """The engine issues step t+1 before it reads step t's tokens: a call that synchronizes with the device
    in between (a blocking copy, .item(), torch.tensor(..., device="cuda")) stalls the host for the whole
    step in flight (decoding/nosync.py). The load runs twice (the first run compiles and captures), the
    second under sync debug mode "error", which makes every such call raise; the engine's deliberate wait
    for a step's tokens is an event wait, not one of them. Mixed parameters: penalties, forks (n=2, a
    copy-on-write block copy), log-probs; rows join and leave; with the small pool, preemptions too."""
    import traceback

    gen = Generator(base.model, base.tokenizer, **options)
    first = [_tokens(out) for out in generate_in_threads(gen, PROMPTS, PARAMS)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode is on: a blocking copy raises
            torch.tensor([1.0], device="cuda")
        handles = [gen.submit(p, sp) for p, sp in zip(PROMPTS, PARAMS)]
        second, errors = [], []
        for h in handles:
            try:
                second.append(_tokens(h.result()))
            except Exception as e:  # where the engine synchronized: the engine's own traceback
                errors.append("".join(traceback.format_exception(e.__cause__ or e)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not errors, errors[0]
    assert second == first
    assert _pool_whole(gen)
    gen.close()
