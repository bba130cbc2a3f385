"""Tensor parallelism over 2 CPU processes (gloo) against the same model in one process.

Tolerance: both sides run in fp32 on the same weights. Sharding alone changes no value: column-parallel
matmuls compute the same dot products, the vocab-parallel embedding all-reduce adds exact zeros and the
logits are gathered, not summed. What changes is the order of the row-parallel sums (o and down): each
rank sums half of the K terms, then the all-reduce adds the two halves, where one process sums all K
in one pass. That is fp32 rounding, a few ulp of the activations, so logits of magnitude < 1 agree to
1e-6 absolute, about 8 ulp at 1.0 (seen: 1.2e-7, one ulp, over 33 steps of both models); a wrong shard,
head mapping or missing all-reduce moves them by orders of magnitude more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoding import Generator, SamplingParams, parallel
from decoding.runner import StepInput
from hf_utils import kv_pool, save_random_checkpoint

ATOL = 1e-6
# split: Llama, 2 KV heads over 2 ranks, MLP biases (down's is added once), vocabulary 321 (a padding row).
# replicated: Qwen2 with 1 KV head on both ranks (QKV biases, the k/v ones replicated), tied embeddings
# (the vocab-parallel embedding is also the LM head).
MODELS = {"split": ("llama", {"vocab_size": 321, "mlp_bias": True}),
          "replicated": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True})}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    """(checkpoint path, TP=1 Generator, TP=2 Generator) over one random checkpoint."""
    variant, overrides = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    save_random_checkpoint(variant, path, seed=3, **overrides)
    one = Generator.from_pretrained(path, device="cpu", progress=False)
    two = Generator.from_pretrained(path, device="cpu", progress=False, tensor_parallel_size=2)
    yield path, one, two
    procs = [w.proc for w in two.runner._group.workers]
    two.close()
    assert [p.returncode for p in procs] == [0], "workers did not shut down cleanly"


def test_logits_match_one_process(pair):
    _, one, two = pair
    prompt = [(11 * i + 5) % 250 for i in range(21)]
    runs = []
    for gen in (one, two):
        cache = kv_pool(gen.runner, gen.runner.blocks_for(len(prompt) + 33))
        blocks = cache.pool.allocate(gen.runner.blocks_for(len(prompt) + 33))[::-1]  # not contiguous
        logits = [gen.runner.step(StepInput([blocks], [len(prompt)], prompt, [len(prompt)]))[0]]
        seq = list(prompt)
        for _ in range(32):  # teacher-forced with the one-process model's greedy tokens
            seq.append(int(runs[0][len(logits) - 1].argmax()) if runs else int(logits[-1].argmax()))
            logits.append(gen.runner.step(StepInput([blocks], [len(seq)], [seq[-1]], [1]))[0])
        cache.pool.free(blocks)
        runs.append(torch.stack(logits))
    assert runs[1].shape == (33, one.config.vocab_size)
    torch.testing.assert_close(runs[1], runs[0], atol=ATOL, rtol=0)
    assert torch.equal(runs[1].argmax(-1), runs[0].argmax(-1))


def test_generate_identical_tokens(pair):
    _, one, two = pair
    prompts = ["def f(x):\n    return", "hello world"]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for a, b in zip(one.generate(prompts, greedy), two.generate(prompts, greedy)):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 32
    # several candidates share the prompt's KV blocks: the forked partial block is copied on every rank
    multi = SamplingParams(max_tokens=8, temperatures=[0.7, 1.2], n=2, seed=5, ignore_eos=True)
    a, b = one.generate("hello world", multi), two.generate("hello world", multi)
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
    assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-5)
    assert two.score("def f(x):", [" return x", "", "\n    pass"]) == pytest.approx(
        one.score("def f(x):", [" return x", "", "\n    pass"]), abs=1e-5)
    assert two.runner.cache.pool.num_free == two.runner.cache.num_blocks


def test_info_and_worker_environment(pair):
    _, one, two = pair
    info = two.info()
    assert info["tensor_parallel_size"] == 2 and one.info()["tensor_parallel_size"] == 1
    assert (info["heads"], info["kv_heads"]) == (one.info()["heads"], one.info()["kv_heads"])
    for w in two.runner._group.workers:  # every worker runs with NVLink multicast switched off
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{w.proc.pid}/environ").read_text().split("\0") if "=" in kv)
        assert all(env.get(k) == v for k, v in parallel.NO_MULTICAST_ENV.items())
