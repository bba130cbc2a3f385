"""Mixed steps (prefill chunks, with or without decode rows) through the CUDA-graph path of ModelRunner:
host-side staging and bucketing on CPU, the captured graphs against eager steps on CUDA (marked gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decoding.bench import preset_config
from decoding.cache import AttentionMetadata
from decoding.loader import build_model, load_weights, random_tensors
from decoding.runner import (MIXED_MAX_TOKENS, ModelRunner, StepInput, mixed_forward, mixed_layout,
                             stage_mixed_step, token_bucket, token_buckets)

CUDA = torch.cuda.is_available()


def make_runner(device: str, dtype: torch.dtype, num_blocks: int = 128, seed: int = 0) -> ModelRunner:
    config = preset_config("tiny")
    model = build_model(config, torch.device(device), dtype)
    load_weights(model, random_tensors(config, torch.device(device), dtype, seed))
    runner = ModelRunner(model, block_size=16)
    runner.allocate_cache(num_blocks)
    return runner


def mixed_step(runner: ModelRunner, decode_lens: list[int], chunks: list[tuple[int, int]], seed: int = 0,
               prev_rows: bool = False) -> StepInput:
    """Decodes at the given context lengths, then prefill chunks (cached tokens, new tokens), on fresh blocks
    taken in a shuffled order; the cached part of each sequence is filled with random K/V first. With
    prev_rows, every decode row's token comes from the runner's recorded tokens (row i <- row 2 i + 1)."""
    pool = runner.cache.pool
    g = torch.Generator().manual_seed(seed)
    seq_lens = decode_lens + [c + n for c, n in chunks]
    query_lens = [1] * len(decode_lens) + [n for _, n in chunks]
    free = pool.allocate(sum(runner.blocks_for(n) for n in seq_lens))
    order = torch.randperm(len(free), generator=g).tolist()
    tables, at = [], 0
    for n in seq_lens:
        k = runner.blocks_for(n)
        tables.append([free[i] for i in order[at:at + k]])
        at += k
    for layer in (*runner.cache.k, *runner.cache.v):
        for table in tables:
            idx = torch.tensor(table, device=layer.device)
            layer[idx] = torch.randn(layer[idx].shape, generator=g).to(layer)
    ids = torch.randint(0, runner.config.vocab_size, (sum(query_lens),), generator=g).tolist()
    rows = None
    if prev_rows:
        rows = [2 * i + 1 for i in range(len(decode_lens))] + [-1] * (len(ids) - len(decode_lens))
    return StepInput(tables, seq_lens, ids, query_lens, rows)


def free_step(runner: ModelRunner, inp: StepInput) -> None:
    for table in inp.block_tables:
        runner.cache.pool.free(table)


# ------------------------------------------------------------------------------------------ CPU: host side
def test_token_bucket():
    assert [token_bucket(n) for n in (1, 15, 16, 17, 255, 256, 257)] == [16, 16, 16, 32, 256, 256, 320]
    assert token_buckets(1024) == [16, 32, 64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1024]
    for n in range(257, MIXED_MAX_TOKENS + 1):  # past 256, at most a quarter of a step is padding
        assert n <= token_bucket(n) < 1.25 * n + 1
    assert token_bucket(MIXED_MAX_TOKENS) == MIXED_MAX_TOKENS and token_bucket(MIXED_MAX_TOKENS + 1) is None
    assert token_bucket(513, max_tokens=512) is None and token_bucket(512, max_tokens=512) == 512
    # the scheduler's budget is a bucket of its own (a full step pads nothing), within max_tokens only
    assert token_buckets(512, budget=288) == [16, 32, 64, 128, 256, 288, 320, 384, 448, 512]
    assert token_buckets(512, budget=320) == token_buckets(512) == token_buckets(512, budget=600)
    assert [token_bucket(n, 512, 288) for n in (256, 257, 288, 289)] == [256, 288, 288, 320]
    assert token_bucket(100, 512, 100) == 100 and token_bucket(101, 512, 100) == 128


def test_mixed_graph_shape_takes_the_steps_budget(monkeypatch):
    """The budget travels with the step (StepInput.token_budget), so every tensor-parallel rank, which
    gets the step and not the engine's config, pads it to the same graph."""
    import decoding.runner as runner_mod

    runner = make_runner("cpu", torch.float32, num_blocks=8)
    runner.cuda_graphs = True  # shapes only: nothing is captured or run here
    monkeypatch.setattr(runner_mod.ops, "select", lambda op, device: "triton")
    inp = StepInput([[0]] * 2, [150, 138], [0] * 288, [150, 138])
    assert runner.mixed_graph_shape(inp) == (320, 2)
    inp.token_budget = 288
    assert runner.mixed_graph_shape(inp) == (288, 2)


def test_stage_mixed_step_layout():
    """The staged step holds what AttentionMetadata.build and StepInput.positions give the eager step, plus
    padding: id 0, position 0, slot -1 (no KV write) per padding token; seq_len 0 and no new tokens per
    padding sequence; the block tables packed [num_seqs, cols] after the header."""
    inp = StepInput([[3, 4], [7], [9, 10, 11, 12], [5, 6]], [20, 5, 40, 17], list(range(100, 110)), [1, 5, 3, 1])
    tokens, seqs, bs = 16, 8, 16
    buf = np.full(4 * tokens + 2 * seqs + 1 + 4 * 4 + 5, -7, dtype=np.int32)
    sources = list(range(1000, 1000 + tokens))
    used, cols = stage_mixed_step(buf, inp, tokens, seqs, bs, sources)
    assert cols == 3 and used == 4 * tokens + 2 * seqs + 1 + 4 * 3
    assert (buf[used:] == -7).all()
    ids, pos, slots, src, lens, starts = (buf[sl].tolist() for sl in mixed_layout(tokens, seqs))
    meta = AttentionMetadata.build(inp.block_tables, inp.seq_lens, inp.query_lens, bs, "cpu")
    n = len(inp.input_ids)
    assert ids == inp.input_ids + [0] * (tokens - n)
    assert pos == inp.positions() + [0] * (tokens - n)
    assert slots == meta.slot_mapping.tolist() + [-1] * (tokens - n)
    assert src == sources
    assert lens == inp.seq_lens + [0] * (seqs - 4)
    assert starts == meta.query_start_loc.tolist() + [n] * (seqs - 4)
    tables = buf[4 * tokens + 2 * seqs + 1: used].reshape(4, 3).tolist()
    assert tables == [[3, 4, 0], [7, 0, 0], [9, 10, 11], [5, 6, 0]]  # columns past a sequence's last block: 0


@pytest.mark.parametrize("prev_rows", [False, True])
def test_mixed_forward_matches_eager_step_on_cpu(prev_rows):
    """The graphs' work (mixed_forward: staged step, padded to a token and sequence bucket, ids resolved on
    the device) run eagerly on CPU equals ModelRunner.step's eager path: fp32, the same ops on the real rows
    (row-wise GEMMs at another row count), so 1e-5."""
    runner = make_runner("cpu", torch.float32)
    runner.record_tokens(torch.randint(0, runner.config.vocab_size, (64,), generator=torch.Generator().manual_seed(1)))
    inp = mixed_step(runner, [37, 5, 64], [(0, 20), (17, 1), (30, 7)], seed=2, prev_rows=prev_rows)
    want = runner.step(inp)
    tokens, seqs = token_bucket(len(inp.input_ids)), 8
    width = runner.blocks_for(runner.attention_bound())
    buf = np.zeros(4 * tokens + 2 * seqs + 1 + inp.num_seqs * width, dtype=np.int32)
    used, cols = stage_mixed_step(buf, inp, tokens, seqs, runner.block_size, runner.id_sources(inp.prev_rows, tokens))
    staging = torch.from_numpy(buf)
    tables = torch.zeros(seqs, width, dtype=torch.int32)
    base = 4 * tokens + 2 * seqs + 1
    tables[: inp.num_seqs, :cols] = staging[base:used].view(inp.num_seqs, cols)
    with torch.inference_mode():
        got = mixed_forward(runner, staging, tables, tokens, seqs, runner.attention_bound())
    assert got.shape == (seqs, runner.config.vocab_size)
    torch.testing.assert_close(got[: inp.num_seqs], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ GPU: the graphs
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def kv_checksum(runner: ModelRunner, exclude: list[list[int]]) -> torch.Tensor:
    """Sum of the K and V bits (as int16) over every block no sequence of the step owns, per layer: never
    written blocks hold whatever the allocator's memory held, NaN patterns included (NaN != NaN)."""
    used = {b for table in exclude for b in table}
    idx = torch.tensor([b for b in range(runner.cache.num_blocks) if b not in used], device=runner.device)
    return torch.stack([c[idx].view(torch.int16).long().sum() for c in (*runner.cache.k, *runner.cache.v)])


# (decode context lengths, [(cached tokens, new tokens)]): 1-3 prefill chunks, 0-40 decode rows, a 1-token
# chunk, token counts exactly at a bucket (16, 64) and padded (e.g. 7 -> 16, 105 -> 128)
SHAPES = {
    "prefill-only-padded": ([], [(0, 7)]),
    "prefill-at-16": ([], [(0, 16)]),
    "two-chunks-at-16": ([], [(0, 9), (40, 7)]),
    "decodes+chunk-at-64-s4": ([37, 300, 5], [(0, 61)]),
    "decodes+1-token-chunk": ([37, 300, 5], [(0, 100), (64, 33), (200, 1)]),
    "40-decodes+3-chunks": ([17 + 13 * i for i in range(40)], [(0, 30), (129, 20), (5, 15)]),
    "30-decodes+2-chunks-at-64-s32": ([50 + 7 * i for i in range(30)], [(0, 17), (33, 17)]),
}


@pytest.fixture(scope="module")
def gpu_runner():
    runner = make_runner("cuda", torch.bfloat16, num_blocks=1024)
    yield runner
    runner.free_cache()


@pytest.mark.parametrize("prev_rows", [False, True], ids=["host-ids", "device-ids"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_mixed_graph_matches_eager(gpu_runner, name, prev_rows, monkeypatch):
    """The graphed mixed step against the eager one on the same inputs and cache (bf16). Exactly equal
    when the graph runs the eager shapes (token count at a bucket and sequence count at a bucket: the same
    GEMMs, the same attention kernels with the same partitioning); else the decode rows' attention is still
    the same kernel and bits, but cuBLAS picks its GEMM by the row count (padded T, padded S for the LM
    head), so logits agree to bf16 noise: 2 ulps of bf16 (2^-7) relative to the logits' scale. The KV cache
    outside the step's blocks is unchanged (padding writes nothing), and the step's own K/V equal."""
    runner = gpu_runner
    decodes, chunks = SHAPES[name]
    runner.record_tokens(torch.randint(0, runner.config.vocab_size, (128,), device="cuda"))
    inp = mixed_step(runner, decodes, chunks, seed=len(name), prev_rows=prev_rows and bool(decodes))
    try:
        before = kv_checksum(runner, inp.block_tables)
        runner.cuda_graphs = False
        want = runner.step(inp).clone()
        want_kv = [c.clone() for c in runner.cache.k]
        runner.cuda_graphs = True
        shape = runner.mixed_graph_shape(inp)
        assert shape is not None and shape[0] >= len(inp.input_ids)
        exact = shape[0] == len(inp.input_ids) and shape[1] == inp.num_seqs
        for _ in range(2):  # the first call captures, the second replays
            got = runner.step(inp)
            assert torch.equal(kv_checksum(runner, inp.block_tables), before)
            if exact:  # the step's own K (written again from the same qkv GEMM) too
                assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))
                           for a, b in zip(runner.cache.k, want_kv))
        assert got.shape == want.shape
        if exact:
            assert torch.equal(got, want)
        else:
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=0, atol=2 * 2**-7 * scale)
    finally:
        runner.cuda_graphs = True
        free_step(runner, inp)
    print(f"{name}: graph {shape}, exact={exact}, max |diff| {float((got - want).abs().max()):.3g}")


def test_capture_mixed_graphs_is_a_no_op_without_cuda():
    runner = make_runner("cpu", torch.float32, num_blocks=8)
    assert runner.capture_mixed_graphs(512, 64) == 0 and runner._mixed is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_capture_mixed_graphs_ahead(gpu_runner):
    """Capturing ahead (as bench --serve does) makes every (T, S) a 32-token, 4-sequence step can need and
    touches no KV block; a second call captures nothing new."""
    runner = gpu_runner
    runner.record_tokens(torch.zeros(8, dtype=torch.long, device="cuda"))
    before = kv_checksum(runner, [])
    runner._mixed = None
    assert runner.capture_mixed_graphs(32, 3) == 6
    assert sorted(runner._mixed.graphs) == [(16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4)]
    assert runner.capture_mixed_graphs(32, 3) == 0
    assert torch.equal(kv_checksum(runner, []), before)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_mixed_graphs_off_switch(gpu_runner, monkeypatch):
    inp = StepInput([[0]], [5], [1, 2, 3, 4, 5], [5])
    assert gpu_runner.mixed_graph_shape(inp) == (16, 1)
    monkeypatch.setenv("DECODING_MIXED_GRAPHS", "0")
    assert gpu_runner.mixed_graph_shape(inp) is None
    monkeypatch.setenv("DECODING_MIXED_GRAPHS", "1")
    monkeypatch.setenv("DECODING_PREFILL_ATTENTION", "sdpa")
    assert gpu_runner.mixed_graph_shape(inp) is None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("overlap", ["1", "0"])
def test_engine_generate_mixed_graphs_agree(overlap, monkeypatch):
    """Many prompts of mixed lengths through the engine, greedy, 128-token steps: chunked prefills next to
    decodes, i.e. mixed steps through the mixed graphs (with overlap: decode rows' tokens from the device).
    The agreement rule of tests/test_fast_path_gpu.py (Agreement: every greedy token is the fp32 argmax or
    within twice the bf16 reference's own error of it, teacher-forced). The same run with mixed graphs off
    is printed for comparison (not bit-exact: padded GEMM rows, see test_mixed_graph_matches_eager)."""
    from test_fast_path_gpu import Agreement

    from decoding import SamplingParams
    from decoding.bench import random_generator

    monkeypatch.setenv("DECODING_OVERLAP", overlap)
    config = preset_config("tiny")
    lengths = [5, 300, 17, 120, 64, 9, 250, 33, 1, 80, 200, 45]
    prompts = [" ".join(f"<{t}>" for t in torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist())
               for n in lengths]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("DECODING_MIXED_GRAPHS", mode)
        gen = random_generator(config, torch.device("cuda"), torch.bfloat16, seed=3, max_num_batched_tokens=128,
                               max_num_seqs=16)
        with torch.no_grad():
            for p in gen.model.parameters():
                if p.dim() == 2:
                    p.mul_(3.0)  # as test_fast_path_gpu: more spread, fewer near-ties
        with gen:
            results = gen.generate(prompts, params)
            outs[mode] = [o.token_ids for o in results]
            if mode == "1":
                assert gen.runner._mixed is not None and gen.runner._mixed.graphs, "no mixed graph ran"
                agreement = Agreement(gen)
                for i, out in enumerate(results):
                    stats = agreement.check(out.prompt_token_ids, out.token_ids, monkeypatch, fast_logits=False)
                    assert stats["beyond_noise"] == 0, (i, stats)
    same = sum(a == b for x, y in zip(outs["1"], outs["0"]) for a, b in zip(x, y))
    exact = sum(x == y for x, y in zip(outs["1"], outs["0"]))
    print(f"overlap {overlap}: graphs on vs off: {exact}/{len(prompts)} sequences identical, "
          f"{same}/{sum(map(len, outs['0']))} tokens at equal positions")
