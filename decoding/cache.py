"""Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, refcounted blocks.

Layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (token-major
inside a block, as flash-attention's and flashinfer's paged kernels take it). A token at position p
of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from decoding.config import ModelConfig
from decoding.errors import CacheExhausted
from decoding.nosync import to_device


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Free list + refcounts over block ids 0..num_blocks-1, and the prefix cache. Host-side bookkeeping only.

    Prefix cache: a full block of computed KV can be registered under the key (entry id of the block
    before it, its token ids). Entry ids are never reused, so a key names one whole prefix exactly (a
    dict lookup compares the tokens, not only a hash: two different prefixes never share an entry). A
    registered block nobody holds stays "free but cached": it counts in num_free, a later request with
    the same prefix can take it back (`take`), and `allocate` evicts such blocks, least recently freed
    first, only once the plain free list is empty.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with refcount 0, LRU first
        self._entries: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # key -> (block, entry id)
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # registered block -> its key
        self._next_id = 1  # entry id 0 is the empty prefix

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never used, freed, or cached but held by nobody."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Registered prefix-cache blocks (held or not)."""
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise CacheExhausted(f"needs {n} KV blocks, {self.num_free} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._entries[self._key_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Another sequence now also reads these blocks (forked candidates, shared prefixes)."""
        for b in blocks:
            assert self._refs[b] > 0, f"sharing free block {b}"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        # Tail first: a freed sequence's last blocks are evicted before its first ones, which more
        # requests share.
        for b in reversed(blocks):
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int] | None:
        """(block, entry id) cached for this block of tokens after the prefix `parent`, or None."""
        return self._entries.get((parent, tokens))

    def take(self, block: int) -> None:
        """A request reuses a cached block (a prefix-cache hit): one more holder."""
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Cache a held, full, computed block; returns the entry id that names this prefix.

        If the same prefix is cached already (two requests computed it at once), that entry stays and its
        id is returned; `block` is then not cached and goes back to the free list when released.
        """
        key = (parent, tokens)
        entry = self._entries.get(key)
        if entry is not None:
            return entry[1]
        assert self._refs[block] > 0 and block not in self._key_of, f"registering block {block} twice or unheld"
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[key] = (block, entry_id)
        self._key_of[block] = key
        return entry_id

    def clear_cache(self) -> None:
        """Forget every cached prefix (held blocks stay held; unheld ones become plain free blocks)."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._entries.clear()
        self._key_of.clear()


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """KV bytes of one block over all layers (K and V)."""
    return (2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim
            * torch.empty((), dtype=dtype).element_size())


class KVCache:
    """The per-layer K and V block pools of one model, plus their BlockPool."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.block_size = block_size
        # Zeros, not empty: nothing reads a slot before it is written (the kernels mask past seq_len), but
        # recycled allocator memory can hold NaN patterns, and a step over never-written slots (tests, a
        # bug) then gives NaN in one run and finite values in the next. A memset of the pool: ~25 ms on 60 GB.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks


@dataclass
class AttentionMetadata:
    """What the attention op needs to find each sequence's tokens in the paged cache (one step).

    slot_mapping: [num_tokens] int64, where each new token's K/V go.
    block_tables: [num_seqs, max_blocks] int32, padded with 0.
    seq_lens: [num_seqs] int32, context length including the new tokens.
    query_start_loc: [num_seqs + 1] int32, offsets of each sequence's new tokens in the batch.
    max_seq_len: a host-side bound on seq_lens (kernels size their launch by it without a sync).
    query_start_loc_cpu, seq_lens_cpu: the same values as host lists, when the caller has them (build
    does): prefill attention splits a step by them without reading the device tensors (a sync per layer).
    device_split: (decode_lens, gather_rows, scatter_rows), the split of a graphed mixed step into decode and
    prefill rows as device tensors (see ops.paged_mixed_attention); None elsewhere.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_seq_len: int | None = None
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    device_split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, block_tables: list[list[int]], seq_lens: list[int], query_lens: list[int],
              block_size: int, device: torch.device | str) -> AttentionMetadata:
        """Metadata for sequences whose last query_lens[b] of seq_lens[b] tokens are new this step."""
        slots: list[int] = []
        for table, seq_len, q_len in zip(block_tables, seq_lens, query_lens):
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)

        device = torch.device(device)
        return cls(to_device(slots, torch.int64, device), to_device(padded, torch.int32, device),
                   to_device(seq_lens, torch.int32, device), to_device(starts, torch.int32, device), max(seq_lens),
                   starts, list(seq_lens))
