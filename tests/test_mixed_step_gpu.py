"""Mixed steps of continuous batching (decodes next to prefill chunks) on CUDA: no host sync in the eager step."""

from __future__ import annotations

import pytest
import torch

from decoding.bench import preset_config
from decoding.loader import build_model, load_weights, random_tensors
from decoding.runner import ModelRunner, StepInput

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tiny_runner(dtype: torch.dtype) -> ModelRunner:
    config = preset_config("tiny")
    model = build_model(config, torch.device("cuda"), dtype)
    load_weights(model, random_tensors(config, torch.device("cuda"), dtype, 0))
    runner = ModelRunner(model, block_size=16)
    runner.allocate_cache(256)
    return runner


@pytest.fixture(scope="module")
def runner():
    runner = tiny_runner(torch.bfloat16)
    yield runner
    runner.free_cache()


def mixed_step(runner: ModelRunner, decode_lens: list[int], chunks: list[tuple[int, int]]) -> StepInput:
    """Decodes at the given context lengths, then prefill chunks (cached tokens, new tokens); fresh blocks."""
    pool = runner.cache.pool
    seq_lens = decode_lens + [c + n for c, n in chunks]
    query_lens = [1] * len(decode_lens) + [n for _, n in chunks]
    tables = [pool.allocate(runner.blocks_for(n)) for n in seq_lens]
    g = torch.Generator().manual_seed(sum(seq_lens))
    ids = torch.randint(0, runner.config.vocab_size, (sum(query_lens),), generator=g).tolist()
    return StepInput(tables, seq_lens, ids, query_lens)


def test_mixed_step_does_not_sync(runner):
    """torch.cuda.set_sync_debug_mode("error") raises on any host<->device sync (.tolist(), .item(), a
    blocking copy): the eager mixed step must launch every layer without waiting for the GPU."""
    inp = mixed_step(runner, [37, 300, 5], [(0, 100), (64, 33), (200, 1)])
    try:
        runner.step(inp)  # warm-up: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        logits = runner.step(inp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        for table in inp.block_tables:
            runner.cache.pool.free(table)
    assert logits.shape == (6, runner.config.vocab_size) and torch.isfinite(logits).all()


def test_mixed_step_triton_prefill_matches_sdpa(monkeypatch):
    """The same fp32 mixed step with the prefill rows through the Triton kernel and through the SDPA loop:
    fp32 attention both ways (IEEE dots in the kernel), so the logits agree to fp32 rounding (1e-4 after two
    layers and the LM head, relative to logits of order 1)."""
    runner = tiny_runner(torch.float32)
    inp = mixed_step(runner, [37, 300, 5, 64], [(0, 100), (64, 33), (200, 1), (17, 250)])
    try:
        monkeypatch.setenv("DECODING_PREFILL_ATTENTION", "sdpa")
        want = runner.step(inp).clone()
        monkeypatch.setenv("DECODING_PREFILL_ATTENTION", "triton")
        got = runner.step(inp)
    finally:
        runner.free_cache()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
