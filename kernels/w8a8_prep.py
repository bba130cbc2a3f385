"""The inputs of the W8A8 GEMM (kernels/w8a8.py): LLM.int8()'s column abs-max and outlier plan, and the
per-token int8 quantization with the outlier gathers. Two launches, no memset:

1. `_absmax_plan_kernel`: program (c, s) owns a column block and a slice of rows, keeps a running max
   in registers and ends with one atomic max per column (on the fp32 bits: non-negative floats order as
   their int32 patterns), so each column takes as many atomics as there are row slices (4-11 at the 8B
   shapes), and the grid is a few programs per SM. On the way it stores each row's maximum over its
   column block (`rmax` [M, column blocks]), which spares the quantize kernel the keep flags. The last
   program to finish (a ticket counter) plans the outliers: the columns over the threshold (or, when
   more than KO exceed it, only those above the (KO+1)-th largest maximum: bisection on the bits), their
   count, a keep flag per column, then zeroes the workspace for the next call on this stream;
2. `_quantize_kernel`: per-token int8. With the plan (ROW_MAX), a row's maximum is the max of its
   `rmax` entries outside the column blocks that hold an outlier column, and of those blocks' kept
   columns (re-read: a few hundred bytes a row); then one pass over the row rounds every column, and
   the outlier columns' int8 values are overwritten with 0. Also: the outlier columns' 16-bit
   activations [M, KO] and the same int8 weight columns gathered dense into [N, KO] (only the first
   `count`: none at all when no column exceeds the threshold).
Without the plan (threshold 0, or the registered quantize_per_token op with its column mask) the
quantize kernel finds each row's maximum itself: in registers for rows up to 8192 columns (16384 with
`WHOLE_ROWS_UP_TO` raised), else in a first pass over the row.
Results are those of decoding.reference bit for bit: max is exact in any order, rounding is half away
from zero and 127 / amax an IEEE division.
"""

from __future__ import annotations

import functools
import os
import struct

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Column block of the abs-max kernel (and of rmax's entries): 256 B of a bf16 row per program and step.
ABSMAX_BLOCK_K = 32 if _INTERPRET else 128
# Abs-max tiles and grid: rows per step, warps, and programs per SM (the row slices make up the rest).
ABSMAX = dict(BLOCK_M=8, num_warps=4, PER_SM=1) if _INTERPRET else dict(BLOCK_M=32, num_warps=8, PER_SM=2)
# Columns of the plan's chunks (one program; the next chunk is loaded while one is scanned).
PLAN_BLOCK = 256 if _INTERPRET else 2048
# Rows the quantize kernel holds whole in registers: longer ones are read twice (max, then rounding)
# unless the abs-max kernel's row maxima are there.
WHOLE_ROWS_UP_TO = 1024 if _INTERPRET else 8192


@triton.jit
def _round_half_away(v):
    return tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)


# ----------------------------------------------------------------------------- abs-max and plan
@triton.jit
def _count_above(ws_ptr, K, t_bits, BLOCK: tl.constexpr):
    count = 0
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        bits = tl.load(ws_ptr + cols, mask=cols < K, other=0, volatile=True)
        count += tl.sum((bits > t_bits).to(tl.int32), axis=0)
    return count


@triton.jit
def _plan_pass(ws_ptr, idx_ptr, keep_ptr, K, KO, t_bits, BLOCK: tl.constexpr):
    # The columns above the cut t_bits in column order (a running prefix count; only the first KO slots
    # are written) and a keep flag per column; returns how many are above. Volatile loads: the maxima
    # were written by other programs' atomics. The next chunk is loaded before this one is scanned.
    count = 0
    cols = tl.arange(0, BLOCK)
    bits = tl.load(ws_ptr + cols, mask=cols < K, other=0, volatile=True)
    for _ in range(0, K, BLOCK):
        following = tl.load(ws_ptr + cols + BLOCK, mask=cols + BLOCK < K, other=0, volatile=True)
        hit = (bits > t_bits) & (cols < K)
        pos = count + tl.cumsum(hit.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + pos, cols.to(tl.int64), mask=hit & (pos < KO))
        tl.store(keep_ptr + cols, tl.where(hit, 0, 1).to(tl.int8), mask=cols < K)
        count += tl.sum(hit.to(tl.int32), axis=0)
        cols += BLOCK
        bits = following
    return count


@triton.jit
def _plan(ws_ptr, idx_ptr, cnt_ptr, keep_ptr, K, KO, threshold_bits, BLOCK: tl.constexpr, KO_PAD: tl.constexpr):
    # Usually one pass with the threshold as the cut. When more than KO columns exceed it, a bisection on
    # the bits finds the smallest cut t >= threshold with at most KO columns above it (the (KO+1)-th
    # largest maximum; a tie at the cut drops the tied columns), and a second pass rewrites the plan.
    count = _plan_pass(ws_ptr, idx_ptr, keep_ptr, K, KO, threshold_bits, BLOCK)
    if count > KO:
        lo = threshold_bits
        hi = 0x7F800000  # +inf: nothing is above it
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            ok = _count_above(ws_ptr, K, mid, BLOCK) <= KO
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        tl.debug_barrier()  # the first pass's stores (other threads) before the second pass's
        count = _plan_pass(ws_ptr, idx_ptr, keep_ptr, K, KO, hi, BLOCK)
    tl.debug_barrier()
    slots = tl.arange(0, KO_PAD)
    tl.store(idx_ptr + slots, tl.zeros([KO_PAD], dtype=tl.int64), mask=(slots >= count) & (slots < KO))
    tl.store(cnt_ptr, count)


@triton.jit
def _load_tile(x_ptr, stride_xm, offs_m, offs_k, row_end, mask_k):
    return tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                   mask=(offs_m < row_end)[:, None] & mask_k[None, :], other=0.0)


@triton.jit
def _absmax_plan_kernel(x_ptr, stride_xm, ws_ptr, rmax_ptr, idx_ptr, cnt_ptr, keep_ptr, M, K, KO, threshold_bits,
                        rows_per, PLAN: tl.constexpr, CLEAN: tl.constexpr, ROW_MAX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PLAN_BLOCK: tl.constexpr,
                        KO_PAD: tl.constexpr):
    # ws: [K + 1] int32, zero: the column maxima as fp32 bits, then the ticket counter. Program (c, s):
    # columns [c * BLOCK_K, +BLOCK_K) of rows [s * rows_per, +rows_per) (a multiple of BLOCK_M).
    blk = tl.program_id(0)
    offs_k = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    row0 = tl.program_id(1) * rows_per
    row_end = tl.minimum(row0 + rows_per, M)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    x = _load_tile(x_ptr, stride_xm, offs_m, offs_k, row_end, mask_k)
    for _ in range(row0, row_end, BLOCK_M):
        following = _load_tile(x_ptr, stride_xm, offs_m + BLOCK_M, offs_k, row_end, mask_k)  # in flight meanwhile
        x = tl.abs(x.to(tl.float32))
        acc = tl.maximum(acc, x)
        if ROW_MAX:  # each row's maximum over this column block, for the quantize kernel
            tl.store(rmax_ptr + offs_m.to(tl.int64) * tl.num_programs(0) + blk, tl.max(x, axis=1),
                     mask=offs_m < row_end)
        offs_m += BLOCK_M
        x = following
    tl.atomic_max(ws_ptr + offs_k, tl.max(acc, axis=0).to(tl.int32, bitcast=True), mask=mask_k)
    if PLAN:
        # The last program to take a ticket runs the plan: every maximum is in by then (each program's
        # atomics are ordered before its acq_rel ticket by the barrier, as in CUDA's threadfence reduction).
        tl.debug_barrier()
        ticket = tl.atomic_add(ws_ptr + K, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
            _plan(ws_ptr, idx_ptr, cnt_ptr, keep_ptr, K, KO, threshold_bits, PLAN_BLOCK, KO_PAD)
            if CLEAN:  # every other program is done with ws: zero it (maxima and ticket) for the next call
                tl.debug_barrier()
                for k in range(0, K + 1, PLAN_BLOCK):
                    cols = k + tl.arange(0, PLAN_BLOCK)
                    tl.store(ws_ptr + cols, tl.zeros([PLAN_BLOCK], dtype=tl.int32), mask=cols <= K)


# ----------------------------------------------------------------------------- quantization
@triton.jit
def _load_rows(x_ptr, rows, stride_xm, keep_ptr, cols, M, K, APPLY_KEEP: tl.constexpr, use_keep):
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
                mask=(rows < M)[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    if APPLY_KEEP:  # masked off entirely (no traffic) when no column is an outlier
        keep = tl.load(keep_ptr + cols, mask=(cols < K) & use_keep, other=1)
        x = tl.where(keep[None, :] != 0, x, 0.0)
    return x


@triton.jit
def _row_max_from_blocks(x_ptr, stride_xm, keep_ptr, rmax_ptr, idx_ptr, rows, M, K, NB, n_out,
                         RM_BLOCK: tl.constexpr, NB_PAD: tl.constexpr, KO_PAD: tl.constexpr):
    # max |x| over the kept columns of each row: the abs-max kernel's block maxima, except in the blocks
    # that hold an outlier column, whose kept columns are read again.
    slots = tl.arange(0, KO_PAD)
    live = slots < n_out
    out_blocks = tl.where(live, tl.load(idx_ptr + slots, mask=live, other=0) // RM_BLOCK, -1)
    blocks = tl.arange(0, NB_PAD)
    holds_outlier = tl.max((blocks[:, None] == out_blocks[None, :]).to(tl.int32), axis=1) != 0
    pm = tl.load(rmax_ptr + rows[:, None].to(tl.int64) * NB + blocks[None, :],
                 mask=(rows < M)[:, None] & ((blocks < NB) & ~holds_outlier)[None, :], other=0.0)
    amax = tl.max(pm, axis=1)
    for j in range(n_out):
        cols = (tl.load(idx_ptr + j) // RM_BLOCK) * RM_BLOCK + tl.arange(0, RM_BLOCK)
        xb = _load_rows(x_ptr, rows, stride_xm, keep_ptr, cols, M, K, True, True)
        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=1))
    return amax


@triton.jit
def _quantize_rows(x, inv, q_ptr, rows, cols, M, K):
    q = tl.minimum(tl.maximum(_round_half_away(x * inv[:, None]), -127), 127)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(tl.int8),
             mask=(rows < M)[:, None] & (cols < K)[None, :])


@triton.jit
def _quantize_kernel(x_ptr, stride_xm, keep_ptr, rmax_ptr, cnt_ptr, idx_ptr, w_ptr, q_ptr, s_ptr, xo_ptr, wo_ptr,
                     M, N, K, KO, NB, APPLY_KEEP: tl.constexpr, ROW_MAX: tl.constexpr, HAS_CNT: tl.constexpr,
                     GATHER: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                     KO_PAD: tl.constexpr, W_ROWS: tl.constexpr, RM_BLOCK: tl.constexpr, NB_PAD: tl.constexpr):
    # Program p: tokens [p * ROWS, +ROWS) (if any), and with GATHER also weight rows [p * W_ROWS, +W_ROWS).
    pid = tl.program_id(0)
    n_out = KO
    use_keep = True
    if HAS_CNT:
        n_out = tl.load(cnt_ptr)
        use_keep = n_out > 0
    rows = pid * ROWS + tl.arange(0, ROWS)
    if pid * ROWS < M:
        x_rows = x_ptr + rows.to(tl.int64) * stride_xm
        if SINGLE:  # the whole row stays in registers between the max and the rounding
            cols = tl.arange(0, BLOCK)
            x = _load_rows(x_ptr, rows, stride_xm, keep_ptr, cols, M, K, APPLY_KEEP and not ROW_MAX, use_keep)
            if ROW_MAX:
                amax_row = _row_max_from_blocks(x_ptr, stride_xm, keep_ptr, rmax_ptr, idx_ptr, rows, M, K, NB, n_out,
                                                RM_BLOCK, NB_PAD, KO_PAD)
            else:
                amax_row = tl.max(tl.abs(x), axis=1)
        elif ROW_MAX:
            amax_row = _row_max_from_blocks(x_ptr, stride_xm, keep_ptr, rmax_ptr, idx_ptr, rows, M, K, NB, n_out,
                                            RM_BLOCK, NB_PAD, KO_PAD)
        else:
            amax = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for k in range(0, K, BLOCK):
                xk = _load_rows(x_ptr, rows, stride_xm, keep_ptr, k + tl.arange(0, BLOCK), M, K, APPLY_KEEP, use_keep)
                amax = tl.maximum(amax, tl.abs(xk))
            amax_row = tl.max(amax, axis=1)
        # Rounding is half away from zero and 127 / amax an IEEE division (div_rn): the reference's values.
        nonzero = amax_row > 0
        tl.store(s_ptr + rows, tl.where(nonzero, tl.math.div_rn(amax_row, 127.0), 1.0), mask=rows < M)
        inv = tl.where(nonzero, tl.math.div_rn(127.0, tl.where(nonzero, amax_row, 1.0)), 1.0)
        if SINGLE:
            _quantize_rows(x, inv, q_ptr, rows, cols, M, K)
        else:
            for k in range(0, K, BLOCK):
                cols = k + tl.arange(0, BLOCK)
                xk = _load_rows(x_ptr, rows, stride_xm, keep_ptr, cols, M, K, APPLY_KEEP and not ROW_MAX, use_keep)
                _quantize_rows(xk, inv, q_ptr, rows, cols, M, K)
        if GATHER:
            slots = tl.arange(0, KO_PAD)
            live = slots < n_out
            cols_o = tl.load(idx_ptr + slots, mask=live, other=0)
            mask_o = (rows < M)[:, None] & live[None, :]
            if ROW_MAX:  # the outlier columns were rounded with the rest: their int8 values are 0
                tl.debug_barrier()  # after the other threads' stores of the same bytes
                tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols_o[None, :],
                         tl.zeros([ROWS, KO_PAD], dtype=tl.int8), mask=mask_o)
            # the outlier columns' 16-bit activations (only the live ones are written)
            tl.store(xo_ptr + rows[:, None].to(tl.int64) * KO + slots[None, :],
                     tl.load(x_rows[:, None] + cols_o[None, :], mask=mask_o, other=0.0), mask=mask_o)
    if GATHER:  # the same columns of the int8 weights, dense: scattered bytes read once per call, not per tile
        slots = tl.arange(0, KO_PAD)
        live = slots < n_out
        cols_o = tl.load(idx_ptr + slots, mask=live, other=0)
        w_rows = pid * W_ROWS + tl.arange(0, W_ROWS)
        wmask = (w_rows < N)[:, None] & live[None, :]
        w = tl.load(w_ptr + w_rows[:, None].to(tl.int64) * K + cols_o[None, :], mask=wmask, other=0)
        tl.store(wo_ptr + w_rows[:, None].to(tl.int64) * KO + slots[None, :], w, mask=wmask)


# ----------------------------------------------------------------------------- launchers
def _threshold_bits(threshold: float) -> int:
    return struct.unpack("<i", struct.pack("<f", threshold))[0]


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def absmax_grid(M: int, K: int, device: torch.device, cfg: dict | None = None) -> tuple[int, int, int]:
    """(column blocks, row slices, rows per slice) of the abs-max kernel: up to PER_SM programs per SM."""
    cfg = cfg or ABSMAX
    blocks = triton.cdiv(K, ABSMAX_BLOCK_K)
    if M == 0:
        return blocks, 1, cfg["BLOCK_M"]
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 2
    # At most PER_SM programs an SM in all: one wave, with no tail of late programs and few bytes in flight.
    slices = max(1, min(cfg["PER_SM"] * sms // blocks, triton.cdiv(M, cfg["BLOCK_M"])))
    rows_per = triton.cdiv(triton.cdiv(M, slices), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    return blocks, triton.cdiv(M, rows_per), rows_per


# Zeroed int32 workspaces of the abs-max kernel, one per (device, stream), which the plan leaves zero:
# kernels on one stream run in order, so each call finds it clean. One made during a CUDA graph capture
# (on the capture stream, its memset captured) serves later captures too: every replay leaves it zero.
_WORKSPACES: dict[tuple, torch.Tensor] = {}
# Outgrown workspaces stay allocated: a captured graph may still point at one.
_OUTGROWN: list[torch.Tensor] = []


def _workspace(device: torch.device, size: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device.type, device.index, stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < size:
        if ws is not None:
            _OUTGROWN.append(ws)
        ws = _WORKSPACES[key] = torch.zeros(max(size, 16385), dtype=torch.int32, device=device)
    return ws


def absmax_plan(x: torch.Tensor, threshold: float, ko: int, plan: bool = True, reuse: bool = False,
                cfg: dict | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Column abs-max of x [M, K] and, with plan, the outlier plan and the row maxima, in one launch.

    Returns (amax fp32 [K], idx int64 [ko]: the outlier columns in increasing order then zeros,
    count int32 [1]: how many, keep int8 [K]: 0 for an outlier column, else 1, rmax fp32 [M, column
    blocks of ABSMAX_BLOCK_K]: each row's max |x| per block), as `reference.outlier_columns_ref`
    (threshold > 0, ko >= 1). Without plan only amax is filled (rmax is None). reuse (with plan): the
    workspace is this stream's kept one, left zero by the kernel, so no memset runs, and amax is None.
    """
    M, K = x.shape
    reuse = reuse and plan
    ws = _workspace(x.device, K + 1) if reuse else torch.zeros(K + 1, dtype=torch.int32, device=x.device)
    idx = torch.empty(ko, dtype=torch.int64, device=x.device)
    cnt = torch.empty(1, dtype=torch.int32, device=x.device)
    keep = torch.empty(K, dtype=torch.int8, device=x.device)
    blocks, slices, rows_per = absmax_grid(M, K, x.device, cfg)
    rmax = torch.empty(M, blocks, dtype=torch.float32, device=x.device) if plan else None
    if M > 0:
        cfg = cfg or ABSMAX
        _absmax_plan_kernel[(blocks, slices)](
            x, x.stride(0), ws, rmax if plan else ws, idx, cnt, keep, M, K, ko, _threshold_bits(threshold), rows_per,
            PLAN=plan, CLEAN=reuse, ROW_MAX=plan, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=ABSMAX_BLOCK_K,
            PLAN_BLOCK=min(triton.next_power_of_2(K + 1), PLAN_BLOCK), KO_PAD=max(16, triton.next_power_of_2(ko)),
            num_warps=cfg["num_warps"])
    return (None if reuse else ws[:K].view(torch.float32)), idx, cnt, keep, rmax


def quantize_config(K: int, row_max: bool) -> dict:
    """Tiles of the quantize kernel: ROWS tokens a program, BLOCK columns a step (SINGLE: the whole row)."""
    block = triton.next_power_of_2(K)
    if block <= WHOLE_ROWS_UP_TO:
        return dict(ROWS=2 if _INTERPRET else 1, BLOCK=block, num_warps=max(1, min(16, block // 512)))
    # Longer rows (down's 14336) stream in 4096-wide blocks: once with the row maxima, else twice.
    block = 1024 if _INTERPRET else 4096
    return dict(ROWS=2 if _INTERPRET else 1, BLOCK=block, num_warps=block // 512)


def quantize(x: torch.Tensor, keep: torch.Tensor | None = None, cnt: torch.Tensor | None = None,
             idx: torch.Tensor | None = None, w: torch.Tensor | None = None, rmax: torch.Tensor | None = None,
             cfg: dict | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token int8 of x [M, K] with the columns where keep [K] (int8) is 0 zeroed: (q, scale, x_out, w_out).

    With cnt/idx/w (the plan and the int8 weights [N, K]), also the first cnt outlier columns of x
    ([M, KO], x's dtype) and of w ([N, KO] int8); slots past cnt are left unwritten. With rmax (absmax_plan's
    row maxima; needs cnt/idx/w), each row's maximum comes from them and the keep flags are read only in
    the blocks that hold an outlier column; else keep is read per column, and not at all when cnt is 0.
    """
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    gather = w is not None
    if rmax is not None and not (gather and keep is not None and cnt is not None):
        raise ValueError("quantize with rmax needs keep, cnt, idx and w")
    ko, n = (idx.shape[0], w.shape[0]) if gather else (0, 0)
    x_out = torch.empty(M, ko, dtype=x.dtype, device=x.device) if gather else None
    w_out = torch.empty(n, ko, dtype=torch.int8, device=x.device) if gather else None
    cfg = cfg or quantize_config(K, rmax is not None)
    w_rows = 16
    programs = max(triton.cdiv(M, cfg["ROWS"]), triton.cdiv(n, w_rows)) if gather else triton.cdiv(M, cfg["ROWS"])
    if programs == 0:
        return q, scale, x_out, w_out
    nb = rmax.shape[1] if rmax is not None else 1
    dummy = scale
    _quantize_kernel[(programs,)](
        x, x.stride(0), keep if keep is not None else dummy, rmax if rmax is not None else dummy,
        cnt if cnt is not None else dummy, idx if gather else dummy, w if gather else dummy, q, scale,
        x_out if gather else dummy, w_out if gather else dummy, M, n, K, ko, nb,
        APPLY_KEEP=keep is not None, ROW_MAX=rmax is not None, HAS_CNT=cnt is not None, GATHER=gather,
        ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"], SINGLE=cfg["BLOCK"] >= K, KO_PAD=max(16, triton.next_power_of_2(ko)),
        W_ROWS=w_rows, RM_BLOCK=ABSMAX_BLOCK_K, NB_PAD=triton.next_power_of_2(nb), num_warps=cfg["num_warps"])
    return q, scale, x_out, w_out


def outlier_plan(x: torch.Tensor, threshold: float, ko: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx [ko] int64, keep [ko] bool, col_mask [K] fp32) exactly as `reference.outlier_columns_ref` and
    the mask that `reference.w8a8_linear_ref` builds (for tests; the linear uses absmax_plan's buffers)."""
    _, idx, cnt, keep, _ = absmax_plan(x, threshold, ko)
    return idx, torch.arange(ko, device=x.device) < cnt, keep.float()
