"""Paged GQA decode attention in Triton: one new query token per sequence, K/V read through block tables.

One program per (sequence, KV head): it loads the GROUP query heads that share the KV head, walks the
sequence's blocks BLOCK_N tokens at a time with an online softmax (fp32 scores, max and sum), and writes
the GROUP output heads. No host sync: sequence lengths and block tables are read on the device.
Numerics as decoding.reference.paged_attention_ref (fp32 accumulation, output in q's dtype).
Prefill and chunked prefill (several new tokens per sequence) stay on the reference path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, scale, window,
                         q_stride_t, q_stride_h, o_stride_t, o_stride_h, kc_stride_b, kc_stride_s, kc_stride_h,
                         tables_stride,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_mask = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=head_mask[:, None], other=0.0).to(tl.float32)  # [GROUP_PAD, D]
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    start_tok = 0
    if HAS_WINDOW:  # the query sits at position seq_len - 1 and sees keys with distance < window
        start_tok = tl.maximum(seq_len - window, 0)
    first_block = start_tok // BLOCK_SIZE
    for blk in range(first_block, tl.cdiv(seq_len, BLOCK_SIZE)):
        block_id = tl.load(tables_ptr + seq * tables_stride + blk).to(tl.int64)
        toks = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = (toks < seq_len) & (toks >= start_tok)
        kv_off = block_id * kc_stride_b + tl.arange(0, BLOCK_SIZE)[:, None] * kc_stride_s \
            + kv_head * kc_stride_h + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK_SIZE, D]
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * o_stride_t + heads[:, None] * o_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (one new token per sequence; last dim contiguous); caches
    [num_blocks, block_size, num_kv_heads, head_dim]; returns [num_seqs, num_heads, head_dim]."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.stride() == v_cache.stride()
    assert head_dim == triton.next_power_of_2(head_dim) and block_size == triton.next_power_of_2(block_size)
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 1), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        HAS_WINDOW=sliding_window is not None, num_warps=4)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """decoding.ops.paged_attention: the kernel for decode steps (one token per sequence, decided from
    shapes alone, so no host sync), the reference for prefill."""
    if q.shape[0] == block_tables.shape[0] and q.stride(-1) == 1:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window)
    from decoding.reference import paged_attention_ref

    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)
