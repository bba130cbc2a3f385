"""decoding::rope_and_cache (CUDA) against decoding.reference.rope_and_cache_ref (= rotary_embedding_ref
followed by reshape_and_cache_ref).

For bf16 and fp16 the kernel rounds each product and the sum exactly as the reference's elementwise ops
do, and a product of two 16-bit values is exact in fp32, so results must be bit-identical. For fp32 the
compiler may fuse a product into the add (one rounding instead of two): rtol 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from decoding import ops
from decoding.reference import rope_and_cache_ref, rope_cos_sin_cache

needs_ext = pytest.mark.skipif(not torch.cuda.is_available() or ops.select("rope_and_cache_", "cuda") != "cuda",
                               reason="needs CUDA and the extension")


def _inputs(device, dtype, tokens=7, heads=8, kv_heads=2, head_dim=64, block=16, num_blocks=6):
    torch.manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))  # strided views, as the model makes them
    cache_shape = (num_blocks, block, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, device=device).to(dtype)
    v_cache = torch.randn(cache_shape, device=device).to(dtype)
    positions = torch.randint(0, 4000, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block, device=device)[:tokens]
    slots[1] = -1  # a padding token: writes nothing
    cos_sin = rope_cos_sin_cache(head_dim, 4096, 500000.0, None).to(device)
    return qkv, q, k, v, cos_sin, k_cache, v_cache, positions, slots


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dims", [(8, 2, 64), (32, 8, 128), (9, 3, 64), (4, 4, 32), (3, 1, 36), (2, 2, 12)], ids=str)
@pytest.mark.parametrize("tokens", [7, 300])
def test_rope_and_cache_matches_reference(dtype, dims, tokens):
    """4 pairs a thread where head_dim / 2 is a multiple of 4 (all but 36 and 12: one pair a thread), a block
    per token and group of heads (9 + 3 heads: a partial last group)."""
    heads, kv_heads, head_dim = dims
    got = _inputs("cuda", dtype, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                  num_blocks=-(-tokens // 16) + 2)
    want = [t.clone() if torch.is_tensor(t) else t for t in got]
    torch.ops.decoding.rope_and_cache(got[7], got[1], got[2], got[3], got[4], got[5], got[6], got[8])
    qkv = want[0]
    split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = (t.view(t.shape[0], -1, head_dim) for t in qkv.split(split, dim=-1))
    rope_and_cache_ref(want[7], q, k, v, want[4], want[5], want[6], want[8])
    exact = dtype != torch.float32
    for g, w in [(got[0], want[0]), (got[5], want[5]), (got[6], want[6])]:  # q|k|v in place, both caches
        if exact:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@needs_ext
def test_rope_and_cache_rejects_bad_arguments():
    _, q, k, v, cos_sin, k_cache, v_cache, positions, slots = _inputs("cuda", torch.bfloat16)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.decoding.rope_and_cache(positions.int(), q, k, v, cos_sin, k_cache, v_cache, slots)
    with pytest.raises(RuntimeError, match="k_cache and v_cache"):
        torch.ops.decoding.rope_and_cache(positions, q, k, v, cos_sin, k_cache.float(), v_cache, slots)
    with pytest.raises(RuntimeError, match="cos_sin_cache"):
        torch.ops.decoding.rope_and_cache(positions, q, k, v, cos_sin.half(), k_cache, v_cache, slots)


def test_reference_is_rope_then_cache_write():
    """The fused reference is the two reference ops in order (CPU), padding slot included."""
    from decoding.reference import reshape_and_cache_ref, rotary_embedding_ref

    a = _inputs("cpu", torch.float32)
    b = [t.clone() if torch.is_tensor(t) else t for t in a]
    ops.rope_and_cache_(a[7], a[1], a[2], a[3], a[4], a[5], a[6], a[8])
    qkv = b[0]
    q, k, v = (t.view(t.shape[0], -1, 64) for t in qkv.split([512, 128, 128], dim=-1))
    rotary_embedding_ref(b[7], q, k, b[4])
    reshape_and_cache_ref(k, v, b[5], b[6], b[8])
    for g, w in [(a[0], b[0]), (a[5], b[5]), (a[6], b[6])]:
        assert torch.equal(g, w)
