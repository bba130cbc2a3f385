"""ModelRunner: runs one model step over the paged KV cache; decode steps replay a captured CUDA graph.

The runner owns the model and its KV cache. Callers (the Generator, the scheduler, tensor-parallel
workers) describe a step as a StepInput of plain host lists, which is picklable so that a driver can
hand the same step to every rank, and get back the fp32 logits of each sequence's last new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.cache import AttentionMetadata, KVCache, blocks_for
from decoding.errors import InvalidRequest
from decoding.models.llama import LlamaModel


@dataclass
class StepInput:
    """One step: sequence b has seq_lens[b] tokens in total, of which the last query_lens[b] are new.

    block_tables[b] lists the KV blocks of sequence b (enough for seq_lens[b] tokens); input_ids are
    the new tokens of all sequences, concatenated in order.
    """

    block_tables: list[list[int]]
    seq_lens: list[int]
    input_ids: list[int]
    query_lens: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (what the CUDA graphs take)."""
        return len(self.input_ids) == len(self.seq_lens)

    def positions(self) -> list[int]:
        return [p for n, q in zip(self.seq_lens, self.query_lens) for p in range(n - q, n)]


class ModelRunner:
    """A model, its KV cache, and the step function over them."""

    def __init__(self, model: LlamaModel, block_size: int = 16) -> None:
        self.model = model
        self.config = model.config
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.cache: KVCache | None = None

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def ensure_cache(self, need: int) -> KVCache:
        """A pool with `need` free blocks: the current one, or a bigger one when the current is idle."""
        if self.cache is None or self.cache.pool.num_free < need:
            if self.cache is not None and self.cache.pool.num_free != self.cache.num_blocks:
                raise InvalidRequest("the KV cache is in use by another call on this Generator")
            self.allocate_cache(need)
        return self.cache

    def allocate_cache(self, num_blocks: int) -> None:
        """A new, empty pool of `num_blocks` blocks (tensor-parallel workers get the driver's count)."""
        self.cache = None  # free the old pool before taking a bigger one
        self.cache = KVCache(self.config, num_blocks, self.block_size, self.device, self.dtype)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst, for each (src, dst), in every layer."""
        for layer_cache in (*self.cache.k, *self.cache.v):
            for src, dst in pairs:
                layer_cache[dst].copy_(layer_cache[src])

    def close(self) -> None:
        """Release what the runner holds outside this process (tensor-parallel workers); idempotent."""

    @torch.inference_mode()
    def forward_hidden(self, inp: StepInput) -> torch.Tensor:
        """Final hidden states of every new token, [len(input_ids), hidden_size] (eager)."""
        meta = AttentionMetadata.build(inp.block_tables, inp.seq_lens, inp.query_lens, self.block_size,
                                       self.device)
        ids = torch.tensor(inp.input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        pos = torch.tensor(inp.positions(), dtype=torch.int64).to(self.device, non_blocking=True)
        return self.model(ids, pos, (self.cache.k, self.cache.v), meta)

    @torch.inference_mode()
    def step(self, inp: StepInput) -> torch.Tensor:
        """One model step; returns the logits of each sequence's last new token, [num_seqs, vocab] fp32."""
        hidden = self.forward_hidden(inp)
        if not inp.is_decode:
            last = torch.tensor(inp.query_lens).cumsum(0).sub(1).to(self.device, non_blocking=True)
            hidden = hidden[last]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def logits_at(self, inp: StepInput, rows: list[int]) -> torch.Tensor:
        """The step's fp32 logits at the given new-token indices (into input_ids), [len(rows), vocab]."""
        hidden = self.forward_hidden(inp)
        return self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)])
