"""Varlen paged prefill attention in Triton: one launch for every prefill sequence of a step.

_prefill_kernel (paged_prefill_attention, flash-attention style): one program per (query tile, KV head),
a tile being a few query tokens of one sequence times the GROUP query heads that share the KV head, so
K/V are read once per group straight from the paged cache through the block table; the queries are the
last n_q of the sequence's seq_len positions (bottom-right causal alignment), sliding windows included.
Tiles find their sequence on the device (a binary search over query_start_loc), so the launch needs no
host list and can be captured in a CUDA graph. Online softmax in fp32 (scores in log2 units); IEEE fp32
dots for fp32 inputs and under the CPU interpreter. kernels/attention.py routes steps here (and keeps the
decode kernel and the SDPA fallback); decoding.reference.paged_attention_ref is the reference. Tile sizes
(PREFILL_*) are the H100 winners of `benches/bench_prefill_attention.py --sweep`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _find_seq(starts_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that query tile `tile` belongs to: sequence b owns the tiles from starts[b] // BLOCK_Q + b
    on (ceil(n_q / BLOCK_Q) of them, which never reach the next sequence's first tile); binary search."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(starts_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_step(q, m, denom, acc, k_ptr, v_ptr, table_ptr, tok0, seq_len, q_pos, scale_log2, window, kv_head,
                  kc_stride_b, kc_stride_s, kc_stride_h,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N-key step of the online softmax for every row of the tile. Without CAUSAL (keys every
    row sees, all < seq_len) nothing is masked."""
    toks = tok0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if CAUSAL:
        valid = toks < seq_len
        block_ids = tl.load(table_ptr + toks // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    else:
        block_ids = tl.load(table_ptr + toks // BLOCK_SIZE).to(tl.int64)
    kv_off = block_ids[:, None] * kc_stride_b + (toks % BLOCK_SIZE)[:, None] * kc_stride_s \
        + kv_head * kc_stride_h + dims[None, :]
    if CAUSAL:
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
    if IEEE:
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
    if CAUSAL or HAS_WINDOW:
        allowed = toks[None, :] >= 0
        if CAUSAL:
            allowed = allowed & (toks[None, :] <= q_pos[:, None]) & valid[None, :]
        if HAS_WINDOW:
            allowed = allowed & ((q_pos[:, None] - toks[None, :]) < window)
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet (window)
    alpha = tl.math.exp2(m - m_safe)
    p = tl.math.exp2(scores - m_safe[:, None])
    denom = denom * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, denom, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr, starts_ptr, num_seqs, scale_log2, window,
                    q_stride_t, q_stride_h, o_stride_t, o_stride_h, kc_stride_b, kc_stride_s, kc_stride_h,
                    tables_stride,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MIN_QUERY: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile; each brings its GROUP heads
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(starts_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(starts_ptr + seq)
    n_q = tl.load(starts_ptr + seq + 1) - q_start
    q0 = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # this tile's first query, counted in the chunk
    if (n_q < MIN_QUERY) | (q0 >= n_q):
        return  # a decode row (the split-K kernel's), or a spare tile
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - n_q  # tokens cached before the chunk: query i sits at position ctx + i
    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    row_mask = (qi < n_q) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM)
    tok_rows = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok_rows[:, None] * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D]
    if IEEE:
        q = q.to(tl.float32)
    q_pos = ctx + qi
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    table_ptr = tables_ptr + seq.to(tl.int64) * tables_stride
    first = ctx + q0  # the tile's first query position: every row sees all keys before it
    lo = 0
    if HAS_WINDOW:  # ... from the first key the first query's window holds
        lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
    diag = tl.maximum((first // BLOCK_N) * BLOCK_N, lo)
    hi = tl.minimum(first + BLOCK_Q, seq_len)  # one past the last query's position
    for tok0 in range(lo, diag, BLOCK_N):  # keys below the diagonal: no causal mask
        m, denom, acc = _prefill_step(q, m, denom, acc, k_ptr, v_ptr, table_ptr, tok0, seq_len, q_pos, scale_log2,
                                      window, kv_head, kc_stride_b, kc_stride_s, kc_stride_h, HEAD_DIM, BLOCK_SIZE,
                                      BLOCK_N, False, HAS_WINDOW, IEEE)
    for tok0 in range(diag, hi, BLOCK_N):
        m, denom, acc = _prefill_step(q, m, denom, acc, k_ptr, v_ptr, table_ptr, tok0, seq_len, q_pos, scale_log2,
                                      window, kv_head, kc_stride_b, kc_stride_s, kc_stride_h, HEAD_DIM, BLOCK_SIZE,
                                      BLOCK_N, True, HAS_WINDOW, IEEE)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + tok_rows[:, None] * o_stride_t + heads[:, None] * o_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


# Tile shape of the prefill kernel on GPU: BLOCK_M rows (query tokens x the GROUP heads of a KV head),
# BLOCK_N keys per step. benches/bench_prefill_attention.py --sweep times the alternatives.
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_WARPS = 4
PREFILL_STAGES = 2


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
                            min_query: int = 1, block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Causal GQA attention of every sequence's new tokens over the paged cache, in one launch.

    q: [num_tokens, num_heads, head_dim] (last dim contiguous), sequence b's new tokens at
    query_start_loc[b]:query_start_loc[b + 1], the last of its seq_lens[b] tokens (bottom-right causal
    alignment; K/V of all of them already in the cache). Caches [num_blocks, block_size, num_kv_heads,
    head_dim]. One program per (query tile, KV head): a tile is BLOCK_M // GROUP query tokens of one
    sequence times the GROUP query heads sharing that KV head, so K/V are read once per group (no repeat),
    straight from the cache through the block table, with an online softmax in fp32. Tiles map to
    sequences on the device (_find_seq), so the launch needs no host list and no sync. Sequences with
    fewer than min_query new tokens are skipped (their rows of out are left as they are).
    Returns out ([num_tokens, num_heads, head_dim], q's dtype; allocated when None).

    Example: paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, starts, head_dim ** -0.5)
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.stride() == v_cache.stride()
    assert head_dim == triton.next_power_of_2(head_dim) and head_dim >= 16
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    interpreted = q.device.type == "cpu"
    block_m = max(block_m or (16 if interpreted else PREFILL_BLOCK_M), group_pad, 16)
    block_n = block_n or (16 if interpreted else PREFILL_BLOCK_N)
    num_seqs = seq_lens.shape[0]
    tiles = num_tokens // (block_m // group_pad) + num_seqs  # a bound: spare tiles exit at once
    if num_tokens == 0 or num_seqs == 0:
        return out
    _prefill_kernel[(tiles, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, num_seqs,
        scale * 1.4426950408889634, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, MIN_QUERY=min_query, HAS_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32 or interpreted,
        num_warps=num_warps or PREFILL_WARPS, num_stages=num_stages or PREFILL_STAGES)
    return out
