"""The Triton varlen paged prefill attention kernel against decoding.reference.paged_attention_ref.

Tolerances: fp32 1e-5 (the same fp32 arithmetic in another order: the kernel's online softmax against the
reference's one softmax). bf16/fp16 rtol = atol = 1.6e-2, two ulps of an output near 1: both round one fp32
result to the 16-bit type (the interpreter truncates, so up to 1 ulp), and on GPU the kernel rounds the
softmax weights to the value dtype before p.v (flash attention does the same). On GPU, at realistic shapes,
the ratio rule instead: the kernel's largest error against the fp32 reference at most twice that of torch's
SDPA run in the same 16-bit dtype, plus one rounding of the output.
"""

from __future__ import annotations

import pytest
import torch

from decoding.reference import paged_attention_ref

attention = pytest.importorskip("decoding.kernels.attention", reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
BLOCK = 16
# (num_heads, num_kv_heads, head_dim, [(cached tokens, new tokens) per sequence], window)
CASES = [
    # group 2; a whole prompt, a 1-token chunk next to longer ones, lengths off the block (16) and tile
    # (8 query tokens x 2 heads on CPU) sizes, a chunk of exactly one block after one block, a tile whose
    # last query sits on the first key of a key step (9 + 7 = 16)
    (4, 2, 64, [(0, 37), (20, 1), (45, 13), (16, 16), (3, 5), (9, 12)], None),
    (4, 4, 64, [(0, 23), (31, 9)], None),  # MHA: group 1
    (6, 2, 128, [(0, 19), (40, 7)], None),  # group 3, padded to 4 rows a token; head_dim 128
    (8, 1, 64, [(0, 20), (33, 2)], 7),  # MQA (group 8) with a sliding window
    (4, 2, 64, [(0, 37), (50, 20)], 10),  # a window shorter than the chunk and than the cached part
]


def setup(num_heads, num_kv_heads, head_dim, chunks, dtype, device=DEVICE, block=BLOCK, seed=0):
    """Random caches with each sequence's blocks scattered over the pool; q [num_tokens, H, D] as a strided
    view into a fused qkv row (as the model makes it); host lists of starts and lengths."""
    g = torch.Generator().manual_seed(seed + head_dim + sum(c + n for c, n in chunks))
    seq_lens = [c + n for c, n in chunks]
    starts = [0]
    for _, n in chunks:
        starts.append(starts[-1] + n)
    need = [-(-n // block) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n] + [0] * (max(need) - n))
        at += n
    k = torch.randn(num_blocks, block, num_kv_heads, head_dim, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, block, num_kv_heads, head_dim, generator=g).to(device, dtype)
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype)
    q = qkv[:, : num_heads * head_dim].view(starts[-1], num_heads, head_dim)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return q, k, v, as_dev(tables), as_dev(seq_lens), as_dev(starts), starts, seq_lens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}n{len(c[3])}w{c[4]}")
def test_prefill_kernel_matches_reference(case, dtype):
    num_heads, num_kv_heads, head_dim, chunks, window = case
    q, k, v, tables, lens, starts, _, _ = setup(num_heads, num_kv_heads, head_dim, chunks, dtype)
    scale = head_dim ** -0.5
    want = paged_attention_ref(q, k, v, tables, lens, starts, scale, window)
    got = attention.paged_prefill_attention(q, k, v, tables, lens, starts, scale, window)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("tile", [(32, 16), (16, 32), (64, 64)])
def test_prefill_kernel_tile_shapes(tile):
    """Other tile shapes: more query tokens per tile than the shortest chunks hold, keys steps wider than a
    block, and one tile covering most of a chunk."""
    block_m, block_n = tile
    q, k, v, tables, lens, starts, _, _ = setup(4, 2, 64, [(0, 37), (20, 1), (45, 13), (3, 30)], torch.float32)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.125, None)
    got = attention.paged_prefill_attention(q, k, v, tables, lens, starts, 0.125, None, block_m=block_m,
                                            block_n=block_n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_skips_short_rows():
    """min_query=2 leaves the rows of one-token sequences to the decode kernel: untouched in out."""
    q, k, v, tables, lens, starts, host_starts, _ = setup(4, 2, 64, [(20, 1), (0, 9), (7, 1), (30, 6)],
                                                          torch.float32)
    out = torch.full(q.shape, 7.0, device=DEVICE)
    attention.paged_prefill_attention(q, k, v, tables, lens, starts, 0.125, None, out=out, min_query=2)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.125, None)
    decode_rows = [host_starts[0], host_starts[2]]
    others = [i for i in range(q.shape[0]) if i not in decode_rows]
    assert (out[decode_rows] == 7.0).all()
    torch.testing.assert_close(out[others], want[others], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("window", [None, 6])
def test_mixed_step_through_each_prefill_backend(backend, window, monkeypatch):
    """prefill_attention (decode rows to the split-K kernel, the rest to the chosen backend) with the host
    lists, decodes first as the scheduler orders them and interleaved."""
    monkeypatch.setenv("DECODING_PREFILL_ATTENTION", backend)
    assert attention.prefill_backend(torch.device(DEVICE)) == backend
    for chunks in ([(19, 1), (2, 1), (39, 1), (0, 9), (7, 5)], [(19, 1), (0, 9), (2, 1), (7, 5), (39, 1)]):
        q, k, v, tables, lens, starts, host_starts, host_lens = setup(4, 2, 32 * 2, chunks, torch.float32)
        want = paged_attention_ref(q, k, v, tables, lens, starts, 0.2, window)
        got = attention.paged_attention(q, k, v, tables, lens, starts, 0.2, window, 64, host_starts, host_lens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefill_backend_rejects_unknown_choice(monkeypatch):
    monkeypatch.setenv("DECODING_PREFILL_ATTENTION", "flash")
    with pytest.raises(ValueError, match="DECODING_PREFILL_ATTENTION must be triton or sdpa"):
        attention.prefill_backend(torch.device(DEVICE))


# ------------------------------------------------------------------------------------------ GPU, real shapes
def ratio_rule(got: torch.Tensor, truth: torch.Tensor, low: torch.Tensor) -> tuple[float, float]:
    """(kernel error, allowed): 2x the low-precision SDPA's error against the fp32 truth plus one rounding
    of the output in its dtype."""
    rounding = (truth.to(got.dtype) + 0.3 - 0.3 - truth.to(got.dtype)).float().abs().max().item()
    err = (got.float() - truth).abs().max().item()
    return err, 2 * (low.float() - truth).abs().max().item() + rounding


GPU_CASES = {
    # the serving benchmark's mixed step on the 8B shape: 64 decodes (~1200 tokens of context) next to two
    # 256-token chunks, after 0 and 1024 cached tokens
    "8b-mixed": (32, 8, 128, [(1200 + 7 * i, 1) for i in range(64)] + [(0, 256), (1024, 256)], None),
    "8b-prompt-2048": (32, 8, 128, [(0, 2048)], None),
    "8b-chunks": (32, 8, 128, [(0, 1000), (1500, 129), (4000, 77), (17, 2)], None),
    "window": (32, 8, 128, [(0, 700), (3000, 300)], 512),
    "1b-group4-d64": (32, 8, 64, [(0, 513), (800, 200)], None),
}


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_prefill_kernel_gpu_ratio_rule(name, dtype):
    num_heads, num_kv_heads, head_dim, chunks, window = GPU_CASES[name]
    q, k, v, tables, lens, starts, host_starts, host_lens = setup(num_heads, num_kv_heads, head_dim, chunks, dtype)
    scale = head_dim ** -0.5
    truth = paged_attention_ref(q.float(), k.float(), v.float(), tables, lens, starts, scale, window)
    rows = [b for b in range(len(chunks)) if chunks[b][1] > 1]
    low = torch.zeros_like(q)
    attention.prefill_attention_sdpa(q, k, v, tables, scale, window, host_starts, host_lens, rows, low)
    got = attention.paged_prefill_attention(q, k, v, tables, lens, starts, scale, window, min_query=2)
    sel = torch.cat([torch.arange(host_starts[b], host_starts[b + 1]) for b in rows]).cuda()
    err, allowed = ratio_rule(got[sel], truth[sel], low[sel])
    print(f"{name} {dtype}: kernel error {err:.3g}, allowed {allowed:.3g}")
    assert err <= allowed
    # the whole op (decode rows through the split-K kernel) against the reference
    full = attention.paged_attention(q, k, v, tables, lens, starts, scale, window, 131072, host_starts, host_lens)
    torch.testing.assert_close(full.float(), truth, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_prefill_kernel_gpu_fp32_exact_enough():
    """fp32 on GPU: IEEE dots (no TF32), so the fp32 tolerance holds at a real shape."""
    q, k, v, tables, lens, starts, _, _ = setup(32, 8, 128, [(0, 300), (900, 100), (5, 3)], torch.float32)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 128 ** -0.5, None)
    got = attention.paged_prefill_attention(q, k, v, tables, lens, starts, 128 ** -0.5, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,bound", [(None, 64), (6, 64), (None, 600)])  # 600: 5 partitions + merge
def test_mixed_attention_split_on_device_with_padding(window, bound):
    """paged_mixed_attention (the graphed mixed step's attention: rows split by device tensors) over a step
    padded to more tokens and sequences: real rows match the reference (fp32, 1e-5 as above), a decode row
    has the very bits of the split-K kernel run on the decode rows alone (the eager split), padding tokens
    are zeros. Includes a 1-token chunk of a prefill (a decode row too) and rows out of the scheduler's order."""
    chunks = [(19, 1), (0, 9), (2, 1), (7, 5), (39, 1), (0, 1)]
    q, k, v, tables, lens, starts, host_starts, _ = setup(4, 2, 64, chunks, torch.float32)
    n, b = q.shape[0], len(chunks)
    tokens, seqs = 32, 8
    g = torch.Generator().manual_seed(3)
    q_pad = torch.cat([q, torch.randn(tokens - n, *q.shape[1:], generator=g).to(q)])
    pad_tables = torch.cat([tables, torch.randint(0, k.shape[0], (seqs - b, tables.shape[1]), generator=g).to(tables)])
    pad_lens = torch.cat([lens, torch.zeros(seqs - b, dtype=lens.dtype, device=DEVICE)])
    pad_starts = torch.cat([starts, torch.full((seqs - b,), n, dtype=starts.dtype, device=DEVICE)])
    split = attention.mixed_split(pad_starts, pad_lens, tokens)
    got = attention.paged_mixed_attention(q_pad, k, v, pad_tables, pad_lens, pad_starts, 0.2, window, bound, *split)
    assert got.shape == q_pad.shape
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.2, window)
    torch.testing.assert_close(got[:n], want, rtol=1e-5, atol=1e-5)
    assert (got[n:] == 0).all()
    single = [i for i, (_, m) in enumerate(chunks) if m == 1]
    rows = torch.tensor(single, device=DEVICE)
    toks = torch.tensor([host_starts[i] for i in single], device=DEVICE)
    eager = attention.paged_decode_attention(q[toks], k, v, tables[rows], lens[rows], 0.2, window, bound)
    assert torch.equal(got[toks], eager)
