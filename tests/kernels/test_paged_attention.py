"""Triton paged decode attention against decoding.reference.paged_attention_ref.

Tolerances: fp32 1e-5 (the same fp32 arithmetic in a different order); bf16/fp16 two ulps of the output
(rtol 1.6e-2): both round one fp32 result to the 16-bit type, after sums taken in different orders.
"""

from __future__ import annotations

import pytest
import torch

from decoding.reference import paged_attention_ref

attention = pytest.importorskip("decoding.kernels.attention", reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1.6e-2}
# (num_heads, num_kv_heads, head_dim, seq_lens, window)
CASES = [
    (4, 4, 32, [1, 17, 40], None),  # MHA, a one-token context, lengths not a multiple of the block
    (6, 2, 64, [5, 33], None),  # GQA groups of 3 (padded to 4 in the kernel)
    (8, 1, 32, [70], 24),  # MQA with a sliding window shorter than the context
] + ([(32, 8, 128, [1, 129, 1000, 4099], None), (9, 3, 64, [77] * 33, None)] if DEVICE == "cuda" else [])
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
BLOCK = 16


def _setup(num_heads, num_kv_heads, head_dim, seq_lens, dtype):
    torch.manual_seed(sum(seq_lens) + head_dim)
    need = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks).tolist()  # blocks of a sequence are scattered over the pool
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n] + [0] * (max(need) - n))
        at += n
    k = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    # q as the model makes it: a strided view into a fused qkv row
    qkv = torch.randn(len(seq_lens), (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(len(seq_lens), num_heads, head_dim)
    return (q, k, v, torch.tensor(tables, dtype=torch.int32, device=DEVICE),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"h{c[0]}kv{c[1]}d{c[2]}n{max(c[3])}w{c[4]}")
def test_decode_matches_reference(case, dtype):
    num_heads, num_kv_heads, head_dim, seq_lens, window = case
    q, k, v, tables, lens = _setup(num_heads, num_kv_heads, head_dim, seq_lens, dtype)
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    want = paged_attention_ref(q, k, v, tables, lens, starts, scale, window)
    got = attention.paged_attention(q, k, v, tables, lens, starts, scale, window)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 40])
def test_split_k_partitions_merge_exactly(dtype, window):
    """A bound of 1000 tokens allows 4 partitions (32 on GPU, with a bound of 8000): each context is cut
    into partitions of >= MIN_PART (256) tokens, 600 into 3; the merged result must equal the reference
    whatever the bound."""
    seq_lens = [1, 127, 128, 129, 300, 600] + ([900, 4099] if DEVICE == "cuda" else [])
    q, k, v, tables, lens = _setup(6, 2, 32, seq_lens, dtype)
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEVICE)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.3, window)
    bound = 8000 if DEVICE == "cuda" else 1000
    assert attention.num_partitions(bound) >= 4  # really several partitions
    got = attention.paged_attention(q, k, v, tables, lens, starts, 0.3, window, max_seq_len=bound)
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("bound", [None, 1000])
def test_padding_rows_output_zeros(bound):
    """Rows with seq_len 0 pad a CUDA-graph bucket: they read nothing and output zeros."""
    q, k, v, tables, lens = _setup(4, 2, 32, [20, 1, 33], torch.float32)
    lens[1] = 0
    starts = torch.arange(4, dtype=torch.int32, device=DEVICE)
    got = attention.paged_attention(q, k, v, tables, lens, starts, 0.2, None, max_seq_len=bound or 33)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    keep = torch.tensor([0, 2], device=DEVICE)
    want = paged_attention_ref(q[keep], k, v, tables[keep], lens[keep], starts[:3], 0.2, None)
    torch.testing.assert_close(got[keep], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("window", [None, 6])
def test_prefill_matches_reference(window, backend, monkeypatch):
    """Prefill (9 new of 9) and chunked prefill (5 new of 12 tokens: the mask is offset) through the Triton
    prefill kernel and through SDPA (tests/kernels/test_prefill_attention.py has the kernel's own cases)."""
    monkeypatch.setenv("DECODING_PREFILL_ATTENTION", backend)
    q, k, v, tables, lens = _setup(4, 2, 32, [9, 12], torch.float32)
    q = torch.randn(14, 4, 32, device=DEVICE)
    starts = torch.tensor([0, 9, 14], dtype=torch.int32, device=DEVICE)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.2, window)
    got = attention.paged_attention(q, k, v, tables, lens, starts, 0.2, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["decodes-first", "interleaved"])
@pytest.mark.parametrize("window", [None, 6])
def test_mixed_step_decode_rows_match_reference(order, window):
    """A continuous-batching step: one-token rows (decodes, through the split-K kernel in one launch)
    next to prefill chunks (SDPA), either as the scheduler orders them (decodes first) or interleaved."""
    q_lens = {"decodes-first": [1, 1, 1, 9, 5], "interleaved": [1, 9, 1, 5, 1]}[order]
    seq_lens = {"decodes-first": [20, 3, 40, 9, 12], "interleaved": [20, 9, 3, 12, 40]}[order]
    q, k, v, tables, lens = _setup(4, 2, 32, seq_lens, torch.float32)
    q = torch.randn(sum(q_lens), 4, 32, device=DEVICE)
    starts = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    want = paged_attention_ref(q, k, v, tables, lens, starts, 0.2, window)
    got = attention.paged_attention(q, k, v, tables, lens, starts, 0.2, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_step_reads_host_lists_not_device(monkeypatch):
    """Given host copies of query_start_loc and seq_lens (AttentionMetadata.build makes them), a mixed step
    never reads the device tensors: on a GPU each .tolist() / .item() would sync the host with it in
    every layer. Tensor.tolist and Tensor.item raise here while the op runs."""
    q_lens, seq_lens = [1, 1, 9, 5, 1], [20, 3, 9, 12, 40]
    q, k, v, tables, lens = _setup(4, 2, 32, seq_lens, torch.float32)
    q = torch.randn(sum(q_lens), 4, 32, device=DEVICE)
    starts = [0] + torch.tensor(q_lens).cumsum(0).tolist()
    starts_dev = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    want = paged_attention_ref(q, k, v, tables, lens, starts_dev, 0.2, None)

    def device_read(*args, **kwargs):
        raise AssertionError("the attention op read a device tensor on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", device_read)
    monkeypatch.setattr(torch.Tensor, "item", device_read)
    got = attention.paged_attention(q, k, v, tables, lens, starts_dev, 0.2, None, 64, starts, seq_lens)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
