"""W8A8 with LLM.int8()'s decomposition in Triton: the int8 GEMMs, and the linear over them.

At 2048 tokens the linear is three launches (benches/NOTES.md, INT8, lists their bytes):
1. `_absmax_plan_kernel` (kernels/w8a8_prep.py): the column abs-max and each row's maximum per column
   block, and in the last program to finish the outlier plan (the columns over the threshold, at most
   KO of them, their count, a keep flag per column); it leaves its workspace zero, so no memset runs;
2. `_quantize_kernel` (kernels/w8a8_prep.py): per-token int8 with the outlier columns zeroed, the
   outlier columns' 16-bit activations [M, KO], and the same int8 weight columns gathered into a dense
   [N, KO] block (only the first `count` columns: none at all when no column exceeds the threshold);
3. the GEMM: int8 `tl.dot` with int32 accumulation; in the epilogue, a_scale, then the 16-bit dot of the
   outlier columns accumulated into the same registers, b_scale, bias. From TMA_MIN_TOKENS tokens on a
   GPU with TMA (sm_90+), `_int8_gemm_tma_kernel`: persistent, tensor-descriptor loads and stores, grouped
   tile order; its tiles come from TMA_CONFIGS (benches/tune_w8a8.py sweeps them). Otherwise, and under
   the interpreter unless asked for, the pointer-based `_int8_gemm_kernel`.
With threshold 0 (plain W8A8, and SmoothQuant's "w8a8-smooth") only 2 and 3 run, without the gathers.
No host syncs: the number of outlier columns is fixed (KO) and the kernels read the live count on device.

The kernels here and in w8a8_prep.py launch directly, not through torch.library.wrap_triton: outside a
triton_op, wrap_triton dispatches through its higher-order op, which keeps every launch's non-tensor
arguments in a global side table for good. The TMA kernel's tensor descriptors hold their tensors, so
every eager W8A8 call leaked its int8 activations and its output (8B shape, 2048 tokens: 2 GiB a forward).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .w8a8_prep import absmax_plan, outlier_plan, quantize  # noqa: F401  (re-exported: tests, int8.py)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Columns of the outlier blocks in the GEMM epilogue: the smallest K of a 16-bit wgmma.
BLOCK_O = 16
# From this many tokens the persistent TMA kernel runs (smaller M: too few tiles to fill 132 SMs).
TMA_MIN_TOKENS = 256


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each column tile while it is in L2.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _outlier_epilogue(y, xo_ptr, wo_ptr, stride_xo, stride_wo, n_out, offs_m, offs_n, mask_m, mask_n, j,
                      BLOCK_O: tl.constexpr, FP32_DOT: tl.constexpr):
    # y += x[:, outliers j..j+BLOCK_O) @ w[:, same]^T, the int8 weights exact in 16 bits.
    offs_o = j + tl.arange(0, BLOCK_O)
    mask_o = offs_o < n_out
    xo = tl.load(xo_ptr + offs_m[:, None].to(tl.int64) * stride_xo + offs_o[None, :],
                 mask=mask_m[:, None] & mask_o[None, :], other=0.0)
    wo = tl.load(wo_ptr + offs_n[:, None].to(tl.int64) * stride_wo + offs_o[None, :],
                 mask=mask_n[:, None] & mask_o[None, :], other=0)
    if FP32_DOT:  # fp32 activations, and the interpreter (whose 16-bit dot is wrong)
        return y + tl.dot(xo.to(tl.float32), tl.trans(wo.to(tl.float32)), input_precision="ieee")
    return tl.dot(xo, tl.trans(wo.to(xo.dtype)), y)


@triton.jit
def _prefetch_l1(ptrs):
    # A hint only: the lines of these addresses into this SM's L1 (nothing is returned or waited for).
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, xo_ptr, wo_ptr, cnt_ptr, M, N, K,
                          KO, stride_xo, stride_wo, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                          HAS_CNT: tl.constexpr, KO_PAD: tl.constexpr, OUT_INT32: tl.constexpr,
                          FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                          SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                          BLOCK_O: tl.constexpr, PREFETCH: tl.constexpr):
    # Persistent: NUM_SMS programs walk the tiles in grouped order. TMA zero-fills loads past M, N, K
    # and clips stores, so tails need no masks in the main loop.
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    n_out = KO
    if HAS_CNT:  # the live number of outlier columns (the rest of the KO slots are not written)
        n_out = tl.load(cnt_ptr)
    tile_c = start - NUM_SMS  # a second counter for the epilogue, as in Triton's persistent matmul tutorial
    for tile in tl.range(start, num_m * num_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        if HAS_OUTLIERS and PREFETCH:  # the epilogue's first outlier block, on its way to L1 during the K loop
            if n_out > 0:
                rows = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)
                _prefetch_l1(xo_ptr + rows.to(tl.int64) * stride_xo)
                cols = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
                _prefetch_l1(wo_ptr + cols.to(tl.int64) * stride_wo)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_coords(tile_c, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if OUT_INT32:
            c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc)
        else:
            y = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
            if HAS_OUTLIERS:  # a static unroll with a guard: no inner loop in the persistent body
                for j in tl.static_range(0, KO_PAD, BLOCK_O):
                    if j < n_out:
                        y = _outlier_epilogue(y, xo_ptr, wo_ptr, stride_xo, stride_wo, n_out, offs_m, offs_n,
                                              mask_m, mask_n, j, BLOCK_O, FP32_DOT)
            y = y * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if SUBTILE == 1:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y.to(c_desc.dtype))
            else:  # SUBTILE narrower stores: 1 / SUBTILE of the shared-memory staging, room for a stage
                y = tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
                y0, y1 = tl.split(y)
                if SUBTILE == 2:
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y0.to(c_desc.dtype))
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], y1.to(c_desc.dtype))
                else:
                    ya, yb = tl.split(tl.permute(tl.reshape(y0, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
                    yc, yd = tl.split(tl.permute(tl.reshape(y1, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], ya.to(c_desc.dtype))
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 4], yb.to(c_desc.dtype))
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], yc.to(c_desc.dtype))
                    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + 3 * BLOCK_N // 4], yd.to(c_desc.dtype))


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, bias_ptr, xo_ptr, wo_ptr, cnt_ptr, M, N, K, KO,
                      stride_am, stride_om, stride_xo, stride_wo, HAS_BIAS: tl.constexpr,
                      HAS_OUTLIERS: tl.constexpr, HAS_CNT: tl.constexpr, OUT_INT32: tl.constexpr,
                      FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_O: tl.constexpr, GROUP_M: tl.constexpr):
    # One tile per program, pointer loads: any alignment, and the interpreter.
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        y = acc.to(tl.float32) * tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if HAS_OUTLIERS:
            n_out = KO
            if HAS_CNT:
                n_out = tl.load(cnt_ptr)
            for j in range(0, n_out, BLOCK_O):
                y = _outlier_epilogue(y, xo_ptr, wo_ptr, stride_xo, stride_wo, n_out, offs_m, offs_n, mask_m,
                                      mask_n, j, BLOCK_O, FP32_DOT)
        y = y * tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- tile configs
# Persistent TMA GEMM at >= 1024 tokens, by (N, K): the H100 winners of benches/tune_w8a8.py (it prints
# this table). Keys: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SUBTILE, FLATTEN, WS.
# Measured by `python benches/tune_w8a8.py` on an H100 80GB HBM3 (2026-11-25), best of 8 configs each.
TMA_CONFIGS: dict[tuple[int, int], dict] = {
    (6144, 4096): {'BLOCK_M': 128, 'BLOCK_N': 256, 'BLOCK_K': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4, 'SUBTILE': True, 'FLATTEN': True, 'WS': False},
    (4096, 4096): {'BLOCK_M': 256, 'BLOCK_N': 128, 'BLOCK_K': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4, 'SUBTILE': True, 'FLATTEN': True, 'WS': False},
    (28672, 4096): {'BLOCK_M': 256, 'BLOCK_N': 128, 'BLOCK_K': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4, 'SUBTILE': True, 'FLATTEN': True, 'WS': False},
    (4096, 14336): {'BLOCK_M': 256, 'BLOCK_N': 128, 'BLOCK_K': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4, 'SUBTILE': True, 'FLATTEN': True, 'WS': False},
}
TMA_DEFAULT = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, SUBTILE=True,
                   FLATTEN=True, WS=False)
# Below 1024 tokens: 128-wide tiles, twice as many for the SMs to share.
TMA_MID = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, SUBTILE=False,
               FLATTEN=True, WS=False)
_SMEM_LIMIT = 227 * 1024
# With outlier columns, a 2-way split tile (SUBTILE True) that would lose a pipeline stage to the outlier
# dot's shared memory stores in 4 quarter-width pieces instead (benches/tune_w8a8.py --part epilogue).
OUTLIER_QUARTER_STORES = True
# With outlier columns, prefetch each tile's first block of them into L1 before its K loop, so that the
# epilogue's loads do not wait on L2 (benches/tune_w8a8.py --part epilogue; never under the interpreter).
PREFETCH_OUTLIERS = False


def tma_config(M: int, N: int, K: int) -> dict:
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, SUBTILE=True,
                    FLATTEN=True, WS=False)
    if M >= 1024:
        return TMA_CONFIGS.get((N, K), TMA_DEFAULT)
    return TMA_MID


def gemm_config(M: int) -> dict:
    """Tiles of the pointer-based GEMM by M (H100 sweeps, benches/NOTES.md, INT8); tiny under the interpreter."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def store_split(subtile: bool | int) -> int:
    """Stores per output tile for a config's SUBTILE: False 1, True 2, or the number given (1, 2, 4)."""
    return 2 if subtile is True else 1 if subtile is False else int(subtile)


def smem_bytes(cfg: dict, out_bytes: int, has_outliers: bool) -> int:
    """Shared memory of the TMA kernel: the pipeline stages, the store staging, the outlier dot's operands."""
    stages = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"]
    staging = cfg["BLOCK_M"] * cfg["BLOCK_N"] * out_bytes // store_split(cfg["SUBTILE"])
    outliers = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * BLOCK_O * 2 if has_outliers else 0
    return stages + staging + outliers + 1024


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def tma_ok(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these operands: 16-byte aligned bases and row strides."""
    tensors = (a, b, out)
    return (all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
                for t in tensors)
            and (_INTERPRET or (a.is_cuda and _has_tma(a.device.index or 0))))


def _launch_tma(a, a_scale, b, b_scale, bias, out, x_out, w_out, cnt, cfg: dict) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    (M, K), N = a.shape, b.shape[0]
    has_outliers = x_out is not None and x_out.shape[1] > 0
    out_int32 = out.dtype == torch.int32
    cfg = dict(cfg)
    split = store_split(cfg.pop("SUBTILE"))
    split = 1 if out_int32 else split
    flatten, ws = cfg.pop("FLATTEN"), cfg.pop("WS")
    fit = dict(cfg, SUBTILE=split)
    too_big = smem_bytes(fit, out.element_size(), has_outliers) > _SMEM_LIMIT
    if has_outliers and split == 2 and too_big and OUTLIER_QUARTER_STORES:
        fit["SUBTILE"] = split = 4  # the outlier dot's operands would cost a pipeline stage: this keeps it
    while cfg["num_stages"] > 2 and smem_bytes(fit, out.element_size(), has_outliers) > _SMEM_LIMIT:
        cfg["num_stages"] -= 1
        fit["num_stages"] -= 1
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_sms = 3 if _INTERPRET else _num_sms(a.device.index or 0)
    grid = (min(num_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    ko = x_out.shape[1] if has_outliers else 0
    _int8_gemm_tma_kernel[grid](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // split]), a_scale, b_scale,
        bias if bias is not None else b_scale, x_out if has_outliers else a_scale,
        w_out if has_outliers else a_scale, cnt if cnt is not None else a_scale, M, N, K, ko,
        x_out.stride(0) if has_outliers else 0, w_out.stride(0) if has_outliers else 0,
        HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers, HAS_CNT=cnt is not None,
        KO_PAD=max(BLOCK_O, triton.next_power_of_2(ko)), OUT_INT32=out_int32,
        FP32_DOT=_INTERPRET or (has_outliers and x_out.dtype == torch.float32), NUM_SMS=num_sms, SUBTILE=split,
        FLATTEN=flatten, WARP_SPECIALIZE=ws, BLOCK_O=BLOCK_O, PREFETCH=PREFETCH_OUTLIERS and not _INTERPRET, **cfg)


def launch_int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     bias: torch.Tensor | None, out: torch.Tensor, x_out: torch.Tensor | None = None,
                     w_out: torch.Tensor | None = None, cnt: torch.Tensor | None = None, cfg: dict | None = None,
                     tma: bool | None = None) -> None:
    """out = b_scale * (a_scale * (a @ b^T) + x_out @ w_out^T) + bias (raw a @ b^T when out is int32).

    a [M, K] int8 (row stride any), b [N, K] int8 contiguous, w_out [N, KO] int8 (b's outlier columns),
    x_out [M, KO] 16-bit; cnt: optional int32 [1] on device, the number of live outlier columns (the
    others are never read). tma None: the persistent TMA kernel from TMA_MIN_TOKENS tokens when the
    device and alignment allow it (never under the interpreter); True forces it, False the pointer kernel.
    cfg: tile config of the chosen kernel (default tma_config / gemm_config).
    """
    (M, K), N = a.shape, b.shape[0]
    if tma is None:
        tma = not _INTERPRET and M >= TMA_MIN_TOKENS and tma_ok(a, b, out)
    if tma:
        _launch_tma(a, a_scale, b, b_scale, bias, out, x_out, w_out, cnt, cfg or tma_config(M, N, K))
        return
    cfg = cfg or gemm_config(M)
    has_outliers = x_out is not None and x_out.shape[1] > 0
    _int8_gemm_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](
        a, b, out, a_scale, b_scale, bias if bias is not None else b_scale, x_out if has_outliers else a_scale,
        w_out if has_outliers else a_scale, cnt if cnt is not None else a_scale, M, N, K,
        x_out.shape[1] if has_outliers else 0, a.stride(0), out.stride(0), x_out.stride(0) if has_outliers else 0,
        w_out.stride(0) if has_outliers else 0, HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers,
        HAS_CNT=cnt is not None, OUT_INT32=out.dtype == torch.int32,
        FP32_DOT=_INTERPRET or (has_outliers and x_out.dtype == torch.float32), BLOCK_O=BLOCK_O, **cfg)


# ----------------------------------------------------------------------------- the pipeline
def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float = 6.0, max_outliers: int = 64) -> torch.Tensor:
    """W8A8 linear with LLM.int8()'s outlier decomposition, as `decoding.reference.w8a8_linear_ref`.

    x [M, K] 16-bit (or fp32), qweight [N, K] int8, w_scale [N] fp32 -> [M, N] in x's dtype. See the
    module docstring for the launches.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    (M, K), N = x.shape, qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    ko = min(max_outliers, K) if threshold > 0 else 0
    if ko == 0:
        q, s, _, _ = quantize(x)
        launch_int8_gemm(q, s, qweight, w_scale, bias, out)
        return out
    _, idx, cnt, keep, rmax = absmax_plan(x, threshold, ko, reuse=True)
    q, s, x_out, w_out = quantize(x, keep, cnt, idx, qweight, rmax)
    launch_int8_gemm(q, s, qweight, w_scale, bias, out, x_out, w_out, cnt)
    return out
