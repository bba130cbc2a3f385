"""Paged GQA attention in Triton: a split-K (flash-decoding) kernel for decode, a varlen kernel for prefill.

Decode (one new query token per sequence): each sequence's context is cut into at most NUM_PARTS
partitions of at least MIN_PART tokens, sized from its own length on the device; one program per
(sequence, KV head, partition) loads the GROUP query heads sharing the KV head (padded to
16 rows for tl.dot), walks its partition BLOCK_N tokens at a time through the block table with an
online softmax (fp32 scores, max and sum), and leaves an unnormalised partial (max, sum, acc). A second
kernel merges the partials of each (sequence, head). With one partition the first kernel writes the
output itself. No host sync: lengths and block tables are read on the device, and the partition count
is fixed by a host-side bound on the context (`max_seq_len`), so the launch can be captured in a CUDA
graph; a short sequence uses few partitions and the rest exit at once. A sequence of length 0 (padding) outputs zeros.

Numerics: q·k in fp32 (tensor cores with fp32 accumulation for 16-bit inputs; IEEE fp32 for fp32
inputs, and for every dtype under the CPU interpreter, whose tl.dot mishandles bf16), softmax weights rounded to the value dtype before p·v (as flash attention does), output in
q's dtype. decoding.reference.paged_attention_ref is the reference.

Prefill and chunked prefill (several new tokens per sequence): one launch of kernels/prefill_attention.py's
_prefill_kernel for every sequence of the step (paged_prefill_attention, flash-attention style): one program per (query tile, KV
head), a tile being a few query tokens of one sequence times the GROUP query heads that share the KV
head, so K/V are read once per group straight from the paged cache; the queries are the last n_q of the
sequence's seq_len positions (bottom-right causal alignment), sliding windows included. Tiles find their
sequence on the device (a binary search over query_start_loc), so the launch needs no host list. In a
mixed step (continuous batching) the one-token rows go through the decode kernel instead (the same bits as
a graphed decode step); a graphed mixed step splits its rows on the device (paged_mixed_attention). prefill_attention_sdpa, the older loop of torch SDPA calls over K/V gathered from
the cache, stays as the fallback (DECODING_PREFILL_ATTENTION=sdpa) and the baseline of
benches/bench_prefill_attention.py.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right

# re-exported: tests and benches reach the prefill kernel and its tile sizes as attention.*
from .prefill_attention import (  # noqa: F401
    PREFILL_BLOCK_M,
    PREFILL_BLOCK_N,
    PREFILL_STAGES,
    PREFILL_WARPS,
    paged_prefill_attention,
)

BLOCK_N = 64  # tokens per inner step
MAX_PARTS = 64  # partitions per sequence at most
# Tokens per partition at least, and the partition kernel's pipelining. Swept on an H100 (8B shape,
# benches/bench_decode_attention.py, benches/NOTES.md): 256 tokens and 2 stages took batch 48 x context
# 1285 from 72.5% to 82.1% of copy bandwidth (the merge reads 2-4x fewer partials) at +1-2 us a layer for
# one sequence; 512 was 1.5 points better batched and slower alone.
MIN_PART = 256
DECODE_WARPS = 4
DECODE_STAGES: int | None = 2


def num_partitions(max_seq_len: int) -> int:
    """Partitions per sequence for contexts up to max_seq_len (fixed at launch, so graph-capturable)."""
    return max(1, min(MAX_PARTS, -(-max_seq_len // MIN_PART)))


@triton.jit
def _decode_part_kernel(q_ptr, k_ptr, v_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr, tables_ptr, seq_lens_ptr,
                        scale, window, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                        kc_stride_b, kc_stride_s, kc_stride_h, tables_stride,
                        NUM_HEADS: tl.constexpr, NUM_PARTS: tl.constexpr, MIN_PART: tl.constexpr,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        IEEE: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start_tok = 0
    if HAS_WINDOW:  # the query sits at position seq_len - 1 and sees keys with distance < window
        start_tok = tl.maximum(seq_len - window, 0)
    part_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_PARTS), BLOCK_N) * BLOCK_N, MIN_PART)
    lo = part * part_len
    hi = tl.minimum(lo + part_len, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    head_mask = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    if NUM_PARTS == 1:
        if seq_len == 0:  # padding row: defined output
            tl.store(out_ptr + seq * o_stride_t + heads[:, None] * o_stride_h + dims[None, :],
                     tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32).to(out_ptr.dtype.element_ty),
                     mask=head_mask[:, None])
            return
    if hi <= tl.maximum(lo, start_tok):
        return  # past the end of this sequence (or before its window): the merge skips this partition
    q = tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + dims[None, :],
                mask=head_mask[:, None], other=0.0)  # [GROUP_PAD, D]
    if IEEE:
        q = q.to(tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    first = tl.maximum(lo, (start_tok // BLOCK_N) * BLOCK_N)
    for tok0 in range(first, hi, BLOCK_N):
        toks = tok0 + tl.arange(0, BLOCK_N)
        valid = (toks < hi) & (toks >= start_tok)
        block_ids = tl.load(tables_ptr + seq * tables_stride + toks // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = block_ids[:, None] * kc_stride_b + (toks % BLOCK_SIZE)[:, None] * kc_stride_s \
            + kv_head * kc_stride_h + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if NUM_PARTS == 1:
        tl.store(out_ptr + seq * o_stride_t + heads[:, None] * o_stride_h + dims[None, :],
                 (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        idx = (seq * NUM_HEADS + heads) * NUM_PARTS + part  # [GROUP_PAD]
        tl.store(pm_ptr + idx, m, mask=head_mask)
        tl.store(pl_ptr + idx, denom, mask=head_mask)
        tl.store(pacc_ptr + idx[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None])


@triton.jit
def _merge_kernel(out_ptr, pm_ptr, pl_ptr, pacc_ptr, seq_lens_ptr, window, o_stride_t, o_stride_h,
                  NUM_HEADS: tl.constexpr, NUM_PARTS: tl.constexpr, MIN_PART: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    start_tok = 0
    if HAS_WINDOW:
        start_tok = tl.maximum(seq_len - window, 0)
    parts = tl.arange(0, NUM_PARTS)
    part_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_PARTS), BLOCK_N) * BLOCK_N, MIN_PART)  # as the kernel
    lo = parts * part_len
    live = tl.minimum(lo + part_len, seq_len) > tl.maximum(lo, start_tok)  # the partitions that ran
    base = (seq * NUM_HEADS + head) * NUM_PARTS
    pm = tl.load(pm_ptr + base + parts, mask=live, other=float("-inf"))
    pl = tl.load(pl_ptr + base + parts, mask=live, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    pacc = tl.load(pacc_ptr + (base + parts)[:, None] * HEAD_DIM + dims[None, :], mask=live[:, None], other=0.0)
    m = tl.max(pm, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no live partition: avoid -inf - -inf
    w = tl.where(live, tl.exp(pm - m), 0.0)
    denom = tl.sum(w * pl, axis=0)
    out = tl.sum(w[:, None] * pacc, axis=0) / tl.where(denom > 0, denom, 1.0)  # zeros for an empty sequence
    tl.store(out_ptr + seq * o_stride_t + head * o_stride_h + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, max_seq_len: int | None = None) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (one new token per sequence; last dim contiguous); caches
    [num_blocks, block_size, num_kv_heads, head_dim]; returns [num_seqs, num_heads, head_dim].

    max_seq_len bounds every seq_lens entry (it fixes the partition count; None reads it from seq_lens,
    a host sync)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.stride() == v_cache.stride()
    assert head_dim == triton.next_power_of_2(head_dim) and block_size == triton.next_power_of_2(block_size)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if num_seqs else 1
    num_parts = num_partitions(max_seq_len)
    num_parts_pad = triton.next_power_of_2(num_parts)
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_parts > 1:
        pm = torch.empty(num_seqs * num_heads * num_parts_pad, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(num_seqs * num_heads * num_parts_pad * head_dim, dtype=torch.float32, device=q.device)
    else:
        pm = pl = pacc = out  # unused
    _decode_part_kernel[(num_seqs, num_kv_heads, num_parts)](
        q, k_cache, v_cache, out, pm, pl, pacc, block_tables, seq_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_PARTS=num_parts_pad if num_parts > 1 else 1, MIN_PART=MIN_PART,
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, HAS_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32 or q.device.type == "cpu", num_warps=DECODE_WARPS,
        **({} if DECODE_STAGES is None else {"num_stages": DECODE_STAGES}))
    if num_parts > 1:
        _merge_kernel[(num_seqs, num_heads)](
            out, pm, pl, pacc, seq_lens, sliding_window or 0, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_PARTS=num_parts_pad, MIN_PART=MIN_PART, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
            HAS_WINDOW=sliding_window is not None, num_warps=4)
    return out




def mixed_split(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decode_lens, gather_rows, scatter_rows) of paged_mixed_attention from query_start_loc [S + 1] and
    seq_lens [S] of a step of num_tokens tokens (padding included), with device ops only."""
    first = query_start_loc[:-1].long()
    single = (query_start_loc[1:] - query_start_loc[:-1]) == 1
    return (torch.where(single, seq_lens, 0), first.clamp(max=num_tokens - 1),
            torch.where(single, first, num_tokens))


def paged_mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                          sliding_window: int | None, max_seq_len: int, decode_lens: torch.Tensor,
                          gather_rows: torch.Tensor, scatter_rows: torch.Tensor) -> torch.Tensor:
    """A mixed step split into decode and prefill rows on the device (no host list: a CUDA graph captures
    it at a fixed shape). q: [T, num_heads, head_dim]; S = seq_lens.shape[0] sequences, padding ones with 0
    new tokens (query_start_loc[b] == query_start_loc[b + 1]); tokens past query_start_loc[S] are padding.

    decode_lens [S] int32: seq_lens[b] where sequence b has exactly one new token, else 0; gather_rows [S]
    int64: sequence b's first new token (clamped into q); scatter_rows [S] int64: that token for a decode row,
    T (a spare row) for the others. The decode kernel runs over all S sequences (the zeroed ones output zeros,
    dropped into the spare row), with max_seq_len fixing its partitioning as in eager and decode steps, so a
    decode row gets the same bits in every kind of step; then the prefill kernel writes every token of the
    rows with at least 2 new tokens. Padding tokens' outputs are zeros. Returns [T, num_heads, head_dim]."""
    num_tokens = q.shape[0]
    out = torch.zeros((num_tokens + 1, *q.shape[1:]), dtype=q.dtype, device=q.device)
    dec = paged_decode_attention(q.index_select(0, gather_rows), k_cache, v_cache, block_tables, decode_lens, scale,
                                 sliding_window, max_seq_len)
    out.index_copy_(0, scatter_rows, dec)
    paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                            out[:num_tokens], min_query=2)
    return out[:num_tokens]


def prefill_backend(device: torch.device) -> str:
    """"triton" (the one-launch kernel; on CUDA, or on CPU under TRITON_INTERPRET=1) or "sdpa" (the loop of
    torch SDPA calls: elsewhere, or when DECODING_PREFILL_ATTENTION=sdpa)."""
    choice = os.environ.get("DECODING_PREFILL_ATTENTION", "triton")
    if choice not in ("triton", "sdpa"):
        raise ValueError(f"DECODING_PREFILL_ATTENTION must be triton or sdpa, got {choice!r}")
    runs = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return "triton" if choice == "triton" and runs else "sdpa"


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                      sliding_window: int | None = None, max_seq_len: int | None = None,
                      query_start_loc_cpu: list[int] | None = None,
                      seq_lens_cpu: list[int] | None = None) -> torch.Tensor:
    """Causal attention of several new tokens per sequence: a prefill step, or a mixed step of
    continuous batching (decodes next to prefill chunks).

    The rows with one new token go through the split-K decode kernel in one launch (the same bits as a
    graphed decode step); the others through paged_prefill_attention in one more launch (or, see
    prefill_backend, torch's SDPA per sequence). The step is split by query_start_loc_cpu and seq_lens_cpu,
    host copies of those tensors; without them they are read from the device (a sync)."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist() if query_start_loc_cpu is None else query_start_loc_cpu
    lens = seq_lens.tolist() if seq_lens_cpu is None else seq_lens_cpu
    single = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
    if single and q.stride(-1) == 1:
        bound = max(max_seq_len or 0, max(lens[b] for b in single))  # the decode steps' partitioning
        if single[-1] == len(single) - 1:  # the scheduler puts decodes first: rows 0..d-1 are tokens 0..d-1
            d = len(single)
            out[:d] = paged_decode_attention(q[:d], k_cache, v_cache, block_tables[:d], seq_lens[:d], scale,
                                             sliding_window, bound)
        else:  # host lists to the device without a sync (non_blocking from pageable memory is staged)
            rows = torch.tensor(single).to(q.device, non_blocking=True)
            toks = torch.tensor([starts[b] for b in single]).to(q.device, non_blocking=True)
            out[toks] = paged_decode_attention(q[toks], k_cache, v_cache, block_tables[rows], seq_lens[rows],
                                               scale, sliding_window, bound)
        done = set(single)
    else:
        done = set()
    rest = [b for b in range(len(lens)) if starts[b + 1] > starts[b] and b not in done]
    if not rest:
        return out
    if prefill_backend(q.device) == "triton" and q.stride(-1) == 1:
        paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                                out, min_query=2 if done else 1)
    else:
        prefill_attention_sdpa(q, k_cache, v_cache, block_tables, scale, sliding_window, starts, lens, rest, out)
    return out


def prefill_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, scale: float, sliding_window: int | None,
                           starts: list[int], lens: list[int], seqs: list[int], out: torch.Tensor) -> None:
    """Attention of sequences `seqs` (indices into the host lists starts, lens) into out, one SDPA call
    each, K/V gathered from the paged cache (a host loop: the reference and fallback of the Triton kernel)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    for b in seqs:
        seq_len = lens[b]
        n_q = starts[b + 1] - starts[b]
        blocks = block_tables[b, : triton.cdiv(seq_len, block_size)].long()
        kb = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)  # [H_kv, L, D]
        vb = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        qb = q[starts[b]:starts[b + 1]].transpose(0, 1)  # [H, n_q, D]
        if n_q == seq_len and sliding_window is None:  # a whole prompt: plain causal (flash attention)
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        else:  # a chunk after cached tokens, or a window: the queries are the last n_q of seq_len positions
            group = num_heads // num_kv_heads
            kb = kb.repeat_interleave(group, dim=0)  # the memory-efficient kernel takes masks, not GQA
            vb = vb.repeat_interleave(group, dim=0)
            if sliding_window is None:  # bottom-right-aligned causal mask, never materialised
                o = F.scaled_dot_product_attention(qb[None], kb[None], vb[None], scale=scale,
                                                   attn_mask=causal_lower_right(n_q, seq_len))[0]
            else:  # explicit mask, in query chunks so that it stays small
                o = torch.empty_like(qb)
                k_pos = torch.arange(seq_len, device=q.device)[None, :]
                for c0 in range(0, n_q, 1024):
                    q_pos = torch.arange(seq_len - n_q + c0, seq_len - n_q + min(c0 + 1024, n_q),
                                         device=q.device)[:, None]
                    mask = (k_pos <= q_pos) & ((q_pos - k_pos) < sliding_window)
                    o[:, c0:c0 + 1024] = F.scaled_dot_product_attention(qb[:, c0:c0 + 1024], kb, vb,
                                                                        attn_mask=mask, scale=scale)
        out[starts[b]:starts[b + 1]] = o.transpose(0, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int | None = None, max_seq_len: int | None = None,
                    query_start_loc_cpu: list[int] | None = None, seq_lens_cpu: list[int] | None = None
                    ) -> torch.Tensor:
    """decoding.ops.paged_attention: the split-K kernel for decode steps (one token per sequence, decided
    from shapes alone, so no host sync), prefill_attention for the others."""
    if q.shape[0] == block_tables.shape[0] and q.stride(-1) == 1:
        return paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                      max_seq_len)
    return prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                             max_seq_len, query_start_loc_cpu, seq_lens_cpu)
