"""Plain-PyTorch reference of every op: clear rather than fast, fp32 inside, any device.

Each fast implementation (C++/CUDA in csrc/, Triton in kernels/) is tested against the function
of the same name here, and these are also the fallback when no fast implementation applies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, as HF Llama computes it.

    The normalisation runs in fp32 and is rounded to x's dtype before the weight multiply, the
    order HF uses, so that bf16 results agree with transformers bit for bit.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- x + residual, then x <- rms_norm(residual) * weight.

    x, residual: [num_tokens, hidden_size], same dtype; weight: [hidden_size].
    """
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] (gate | up) -> silu(gate) * up, in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (fp32) with HF's `default`, `linear` and `llama3` rules."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of the head_dim//2 frequencies, then their sin."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In place: rotate q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim].

    Non-interleaved (rotate-half) layout, as HF Llama. cos/sin are rounded to q's dtype before the
    products, as HF does.
    """
    half = cos_sin_cache.shape[-1] // 2
    cos, sin = cos_sin_cache[positions].to(q.dtype).split(half, dim=-1)
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]
    for t in (q, k):
        x1, x2 = t[..., :half], t[..., half:]
        rotated = torch.cat([-x2, x1], dim=-1)
        t.copy_(t * cos + rotated * sin)


def reshape_and_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into the paged caches.

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping: [num_tokens]
    int, slot = block_id * block_size + offset; a negative slot skips the token (padding).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def rope_and_cache_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """rotary_embedding_ref on q and k (in place), then reshape_and_cache_ref of k and v: one fused op."""
    rotary_embedding_ref(positions, q, k, cos_sin_cache)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) with fp32 products and sums, rounded once to x's dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_and_mul_ref(linear_ref(x, weight)): weight holds the gate rows then the up rows."""
    return silu_and_mul_ref(linear_ref(x, weight))


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    query_start_loc_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:
    """Causal GQA attention of new query tokens over each sequence's paged K/V.

    q: [num_tokens, num_heads, head_dim], the new tokens of all sequences back to back; sequence b
    owns q[query_start_loc[b]:query_start_loc[b + 1]], which are the last tokens of its context of
    seq_lens[b] tokens (already written to the cache). block_tables: [num_seqs, max_blocks] int.
    Prefill (many query tokens), decode (one) and chunked prefill are the same call. max_seq_len (a
    bound on seq_lens that fast kernels use to size their launch) is not needed here;
    query_start_loc_cpu and seq_lens_cpu, host copies of those tensors, are read instead when given.
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist() if query_start_loc_cpu is None else query_start_loc_cpu
    for b, seq_len in enumerate(seq_lens.tolist() if seq_lens_cpu is None else seq_lens_cpu):
        qb = q[starts[b]:starts[b + 1]].float()  # [n_q, H, D]
        n_q = qb.shape[0]
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        kb = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()  # [L, H_kv, D]
        vb = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        group = num_heads // num_kv_heads
        kb = kb.repeat_interleave(group, dim=1)  # [L, H, D]
        vb = vb.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        q_pos = torch.arange(seq_len - n_q, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= (q_pos - k_pos) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[starts[b]:starts[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vb).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- INT8 (decoding/quant.py)
def w8a16_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (qweight [N, K] int8 * scales)^T + bias, accumulated in fp32, returned in x's dtype.

    scales: fp32 [N], applied once to each output channel's sum; or [N, K // group_size], applied to
    each group's partial sum (what the kernels do, in the same order).
    """
    xf, qf = x.float(), qweight.float()
    if scales.dim() == 1:
        y = (xf @ qf.t()) * scales
    else:
        (m, k), (n, groups) = x.shape, scales.shape
        gs = k // groups
        parts = torch.bmm(xf.view(m, groups, gs).transpose(0, 1), qf.view(n, groups, gs).permute(1, 2, 0))
        y = (parts * scales.t()[:, None, :]).sum(0)  # parts: [groups, M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a16_linear_silu_mul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """silu_and_mul_ref(w8a16_linear_ref(x, qweight, scales)): qweight holds the gate rows then the up rows."""
    return silu_and_mul_ref(w8a16_linear_ref(x, qweight, scales))


def round_half_away_ref(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (the int8 kernels' rounding), on fp32."""
    return torch.where(v >= 0, v + 0.5, v - 0.5).trunc()


def quantize_per_token_ref(x: torch.Tensor, col_mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: scale = max|row| / 127, q = round(row / scale) (ties away from zero).

    x: [M, K]; col_mask: optional fp32 [K] of 0/1, multiplied in first (zeroes LLM.int8() outlier
    columns). Returns (q [M, K] int8, scale [M] fp32); an all-zero row gets scale 1. 127 / amax is a
    tensor division (IEEE; torch's scalar / tensor is a reciprocal times 127, which can differ by an ulp).
    """
    xf = x.float()
    if col_mask is not None:
        xf = xf * col_mask
    amax = xf.abs().amax(-1)
    nonzero = amax > 0
    scale = torch.where(nonzero, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))
    inv = torch.where(nonzero, torch.full_like(amax, 127.0) / torch.where(nonzero, amax, torch.ones_like(amax)),
                      torch.ones_like(amax))
    q = round_half_away_ref(xf * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def column_absmax_ref(x: torch.Tensor) -> torch.Tensor:
    """max over rows of |x| for x [M, K] -> fp32 [K]."""
    return x.float().abs().amax(0)


def _int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K]^T int8, exact: int32 on the CPU (torch._int_mm), else float64 (which
    holds every such sum exactly for K < 2^39)."""
    if a.device.type == "cpu":
        try:
            return torch._int_mm(a, b.t())
        except (RuntimeError, AttributeError):  # a torch without int8 matmul on the CPU
            pass
    return a.double() @ b.double().t()


def int8_scaled_mm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype, x_out: torch.Tensor | None = None,
                       out_idx: torch.Tensor | None = None) -> torch.Tensor:
    """b_scale * (a_scale * (a @ b^T) + x_out @ b[:, out_idx]^T) + bias, as the W8A8 kernels compute it.

    a: [M, K] int8 activations with per-row scales a_scale [M]; b: [N, K] int8 weights with per-row
    scales b_scale [N]. The int8 product is exact (_int8_matmul_exact). x_out [M, KO] (16-bit) and out_idx [KO] are LLM.int8()'s outlier columns: their product
    with the same int8 weight columns is the 16-bit part, in fp32. out_dtype=torch.int32 returns a @ b^T.
    """
    acc = _int8_matmul_exact(a, b)
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    y = acc.float() * a_scale[:, None]
    if x_out is not None and x_out.shape[1] > 0:
        y = y + x_out.float() @ b[:, out_idx].float().t()
    y = y * b_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def outlier_columns_ref(x: torch.Tensor, threshold: float, max_outliers: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s outlier columns of x [M, K]: those whose max |x| exceeds threshold.

    Returns (idx [KO] int64, keep [KO] bool), KO = min(max_outliers, K): the outlier columns in
    increasing order, padded with column 0 and keep False. When more than KO columns exceed the
    threshold, only those above the (KO+1)-th largest column maximum are kept (the largest ones; a tie
    at the cut drops the tied columns); the rest stay in int8. A fixed KO keeps the fast path free of
    host syncs (no nonzero() of unknown size).
    """
    ko = min(max_outliers, x.shape[1]) if threshold > 0 else 0
    idx = torch.zeros(ko, dtype=torch.int64, device=x.device)
    keep = torch.zeros(ko, dtype=torch.bool, device=x.device)
    if ko:
        amax = column_absmax_ref(x)
        over = amax > threshold
        if over.sum() > ko:
            over &= amax > amax.sort(descending=True).values[ko]
        cols = over.nonzero()[:, 0]
        idx[: cols.numel()] = cols
        keep[: cols.numel()] = True
    return idx, keep


def w8a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    threshold: float = 6.0, max_outliers: int = 64) -> torch.Tensor:
    """W8A8 linear with LLM.int8()'s decomposition: x [M, K] (16-bit) @ (qweight [N, K] * w_scale [N])^T.

    Outlier columns (outlier_columns_ref) go through a 16-bit matmul with the same int8 weight columns;
    the rest is quantized per token and multiplied in int8 with int32 accumulation. threshold <= 0
    turns the decomposition off (every column in int8).
    """
    idx, keep = outlier_columns_ref(x, threshold, max_outliers)
    col_mask = None
    x_out = None
    if idx.numel():
        col_mask = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
        col_mask.scatter_(0, idx, (~keep).float())
        x_out = x.index_select(1, idx) * keep.to(x.dtype)
    q, s = quantize_per_token_ref(x, col_mask)
    return int8_scaled_mm_ref(q, s, qweight, w_scale, bias, x.dtype, x_out, idx)
