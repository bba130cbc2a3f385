"""Block pool bookkeeping and slot mapping of the paged KV cache."""

from __future__ import annotations

import pytest
import torch

from decoding.cache import AttentionMetadata, BlockPool
from decoding.errors import CacheExhausted


def test_allocate_free_share():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(CacheExhausted, match="needs 1 KV blocks, 0 of 8 are free"):
        pool.allocate(1)
    pool.share(a)
    pool.free(a)
    assert pool.num_free == 0 and pool.refcount(a[0]) == 1
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8
    with pytest.raises(AssertionError, match="double free"):
        pool.free([a[0]])


def test_slot_mapping_and_tables():
    # seq 0: 5-token prefill in blocks [3, 1] (block_size 4); seq 1: decode of its 7th token in [0, 2]
    meta = AttentionMetadata.build([[3, 1], [0, 2]], [5, 7], [5, 1], 4, "cpu")
    assert meta.slot_mapping.tolist() == [12, 13, 14, 15, 4, 10]
    assert meta.block_tables.tolist() == [[3, 1], [0, 2]]
    assert meta.seq_lens.tolist() == [5, 7] and meta.query_start_loc.tolist() == [0, 5, 6]
    assert meta.seq_lens_cpu == [5, 7] and meta.query_start_loc_cpu == [0, 5, 6]  # host copies: no sync to read
    assert meta.slot_mapping.dtype == torch.int64 and meta.block_tables.dtype == torch.int32


def test_prefix_cache_register_take_and_lru_eviction():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    ida = pool.register(a, 0, (1, 2))
    idb = pool.register(b, ida, (3, 4))
    assert pool.lookup(0, (1, 2)) == (a, ida) and pool.lookup(ida, (3, 4)) == (b, idb)
    assert pool.lookup(idb, (3, 4)) is None and pool.lookup(0, (3, 4)) is None  # the whole prefix is the key
    pool.free([a, b])
    assert pool.num_free == 3 and pool.num_cached == 2  # cached, unheld: free for allocate, still findable
    pool.take(a)  # a prefix-cache hit
    assert pool.refcount(a) == 1 and pool.num_free == 2
    (c,) = pool.allocate(1)  # the never-used block goes first
    assert c not in (a, b) and pool.lookup(ida, (3, 4)) == (b, idb)
    (d,) = pool.allocate(1)  # then the least recently freed cached block is evicted
    assert d == b and pool.lookup(ida, (3, 4)) is None and pool.num_cached == 1
    with pytest.raises(CacheExhausted):
        pool.allocate(1)
    pool.free([a, c, d])
    assert pool.num_free == 3


def test_prefix_cache_same_prefix_registered_twice_keeps_the_first():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    first = pool.register(a, 0, (5,))
    assert pool.register(b, 0, (5,)) == first  # b computed the same prefix at the same time: not cached
    pool.free([a, b])
    assert pool.num_cached == 1 and pool.lookup(0, (5,)) == (a, first)
    pool.clear_cache()
    assert pool.num_cached == 0 and pool.num_free == 2 and pool.lookup(0, (5,)) is None
