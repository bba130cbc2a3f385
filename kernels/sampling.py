"""The whole sampler step in one Triton launch: penalties, greedy, top-k, top-p, min-p, Gumbel draw.

One program per row, streaming the row in blocks (a 128k-vocab fp32 row is 512 KB, so a batch of rows
stays in L2 between passes). Same semantics and order as decoding/sampling/sampler.py, which is the
reference, and the same counter-based noise (`hash32` of seed, step and token id), so both draw the
same token from the same state. The differences are confined to float rounding:
- top-k and top-p need no sort: the threshold is found by a 16-ary search over the row's values
  (as order-preserving uint32 keys, 4 bits a pass), counting tokens for top-k and summing their
  probability for top-p. The kept set equals the reference's except under exact ties at the cut.
- min-p compares y - y_max with log(min_p) instead of probabilities with min_p * p_max.
After the draw the program records the token (counts, seen, step) as SamplingState.record does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _hash32(x):
    # The same hash as decoding.sampling.sampler.hash32; uint32 products wrap like its masked int64 ones.
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _key(y):
    # Order-preserving map of fp32 to uint32: flip the sign bit of positives, every bit of negatives.
    bits = y.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 0, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
    return bits ^ flip


@triton.jit
def _penalised(logits_row, counts_row, seen_row, cols, mask, rep, freq, pres,
               HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr):
    x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_SEEN:
        seen = tl.load(seen_row + cols, mask=mask, other=0) != 0
        x = tl.where(seen, tl.where(x > 0, x / rep, x * rep), x)
    if HAS_COUNTS:
        c = tl.load(counts_row + cols, mask=mask, other=0).to(tl.float32)
        x = x - c * freq - (c > 0).to(tl.float32) * pres
    return x


@triton.jit
def _search(scratch_row, vocab, temp, y_max, floor_key, target, USE_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest key t >= floor_key with (count or exp-mass of tokens whose key >= max(t, floor_key)) >= target."""
    digits = tl.arange(0, 16).to(tl.uint32)
    prefix = tl.zeros((), dtype=tl.uint32)
    for step in range(8):
        shift = 28 - 4 * step
        cands = prefix | (digits << shift)
        acc = tl.zeros((16,), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            y = tl.load(scratch_row + cols, mask=mask, other=float("-inf")) / temp
            k = _key(y)
            inside = mask & (k >= floor_key)
            if USE_MASS:
                w = tl.where(inside, tl.exp(y - y_max), 0.0)
            else:
                w = inside.to(tl.float32)
            hit = k[:, None] >= cands[None, :]
            acc += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
        ok = (acc >= target).to(tl.int32)
        prefix = prefix | ((tl.sum(ok, axis=0) - 1).to(tl.uint32) << shift)
    return prefix


@triton.jit
def _sample_kernel(logits_ptr, logits_stride, out_ptr, scratch_ptr,
                   temp_ptr, topk_ptr, topp_ptr, minp_ptr, freq_ptr, pres_ptr, rep_ptr, seed_ptr, step_ptr,
                   counts_ptr, seen_ptr, vocab,
                   HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    scratch_row = scratch_ptr + row * vocab
    counts_row = counts_ptr + row * vocab
    seen_row = seen_ptr + row * vocab
    temp = tl.load(temp_ptr + row)
    rep = tl.load(rep_ptr + row)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)

    # Pass 1: penalties, bad-row check, greedy argmax; the penalised row goes to scratch.
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), dtype=tl.int64)
    bad = tl.zeros((), dtype=tl.int32)
    finite = tl.zeros((), dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        raw = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        bad += tl.sum(((raw != raw) | (raw == float("inf"))).to(tl.int32), axis=0)
        finite += tl.sum((mask & (raw != float("-inf"))).to(tl.int32), axis=0)
        x = _penalised(logits_row, counts_row, seen_row, cols, mask, rep, freq, pres, HAS_COUNTS, HAS_SEEN)
        tl.store(scratch_row + cols, x, mask=mask)
        block_max = tl.max(x, axis=0)
        block_idx = start + tl.argmax(x, axis=0)  # first index of the block's max
        take = block_max > best  # strict: keep the first occurrence across blocks, as torch.argmax does
        best_idx = tl.where(take, block_idx.to(tl.int64), best_idx)
        best = tl.maximum(best, block_max)
    token = best_idx

    if temp != 0:
        y_max = best / temp  # divide, not multiply by 1/temp: the reference's rounding
        floor_key = tl.zeros((), dtype=tl.uint32)
        top_k = tl.load(topk_ptr + row)
        if (top_k > 0) & (top_k < vocab):
            floor_key = _search(scratch_row, vocab, temp, y_max, floor_key, top_k.to(tl.float32), False, BLOCK)
        top_p = tl.load(topp_ptr + row)
        if top_p < 1.0:
            z = tl.zeros((), dtype=tl.float32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < vocab
                y = tl.load(scratch_row + cols, mask=mask, other=float("-inf")) / temp
                z += tl.sum(tl.where(mask & (_key(y) >= floor_key), tl.exp(y - y_max), 0.0), axis=0)
            floor_key = _search(scratch_row, vocab, temp, y_max, floor_key, top_p * z, True, BLOCK)
        min_p = tl.load(minp_ptr + row)
        y_floor = tl.where(min_p > 0, y_max + tl.log(min_p), float("-inf"))
        # Row key: the same two-level hash of (seed, step) as sampler.row_keys.
        seed = tl.load(seed_ptr + row).to(tl.uint64)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        step = tl.load(step_ptr + row).to(tl.uint32)
        key = _hash32(_hash32(lo ^ _hash32(hi)) + step)
        best = tl.full((), float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            y = tl.load(scratch_row + cols, mask=mask, other=float("-inf")) / temp
            bits = _hash32(key ^ cols.to(tl.uint32)) >> 8
            u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = y - tl.log(-tl.log(u))
            kept = mask & (_key(y) >= floor_key) & (y >= y_floor)
            score = tl.where(kept, score, float("-inf"))
            block_max = tl.max(score, axis=0)
            block_idx = start + tl.argmax(score, axis=0)
            take = block_max > best
            token = tl.where(take, block_idx.to(tl.int64), token)
            best = tl.maximum(best, block_max)

    token = tl.where((bad > 0) | (finite == 0), -1, token)
    tl.store(out_ptr + row, token)
    # Record the token, as SamplingState.record: a failed row records token 0 (it is retired anyway).
    recorded = tl.maximum(token, 0)
    if HAS_COUNTS:
        tl.store(counts_row + recorded, tl.load(counts_row + recorded) + 1)
    if HAS_SEEN:
        tl.store(seen_row + recorded, 1)
    tl.store(step_ptr + row, tl.load(step_ptr + row) + 1)


def sample_tokens(logits: torch.Tensor, state) -> torch.Tensor:
    """Draw one token per row of logits [B, V] with SamplingState `state` and record it; returns [B] int64.

    -1 marks a row whose logits hold NaN or +inf, or are all -inf. Mutates state.counts, state.seen
    and state.steps in place, exactly where SamplingState.record would.
    """
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1, "logits must be contiguous in the vocabulary dim"
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    scratch = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)
    counts = state.counts if state.counts is not None else out  # dummies are never read
    seen = state.seen.view(torch.uint8) if state.seen is not None else out
    _sample_kernel[(batch,)](
        logits, logits.stride(0), out, scratch,
        state.temperature, state.top_k, state.top_p, state.min_p, state.frequency, state.presence,
        state.repetition, state.seeds, state.steps, counts, seen, vocab,
        HAS_COUNTS=state.counts is not None, HAS_SEEN=state.seen is not None, BLOCK=_BLOCK, num_warps=8)
    return out
