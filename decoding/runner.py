"""ModelRunner: runs one model step over the paged KV cache; decode steps replay a captured CUDA graph.

The runner owns the model and its KV cache. Callers (the Generator, the scheduler, tensor-parallel
workers) describe a step as a StepInput of plain host lists, which is picklable so that a driver can
hand the same step to every rank, and get back the fp32 logits of each sequence's last new token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
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


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs for decode steps: on for CUDA devices unless DECODING_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("DECODING_CUDA_GRAPHS", "1") != "0"


class _DecodeGraphs:
    """Decode steps of up to max(GRAPH_BUCKETS) sequences, padded to the next bucket and replayed.

    All buckets read one set of static buffers. The host packs a step into a pinned int32 buffer
    (token ids | positions | slots | seq_lens | block tables); each graph starts with the copy of that
    buffer to the device, so a step costs the host one graph launch. Padding rows have seq_len 0 and
    slot -1: attention outputs zeros for them and nothing is written to the cache. Block-table columns
    past a sequence's last block are never read, so only the used columns are written each step.
    Graphs are captured lazily, the first time a bucket is needed, into one shared memory pool.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        cache = runner.cache
        self.cache = cache
        self.max_seq_len = min(runner.config.max_position_embeddings, cache.num_blocks * runner.block_size)
        self.width = runner.blocks_for(self.max_seq_len)
        self.max_batch = GRAPH_BUCKETS[-1]
        n, w = self.max_batch, self.width
        self.host = torch.zeros(4 * n + n * w, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros_like(self.host, device=runner.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in GRAPH_BUCKETS if b >= num_seqs), None)

    def _views(self, buf: torch.Tensor, bucket: int):
        n = self.max_batch
        ids, pos, slots, lens = (buf[i * n: i * n + bucket] for i in range(4))
        tables = buf[4 * n:].reshape(n, self.width)[:bucket]
        return ids, pos, slots, lens, tables

    def _forward(self, bucket: int) -> torch.Tensor:
        """The captured work: unpack the step from the device buffer, run the model, compute logits."""
        runner = self.runner
        ids, pos, slots, lens, tables = self._views(self.dev, bucket)
        starts = torch.arange(bucket + 1, dtype=torch.int32, device=runner.device)
        meta = AttentionMetadata(slots.long(), tables, lens, starts, self.max_seq_len)
        hidden = runner.model(ids.long(), pos.long(), (self.cache.k, self.cache.v), meta)
        return runner.model.compute_logits(hidden)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        ids, pos, slots, lens, _ = self._views(self.host_np, bucket)
        ids[:], pos[:], slots[:], lens[:] = 0, 0, -1, 0  # all padding: the warm-up writes no cache slot
        self.dev.copy_(self.host)
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.dev.copy_(self.host, non_blocking=True)
            logits = self._forward(bucket)
        return graph, logits

    def run(self, inp: StepInput) -> torch.Tensor:
        b = inp.num_seqs
        bucket = self.bucket(b)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        ids, pos, slots, lens, tables = self._views(self.host_np, bucket)
        bs = self.runner.block_size
        for i, (table, n) in enumerate(zip(inp.block_tables, inp.seq_lens)):
            used = -(-n // bs)
            tables[i, :used] = table[:used]
            slots[i] = table[(n - 1) // bs] * bs + (n - 1) % bs
        ids[:b] = inp.input_ids
        lens[:b] = inp.seq_lens
        pos[:b] = lens[:b] - 1
        ids[b:], pos[b:], slots[b:], lens[b:] = 0, 0, -1, 0
        graph.replay()
        return logits[:b]


class ModelRunner:
    """A model, its KV cache, and the step function over them."""

    def __init__(self, model: LlamaModel, block_size: int = 16, cuda_graphs: bool | None = None) -> None:
        self.model = model
        self.config = model.config
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.cache: KVCache | None = None
        self.cuda_graphs = graphs_enabled(self.device) if cuda_graphs is None else cuda_graphs
        self._graphs: _DecodeGraphs | None = None

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def ensure_cache(self, need: int) -> KVCache:
        """A pool with `need` free blocks: the current one, or a bigger one when the current is idle."""
        if self.cache is None or self.cache.pool.num_free < need:
            if self.cache is not None and self.cache.pool.num_free != self.cache.num_blocks:
                raise InvalidRequest("the KV cache is in use by another call on this Generator")
            self.cache = self._graphs = None  # free the old pool (and graphs over it) before a bigger one
            self.cache = KVCache(self.config, need, self.block_size, self.device, self.dtype)
        return self.cache

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
        """One model step; returns the logits of each sequence's last new token, [num_seqs, vocab] fp32.

        A decode step on CUDA replays the captured graph of its batch-size bucket; the logits it returns
        are the graph's static output, valid until the next step.
        """
        if self.cuda_graphs and inp.is_decode and inp.num_seqs <= GRAPH_BUCKETS[-1]:
            if self._graphs is None or self._graphs.cache is not self.cache:
                self._graphs = _DecodeGraphs(self)
            return self._graphs.run(inp)
        hidden = self.forward_hidden(inp)
        if not inp.is_decode:
            last = torch.tensor(inp.query_lens).cumsum(0).sub(1).to(self.device, non_blocking=True)
            hidden = hidden[last]
        return self.model.compute_logits(hidden)
