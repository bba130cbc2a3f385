"""The sampler step in Triton: penalties, greedy, top-k, top-p, min-p, Gumbel draw, state update.

Each row is split over several programs and each pass over the rows is one launch (a 128k-vocab fp32
row is 512 KB, so the batch stays in L2 between passes); `sample_tokens_graphed` replays the launch
chain from a CUDA graph. Same semantics and order as decoding/sampling/sampler.py, which is the
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

from decoding.nosync import capture

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


# Each row is cut into NPARTS slices, one program each (grid B x NPARTS), one launch per pass. A pass
# writes per-(row, slice) partials; the next launch combines all NPARTS partials of its row in a fixed
# order (deterministic, no atomics, no grid barrier). Partials and search prefixes are double-buffered by
# pass parity: launches on one stream run in order, so a pass never overwrites what the one after it reads.
# (A one-program-per-row version was 3x slower: benches/NOTES.md, v2.)
_MIN_PROGRAMS = 528  # 4 per SM on a 132-SM H100: enough programs in flight to hide L2 latency


@triton.jit
def _first_max(vals, idxs, NPARTS: tl.constexpr):
    # Slices are in index order: the first slice holding the max wins, as torch.argmax picks the first.
    parts = tl.arange(0, NPARTS)
    best = tl.max(vals, axis=0)
    first = tl.min(tl.where(vals == best, parts, NPARTS), axis=0)
    return best, tl.sum(tl.where(parts == first, idxs, 0), axis=0)


@triton.jit
def _split_pass1(logits_ptr, logits_stride, scratch_ptr, pmax_ptr, pidx_ptr, pflag_ptr,
                 rep_ptr, freq_ptr, pres_ptr, counts_ptr, seen_ptr, vocab, slice_len,
                 NPARTS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    logits_row = logits_ptr + row * logits_stride
    rep = tl.load(rep_ptr + row)
    freq = tl.load(freq_ptr + row)
    pres = tl.load(pres_ptr + row)
    lo = part * slice_len
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), dtype=tl.int64) + lo
    bad = tl.zeros((), dtype=tl.int32)
    finite = tl.zeros((), dtype=tl.int32)
    for start in range(lo, lo + slice_len, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        raw = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        bad += tl.sum(((raw != raw) | (raw == float("inf"))).to(tl.int32), axis=0)
        finite += tl.sum((mask & (raw != float("-inf"))).to(tl.int32), axis=0)
        x = _penalised(logits_row, counts_ptr + row * vocab, seen_ptr + row * vocab, cols, mask, rep, freq, pres,
                       HAS_COUNTS, HAS_SEEN)
        tl.store(scratch_ptr + row * vocab + cols, x, mask=mask)
        block_max = tl.max(x, axis=0)
        block_idx = start + tl.argmax(x, axis=0)
        take = block_max > best
        best_idx = tl.where(take, block_idx.to(tl.int64), best_idx)
        best = tl.maximum(best, block_max)
    slot = row * NPARTS + part
    tl.store(pmax_ptr + slot, best)
    tl.store(pidx_ptr + slot, best_idx)
    tl.store(pflag_ptr + slot, tl.where(bad > 0, 1, 0) + tl.where(finite > 0, 2, 0))


@triton.jit
def _combined_prefix(pacc_ptr, prefix_ptr, row, phase, prev_pass, target, NPARTS: tl.constexpr):
    """The search prefix after pass `prev_pass` of `phase` (0: top-k, 1: top-p), from its partials."""
    parts = tl.arange(0, NPARTS)
    digits = tl.arange(0, 16)
    buf = prev_pass % 2
    acc = tl.sum(tl.load(pacc_ptr + ((buf * tl.num_programs(0) + row) * NPARTS + parts[:, None]) * 16
                         + digits[None, :]), axis=0)
    prev = tl.load(prefix_ptr + (row * 2 + phase) * 2 + buf).to(tl.uint32)
    ok = (acc >= target).to(tl.int32)
    return prev | ((tl.sum(ok, axis=0) - 1).to(tl.uint32) << (28 - 4 * prev_pass))


@triton.jit
def _split_search(scratch_ptr, temp_ptr, topk_ptr, topp_ptr, pmax_ptr, pacc_ptr, pz_ptr, prefix_ptr, fkey_ptr,
                  vocab, slice_len, pass_idx, PHASE: tl.constexpr, NPARTS: tl.constexpr, BLOCK: tl.constexpr):
    """PHASE 0: top-k search pass `pass_idx`; 1: softmax denominator over the top-k set (and the final
    top-k key to fkey); 2: top-p search pass `pass_idx`."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    use_k = (top_k > 0) & (top_k < vocab)
    run = temp != 0
    if PHASE == 0:
        run = run & use_k
    else:
        run = run & (top_p < 1.0)
    if run:
        parts = tl.arange(0, NPARTS)
        y_max = tl.max(tl.load(pmax_ptr + row * NPARTS + parts), axis=0) / temp
        digits = tl.arange(0, 16).to(tl.uint32)
        floor_key = tl.zeros((), dtype=tl.uint32)
        prefix = tl.zeros((), dtype=tl.uint32)
        if PHASE == 0:
            target = top_k.to(tl.float32)
            if pass_idx > 0:
                prefix = _combined_prefix(pacc_ptr, prefix_ptr, row, 0, pass_idx - 1, target, NPARTS)
        elif PHASE == 1:
            target = 0.0
            if use_k:
                floor_key = _combined_prefix(pacc_ptr, prefix_ptr, row, 0, 7, top_k.to(tl.float32), NPARTS)
        else:
            floor_key = tl.load(fkey_ptr + row).to(tl.uint32)
            target = top_p * tl.sum(tl.load(pz_ptr + row * NPARTS + parts), axis=0)
            if pass_idx > 0:
                prefix = _combined_prefix(pacc_ptr, prefix_ptr, row, 1, pass_idx - 1, target, NPARTS)
        cands = prefix | (digits << (28 - 4 * pass_idx))
        acc = tl.zeros((16,), dtype=tl.float32)
        z = tl.zeros((), dtype=tl.float32)
        lo = part * slice_len
        for start in range(lo, lo + slice_len, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            y = tl.load(scratch_ptr + row * vocab + cols, mask=mask, other=float("-inf")) / temp
            k = _key(y)
            inside = mask & (k >= floor_key)
            if PHASE == 0:
                w = inside.to(tl.float32)
            else:
                w = tl.where(inside, tl.exp(y - y_max), 0.0)
            if PHASE == 1:
                z += tl.sum(w, axis=0)
            else:
                acc += tl.sum(tl.where(k[:, None] >= cands[None, :], w[:, None], 0.0), axis=0)
        if PHASE == 1:
            tl.store(pz_ptr + row * NPARTS + part, z)
            if part == 0:
                tl.store(fkey_ptr + row, floor_key.to(tl.int64))
        else:
            buf = pass_idx % 2
            tl.store(pacc_ptr + ((buf * tl.num_programs(0) + row) * NPARTS + part) * 16 + digits, acc)
            if part == 0:
                tl.store(prefix_ptr + (row * 2 + PHASE // 2) * 2 + buf, prefix.to(tl.int64))


@triton.jit
def _split_draw(scratch_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, step_ptr, pmax_ptr, pacc_ptr,
                pz_ptr, prefix_ptr, fkey_ptr, dmax_ptr, didx_ptr, vocab, slice_len,
                NPARTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    temp = tl.load(temp_ptr + row)
    lo = part * slice_len
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), dtype=tl.int64) + lo
    if temp != 0:
        parts = tl.arange(0, NPARTS)
        y_max = tl.max(tl.load(pmax_ptr + row * NPARTS + parts), axis=0) / temp
        top_k = tl.load(topk_ptr + row)
        top_p = tl.load(topp_ptr + row)
        floor_key = tl.zeros((), dtype=tl.uint32)
        if top_p < 1.0:
            target = top_p * tl.sum(tl.load(pz_ptr + row * NPARTS + parts), axis=0)
            floor_key = _combined_prefix(pacc_ptr, prefix_ptr, row, 1, 7, target, NPARTS)
        elif (top_k > 0) & (top_k < vocab):
            floor_key = _combined_prefix(pacc_ptr, prefix_ptr, row, 0, 7, top_k.to(tl.float32), NPARTS)
        min_p = tl.load(minp_ptr + row)
        y_floor = tl.where(min_p > 0, y_max + tl.log(min_p), float("-inf"))
        seed = tl.load(seed_ptr + row).to(tl.uint64)
        key = _hash32(_hash32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _hash32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)))
                      + tl.load(step_ptr + row).to(tl.uint32))
        for start in range(lo, lo + slice_len, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            y = tl.load(scratch_ptr + row * vocab + cols, mask=mask, other=float("-inf")) / temp
            bits = _hash32(key ^ cols.to(tl.uint32)) >> 8
            u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(mask & (_key(y) >= floor_key) & (y >= y_floor), y - tl.log(-tl.log(u)), float("-inf"))
            block_max = tl.max(score, axis=0)
            block_idx = start + tl.argmax(score, axis=0)
            take = block_max > best
            best_idx = tl.where(take, block_idx.to(tl.int64), best_idx)
            best = tl.maximum(best, block_max)
    tl.store(dmax_ptr + row * NPARTS + part, best)
    tl.store(didx_ptr + row * NPARTS + part, best_idx)


@triton.jit
def _split_finish(out_ptr, temp_ptr, pmax_ptr, pidx_ptr, pflag_ptr, dmax_ptr, didx_ptr, step_ptr, counts_ptr,
                  seen_ptr, vocab, NPARTS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_SEEN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, NPARTS)
    slots = row * NPARTS + parts
    flags = tl.load(pflag_ptr + slots)
    bad = tl.max(flags & 1, axis=0) > 0
    finite = tl.max(flags & 2, axis=0) > 0
    if tl.load(temp_ptr + row) == 0:
        _, token = _first_max(tl.load(pmax_ptr + slots), tl.load(pidx_ptr + slots), NPARTS)
    else:
        _, token = _first_max(tl.load(dmax_ptr + slots), tl.load(didx_ptr + slots), NPARTS)
    token = tl.where(bad | (finite == 0), -1, token)
    tl.store(out_ptr + row, token)
    recorded = tl.maximum(token, 0)
    if HAS_COUNTS:
        tl.store(counts_ptr + row * vocab + recorded, tl.load(counts_ptr + row * vocab + recorded) + 1)
    if HAS_SEEN:
        tl.store(seen_ptr + row * vocab + recorded, 1)
    tl.store(step_ptr + row, tl.load(step_ptr + row) + 1)


def sample_tokens_split(logits: torch.Tensor, state, nparts: int | None = None) -> torch.Tensor:
    """Draw one token per row of logits [B, V] with SamplingState `state` and record it; returns [B] int64.

    -1 marks a row whose logits hold NaN or +inf, or are all -inf. Mutates state.counts, state.seen and
    state.steps in place, exactly where SamplingState.record would. Each row is split over `nparts`
    programs (a power of two; default: enough for ~4 programs per SM).
    """
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1, "logits must be contiguous in the vocabulary dim"
    if nparts is None:
        nparts = min(64, triton.next_power_of_2(max(1, -(-_MIN_PROGRAMS // batch))))
    slice_len = triton.cdiv(triton.cdiv(vocab, nparts), _BLOCK) * _BLOCK
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    out = torch.empty(batch, **i64)
    scratch = torch.empty(batch, vocab, **f32)
    pmax, pidx, pflag = torch.empty(batch, nparts, **f32), torch.empty(batch, nparts, **i64), torch.empty(
        batch, nparts, dtype=torch.int32, device=dev)
    dmax, didx = torch.empty(batch, nparts, **f32), torch.empty(batch, nparts, **i64)
    pacc = torch.empty(2, batch, nparts, 16, **f32)
    pz = torch.empty(batch, nparts, **f32)
    prefix = torch.zeros(batch, 2, 2, **i64)
    fkey = torch.zeros(batch, **i64)
    counts = state.counts if state.counts is not None else out  # dummies are never read
    seen = state.seen.view(torch.uint8) if state.seen is not None else out
    flags = dict(HAS_COUNTS=state.counts is not None, HAS_SEEN=state.seen is not None)
    grid = (batch, nparts)
    _split_pass1[grid](logits, logits.stride(0), scratch, pmax, pidx, pflag, state.repetition, state.frequency,
                       state.presence, counts, seen, vocab, slice_len, NPARTS=nparts, BLOCK=_BLOCK, **flags)
    search = (scratch, state.temperature, state.top_k, state.top_p, pmax, pacc, pz, prefix, fkey, vocab, slice_len)
    if state.any_top_k:
        for p in range(8):
            _split_search[grid](*search, p, PHASE=0, NPARTS=nparts, BLOCK=_BLOCK)
    if state.any_top_p:
        _split_search[grid](*search, 0, PHASE=1, NPARTS=nparts, BLOCK=_BLOCK)
        for p in range(8):
            _split_search[grid](*search, p, PHASE=2, NPARTS=nparts, BLOCK=_BLOCK)
    if not state.all_greedy:
        _split_draw[grid](scratch, state.temperature, state.top_k, state.top_p, state.min_p, state.seeds, state.steps,
                          pmax, pacc, pz, prefix, fkey, dmax, didx, vocab, slice_len, NPARTS=nparts, BLOCK=_BLOCK)
    _split_finish[(batch,)](out, state.temperature, pmax, pidx, pflag, dmax, didx, state.steps, counts, seen, vocab,
                            NPARTS=nparts, **flags)
    return out


def sample_tokens_graphed(logits: torch.Tensor, state) -> torch.Tensor:
    """`sample_tokens_split` replayed from a CUDA graph: one graph launch instead of ~20 kernel launches.

    One graph per (logits shape, the state's pass flags), kept in `state.fused_graphs`. A SamplingState
    updates its rows in place inside stable buffers (rows admitted and retired, padded to a batch-size
    bucket), so a graph stays valid while the batch composition changes; the state clears the dict when
    its buffers move. The logits are copied into the graph's static input first. Falls back to eager
    launches on CPU tensors and when a capture is already in progress.
    """
    if not logits.is_cuda or torch.cuda.is_current_stream_capturing():
        return sample_tokens_split(logits, state)
    key = (tuple(logits.shape), logits.dtype, state.any_top_k, state.any_top_p, state.all_greedy,
           state.counts is not None, state.seen is not None)
    graph = state.fused_graphs.get(key)
    if graph is None:
        static_in = logits.clone()
        # Compile the kernels outside the capture on a throwaway copy of the state, since a step mutates it.
        sample_tokens_split(static_in, state.clone())
        # All graphs of a state share one memory pool: they replay one at a time on one stream, each
        # rewrites its scratch before reading it, and each output is cloned before the next replay.
        pool = state.fused_graphs.setdefault("pool", torch.cuda.graph_pool_handle())
        # No device sync, no emptied allocator caches (decoding/nosync.py): steps may be in flight.
        g, static_out = capture(lambda: sample_tokens_split(static_in, state), pool, logits.device)
        # Capturing records the launches without running them: the state has not advanced yet.
        graph = (g, static_in, static_out)
        state.fused_graphs[key] = graph
    g, static_in, static_out = graph
    static_in.copy_(logits)
    g.replay()
    return static_out.clone()
