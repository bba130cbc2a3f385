"""Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, refcounted blocks.

Layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (token-major
inside a block, as flash-attention's and flashinfer's paged kernels take it). A token at position p
of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.config import ModelConfig
from decoding.errors import CacheExhausted


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockPool:
    """Free list + refcounts over block ids 0..num_blocks-1. Host-side bookkeeping only."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheExhausted(f"needs {n} KV blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Another sequence now also reads these blocks (forked candidates, shared prefixes)."""
        for b in blocks:
            assert self._refs[b] > 0, f"sharing free block {b}"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]


class KVCache:
    """The per-layer K and V block pools of one model, plus their BlockPool."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.block_size = block_size
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
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
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_seq_len: int | None = None

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

        def as_tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

        return cls(as_tensor(slots, torch.int64), as_tensor(padded, torch.int32),
                   as_tensor(seq_lens, torch.int32), as_tensor(starts, torch.int32), max(seq_lens))
