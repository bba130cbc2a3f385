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

from decoding import ops
from decoding.cache import AttentionMetadata, KVCache, blocks_for
from decoding.nosync import capture, to_device
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
    # Per input token: -1 (input_ids holds it), or the row of the runner's last recorded tokens
    # (ModelRunner.record_tokens) that holds it, a token the host has not read yet.
    prev_rows: list[int] | None = None
    # The scheduler's max_num_batched_tokens, a mixed-graph token bucket of its own (token_buckets): it
    # travels with the step, so every tensor-parallel rank pads it to the same graph.
    token_budget: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (what the CUDA graphs take)."""
        return all(q == 1 for q in self.query_lens)

    def positions(self) -> list[int]:
        return [p for n, q in zip(self.seq_lens, self.query_lens) for p in range(n - q, n)]


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_HEADER = 5  # rows of a decode graph's header: ids, positions, slots, seq_lens, id sources


def graphs_enabled(device: torch.device) -> bool:
    """CUDA graphs for decode steps: on for CUDA devices unless DECODING_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("DECODING_CUDA_GRAPHS", "1") != "0"


def mixed_graphs_enabled() -> bool:
    """CUDA graphs for mixed and prefill steps too (where graphs are on): unless DECODING_MIXED_GRAPHS=0."""
    return os.environ.get("DECODING_MIXED_GRAPHS", "1") != "0"


MIXED_MIN_TOKENS = 16  # the smallest token bucket of a mixed graph
MIXED_MAX_TOKENS = 2048  # the largest (ModelRunner.mixed_max_tokens); larger steps run eagerly


def token_buckets(max_tokens: int = MIXED_MAX_TOKENS, budget: int | None = None) -> list[int]:
    """The token counts of the mixed graphs, up to max_tokens: powers of two from MIXED_MIN_TOKENS to 256,
    then steps of a quarter of the power of two below (320, 384, 448, 512, 640, ..., 1024, 1280, ...), so
    a step of more than 256 tokens computes at most 25% padding rows (with powers of two, a 300-token
    step computed 512); and the scheduler's token budget, if given (its full steps, the most common
    ones while requests wait, then compute no padding row)."""
    out, b = [], MIXED_MIN_TOKENS
    while b <= max_tokens:
        out.append(b)
        b = b * 2 if b < 256 else b + (1 << (b.bit_length() - 1)) // 4
    if budget is not None and budget <= max_tokens and budget not in out:
        out = sorted([*out, budget])
    return out


def token_bucket(num_tokens: int, max_tokens: int = MIXED_MAX_TOKENS, budget: int | None = None) -> int | None:
    """The token count a mixed graph pads a step of num_tokens to (the smallest of token_buckets that
    holds it), or None past max_tokens."""
    return next((b for b in token_buckets(max_tokens, budget) if b >= num_tokens), None)


def mixed_layout(tokens: int, seqs: int) -> tuple[slice, ...]:
    """Where a mixed graph of `tokens` x `seqs` finds its inputs in the staging buffer: ids, positions,
    slots, id sources ([tokens] each), seq_lens [seqs], query_start_loc [seqs + 1]; the block tables
    [num_seqs, cols] follow, packed (offset 4 * tokens + 2 * seqs + 1)."""
    t, s = tokens, seqs
    return (slice(0, t), slice(t, 2 * t), slice(2 * t, 3 * t), slice(3 * t, 4 * t), slice(4 * t, 4 * t + s),
            slice(4 * t + s, 4 * t + 2 * s + 1))


def stage_mixed_step(buf: np.ndarray, inp: StepInput, tokens: int, seqs: int, block_size: int,
                     sources: list[int]) -> tuple[int, int]:
    """Pack a step for the mixed graph of (tokens, seqs) into buf (int32, laid out by mixed_layout).

    Padding tokens (past the step's own) get id 0, position 0 and slot -1 (no KV write); padding sequences
    seq_len 0 and no new tokens (query_start_loc stays at the step's token count). sources: id_sources of
    the `tokens` inputs. Returns (entries of buf in use, block-table columns in use)."""
    ids, pos, slots, src, lens, starts = (buf[sl] for sl in mixed_layout(tokens, seqs))
    b, n = inp.num_seqs, len(inp.input_ids)
    q = np.asarray(inp.query_lens, dtype=np.int64)
    seq_lens = np.asarray(inp.seq_lens, dtype=np.int64)
    cols = -(-int(seq_lens.max()) // block_size)
    base = 4 * tokens + 2 * seqs + 1
    tables = buf[base: base + b * cols].reshape(b, cols)
    for i, (table, length) in enumerate(zip(inp.block_tables, inp.seq_lens)):
        used = -(-length // block_size)
        tables[i, :used] = table[:used]
        tables[i, used:] = 0
    starts[0] = 0
    starts[1: b + 1] = np.cumsum(q)
    starts[b + 1:] = n
    p = np.repeat(seq_lens - q, q) + np.arange(n) - np.repeat(starts[:b], q)  # each new token's position
    ids[:n], ids[n:] = inp.input_ids, 0
    pos[:n], pos[n:] = p, 0
    slots[:n], slots[n:] = tables[np.repeat(np.arange(b), q), p // block_size] * block_size + p % block_size, -1
    lens[:b], lens[b:] = seq_lens, 0
    src[:] = sources
    return base + b * cols, cols


class _DecodeGraphs:
    """Decode steps of up to max(GRAPH_BUCKETS) sequences, padded to the next bucket and replayed.

    Every bucket's graph reads one set of device buffers: a header (token ids | positions | slots |
    seq_lens, laid out for that bucket) and the block tables [max_batch, width]. The host packs a step
    (header, then the block tables cut to the columns in use: columns past a sequence's last block are
    never read) into one of two pinned staging buffers and copies it to the device in one transfer; the
    graphs read the header where it lands, and the tables are spread into their rows on the device. A staging buffer is rewritten
    only after the copy out of it has run (an event per buffer), so steps may be queued back to back.
    Padding rows have seq_len 0 and slot -1: attention outputs zeros for them and no cache slot is
    written. Graphs are captured lazily, the first time a bucket is needed, into one memory pool.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cache = runner.cache
        self.max_seq_len = runner.attention_bound()
        self.width = runner.blocks_for(self.max_seq_len)
        self.max_batch = GRAPH_BUCKETS[-1]
        n, w = self.max_batch, self.width
        self.hosts = [torch.zeros(_HEADER * n + n * w, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in self.hosts]
        self.turn = 0
        self.dev_staging = torch.zeros(_HEADER * n + n * w, dtype=torch.int32, device=runner.device)
        self.dev_tables = torch.zeros(n, w, dtype=torch.int32, device=runner.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in GRAPH_BUCKETS if b >= num_seqs), None)

    @staticmethod
    def _header(buf, bucket: int):
        """ids, positions, slots, seq_lens, sources: views of a header laid out for `bucket` rows."""
        return tuple(buf[i * bucket: (i + 1) * bucket] for i in range(_HEADER))

    def _forward(self, bucket: int) -> torch.Tensor:
        """The captured work: read the step from the device buffers, run the model, compute logits."""
        runner = self.runner
        ids, pos, slots, lens, src = self._header(self.dev_staging, bucket)
        ids = runner.resolve_ids(ids, src)
        starts = torch.arange(bucket + 1, dtype=torch.int32, device=runner.device)
        meta = AttentionMetadata(slots.long(), self.dev_tables[:bucket], lens, starts, self.max_seq_len)
        hidden = runner.model(ids, pos.long(), (self.cache.k, self.cache.v), meta)
        return runner.model.compute_logits(hidden)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.runner.device
        ids, pos, slots, lens, src = self._header(self.dev_staging, bucket)
        ids.zero_(), pos.zero_(), slots.fill_(-1), lens.zero_()  # all padding: the warm-up writes nothing
        src.copy_(torch.arange(bucket, device=device) + self.runner.prev_capacity)
        return capture(lambda: self._forward(bucket), self.pool, device, warmup=True)

    def run(self, inp: StepInput) -> torch.Tensor:
        b = inp.num_seqs
        bucket = self.bucket(b)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        k, self.turn = self.turn, self.turn ^ 1
        self.events[k].synchronize()  # the copy out of this staging buffer (two steps ago) has run
        host = self.hosts[k]
        host_np = host.numpy()
        ids, pos, slots, lens, src = self._header(host_np, bucket)
        bs = self.runner.block_size
        cols = -(-max(inp.seq_lens) // bs)  # block-table columns in use
        base = _HEADER * bucket
        tables = host_np[base: base + b * cols].reshape(b, cols)  # packed [b, cols] after the header
        for i, (table, n) in enumerate(zip(inp.block_tables, inp.seq_lens)):
            used = -(-n // bs)
            tables[i, :used] = table[:used]
            slots[i] = table[(n - 1) // bs] * bs + (n - 1) % bs
        ids[:b] = inp.input_ids
        lens[:b] = inp.seq_lens
        pos[:b] = lens[:b] - 1
        ids[b:], pos[b:], slots[b:], lens[b:] = 0, 0, -1, 0
        src[:] = self.runner.id_sources(inp.prev_rows, bucket)
        # one contiguous copy from pinned memory, then the tables spread into their rows on the device
        self.dev_staging[: base + b * cols].copy_(host[: base + b * cols], non_blocking=True)
        self.events[k].record()
        self.dev_tables[:b, :cols].copy_(self.dev_staging[base: base + b * cols].view(b, cols))
        graph.replay()
        return logits[:b]


def mixed_forward(runner: ModelRunner, staging: torch.Tensor, tables: torch.Tensor, tokens: int, seqs: int,
                  max_seq_len: int) -> torch.Tensor:
    """A mixed graph's work, device ops only: the step staged in `staging` (mixed_layout of (tokens, seqs)),
    its block tables in tables[:seqs], through the model; fp32 logits of each sequence's last token [seqs, V]."""
    from decoding.kernels.attention import mixed_split  # Triton: imported only where it runs

    ids, pos, slots, src, lens, starts = (staging[sl] for sl in mixed_layout(tokens, seqs))
    ids = runner.resolve_ids(ids, src)
    meta = AttentionMetadata(slots.long(), tables[:seqs], lens, starts, max_seq_len,
                             device_split=mixed_split(starts, lens, tokens))
    hidden = runner.model(ids, pos.long(), (runner.cache.k, runner.cache.v), meta)
    last = (starts[1:] - 1).clamp(min=0).long()
    return runner.model.compute_logits(hidden.index_select(0, last))


class _MixedGraphs:
    """Steps with a query longer than one token (prefill chunks, with or without decode rows), padded to
    (token bucket T, sequence bucket S) and replayed: the host issues no per-layer work.

    As _DecodeGraphs: the host packs a step (stage_mixed_step) into one of two pinned staging buffers, one
    H2D copy moves it, the block tables are spread into their rows on the device, and the graph of (T, S)
    reads it. Attention splits the rows on the device (ops.paged_mixed_attention): the split-K decode kernel
    for the one-token rows (the decode steps' partitioning: the same bits), the varlen prefill kernel for the
    others. Padding tokens write no KV (slot -1); padding sequences have no tokens. Logits are computed for
    each sequence's last token only and land in one [max S, vocab] fp32 buffer shared by all the graphs.
    Graphs are captured lazily into one memory pool of their own (shared among the mixed graphs).
    """

    def __init__(self, runner: ModelRunner, pool) -> None:
        self.runner = runner
        self.cache = runner.cache
        self.pool = pool
        self.max_seq_len = runner.attention_bound()
        self.width = runner.blocks_for(self.max_seq_len)
        self.max_tokens = runner.mixed_max_tokens
        self.max_seqs = GRAPH_BUCKETS[-1]
        size = 4 * self.max_tokens + 2 * self.max_seqs + 1 + self.max_seqs * self.width
        self.hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in self.hosts]
        self.turn = 0
        self.dev_staging = torch.zeros(size, dtype=torch.int32, device=runner.device)
        self.dev_tables = torch.zeros(self.max_seqs, self.width, dtype=torch.int32, device=runner.device)
        self.logits = torch.zeros(self.max_seqs, runner.config.vocab_size, dtype=torch.float32, device=runner.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _forward(self, tokens: int, seqs: int) -> None:
        logits = mixed_forward(self.runner, self.dev_staging, self.dev_tables, tokens, seqs, self.max_seq_len)
        self.logits[:seqs].copy_(logits)

    def _capture(self, tokens: int, seqs: int) -> torch.cuda.CUDAGraph:
        device = self.runner.device
        ids, pos, slots, src, lens, starts = (self.dev_staging[sl] for sl in mixed_layout(tokens, seqs))
        ids.zero_(), pos.zero_(), slots.fill_(-1), lens.zero_(), starts.zero_()  # all padding: writes nothing
        src.copy_(torch.arange(tokens, device=device) + self.runner.prev_capacity)
        return capture(lambda: self._forward(tokens, seqs), self.pool, device, warmup=True)[0]

    def run(self, inp: StepInput, shape: tuple[int, int]) -> torch.Tensor:
        tokens, seqs = shape
        graph = self.graphs.get(shape)
        if graph is None:
            graph = self.graphs[shape] = self._capture(tokens, seqs)
        k, self.turn = self.turn, self.turn ^ 1
        self.events[k].synchronize()  # the copy out of this staging buffer (two steps ago) has run
        host = self.hosts[k]
        used, cols = stage_mixed_step(host.numpy(), inp, tokens, seqs, self.runner.block_size,
                                      self.runner.id_sources(inp.prev_rows, tokens))
        b, base = inp.num_seqs, 4 * tokens + 2 * seqs + 1
        self.dev_staging[:used].copy_(host[:used], non_blocking=True)
        self.events[k].record()
        self.dev_tables[:b, :cols].copy_(self.dev_staging[base: used].view(b, cols))
        graph.replay()
        return self.logits[:b]


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
        self._mixed: _MixedGraphs | None = None
        self.mixed_max_tokens = MIXED_MAX_TOKENS  # steps of more tokens run eagerly
        # The tokens of the last step, as the engine recorded them (record_tokens), for a step launched
        # before the host has read them (StepInput.prev_rows); a fixed buffer, so graphs can read it.
        self.prev_capacity = 1024
        self.prev_tokens = torch.zeros(self.prev_capacity, dtype=torch.int64, device=self.device)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def attention_bound(self) -> int:
        """The longest context any sequence can reach: every step gives attention this bound, so that a
        sequence's attention is split the same way (the same bits) in graphed, eager and mixed steps."""
        return min(self.config.max_position_embeddings, self.cache.num_blocks * self.block_size)

    # Whether steps may take tokens from the device (StepInput.prev_rows): not across processes.
    takes_device_tokens = True

    def record_tokens(self, tokens: torch.Tensor) -> None:
        """Keep the tokens just drawn on the device, [n] ints, for the next step's prev_rows (stream-ordered)."""
        self.prev_tokens[: tokens.shape[0]].copy_(tokens.clamp(min=0))  # -1 (a failed row): any valid id

    def id_sources(self, prev_rows: list[int] | None, n: int) -> list[int]:
        """Per input token, where resolve_ids finds it: prev_tokens[r], or entry prev_capacity + i (the
        i-th host id) for the ones input_ids holds; n entries (padding rows: their host ids)."""
        cap = self.prev_capacity
        if prev_rows is None:
            return list(range(cap, cap + n))
        return [r if r >= 0 else cap + i for i, r in enumerate(prev_rows)] + list(range(cap + len(prev_rows), cap + n))

    def resolve_ids(self, ids: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Token ids [n] int64 from the host's ids and the sources id_sources gave (device ops only)."""
        return torch.cat([self.prev_tokens, ids.long()]).index_select(0, sources.long())

    def allocate_cache(self, num_blocks: int) -> KVCache:
        """Allocate the KV cache pool once (the scheduler sizes it); later steps read and write it."""
        self.free_cache()  # an old pool (and the graphs over it) goes before the new one is made
        self.cache = KVCache(self.config, num_blocks, self.block_size, self.device, self.dtype)
        return self.cache

    def free_cache(self) -> None:
        """Drop the KV cache pool and the graphs captured over it."""
        self.cache = self._graphs = self._mixed = None

    @torch.inference_mode()  # the pool may have been made under inference mode (e.g. by score())
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the K/V of block src into block dst, for each (src, dst), in every layer (copy-on-write of
        a forked candidate's partial block; tensor-parallel drivers send the same call to their workers)."""
        src = to_device([s for s, _ in pairs], torch.int64, self.device)
        dst = to_device([d for _, d in pairs], torch.int64, self.device)
        for layer_cache in (*self.cache.k, *self.cache.v):
            layer_cache.index_copy_(0, dst, layer_cache.index_select(0, src))

    def close(self) -> None:
        """Release what the runner holds outside this process (tensor-parallel workers); idempotent."""

    @torch.inference_mode()
    def forward_hidden(self, inp: StepInput) -> torch.Tensor:
        """Final hidden states of every new token, [len(input_ids), hidden_size] (eager)."""
        meta = AttentionMetadata.build(inp.block_tables, inp.seq_lens, inp.query_lens, self.block_size,
                                       self.device)
        meta.max_seq_len = max(meta.max_seq_len, self.attention_bound())
        ids = to_device(inp.input_ids, torch.int64, self.device)
        if inp.prev_rows is not None:
            ids = self.resolve_ids(ids, to_device(self.id_sources(inp.prev_rows, len(inp.input_ids)), torch.int64,
                                                  self.device))
        pos = to_device(inp.positions(), torch.int64, self.device)
        return self.model(ids, pos, (self.cache.k, self.cache.v), meta)

    def uses_graph(self, inp: StepInput) -> bool:
        """Whether step(inp) replays a captured decode graph (else it runs eagerly)."""
        return self.cuda_graphs and inp.is_decode and inp.num_seqs <= GRAPH_BUCKETS[-1]

    def mixed_graph_shape(self, inp: StepInput) -> tuple[int, int] | None:
        """(T, S): the mixed graph that step(inp) replays, or None (a decode step, or it runs eagerly). Needs
        graphs on, DECODING_MIXED_GRAPHS not 0, the Triton attention kernels, and a step of at most
        mixed_max_tokens tokens and max(GRAPH_BUCKETS) sequences."""
        if (not self.cuda_graphs or inp.is_decode or not mixed_graphs_enabled()
                or ops.select("paged_mixed_attention", self.device) != "triton"
                or os.environ.get("DECODING_PREFILL_ATTENTION", "triton") != "triton"):
            return None
        t = token_bucket(len(inp.input_ids), self.mixed_max_tokens, inp.token_budget)
        s = next((b for b in GRAPH_BUCKETS if b >= inp.num_seqs), None)
        return None if t is None or s is None else (t, s)

    def _decode_graphs(self) -> _DecodeGraphs:
        if self._graphs is None or self._graphs.cache is not self.cache:
            self._graphs = _DecodeGraphs(self)
        return self._graphs

    def _mixed_graphs(self) -> _MixedGraphs:
        if (self._mixed is None or self._mixed.cache is not self.cache
                or self._mixed.max_tokens != self.mixed_max_tokens):
            # Its own memory pool: replacing these graphs (another max_tokens) frees theirs. Capturing into a
            # pool shared with graphs that were all destroyed tripped an allocator assert on an H100
            # (use_count > 0, CUDACachingAllocator.cpp) when no decode graph held that pool.
            self._mixed = _MixedGraphs(self, torch.cuda.graph_pool_handle())
        return self._mixed

    @torch.inference_mode()
    def capture_mixed_graphs(self, max_tokens: int, max_seqs: int) -> int:
        """Capture now every mixed graph that a step of at most max_tokens tokens (the token budget, made a
        bucket of its own: token_buckets) and max_seqs sequences can replay (else each is captured by the
        first step of its shape, a slow step); returns how many were new.
        Captures read and write nothing of the KV cache (all padding)."""
        if self.mixed_graph_shape(StepInput([[0]], [2], [0, 0], [2])) is None:
            return 0
        mixed = self._mixed_graphs()
        top_t = token_bucket(max_tokens, self.mixed_max_tokens, max_tokens) or self.mixed_max_tokens
        top_s = next((b for b in GRAPH_BUCKETS if b >= max_seqs), GRAPH_BUCKETS[-1])
        shapes = [(t, s) for t in token_buckets(top_t, max_tokens) for s in GRAPH_BUCKETS if s <= min(t, top_s)]
        new = [shape for shape in shapes if shape not in mixed.graphs]
        for t, s in new:
            mixed.graphs[(t, s)] = mixed._capture(t, s)
        return len(new)

    @torch.inference_mode()
    def step(self, inp: StepInput) -> torch.Tensor:
        """One model step; returns the logits of each sequence's last new token, [num_seqs, vocab] fp32.

        On CUDA a decode step replays the captured graph of its batch-size bucket, and another step the
        mixed graph of its (token, sequence) buckets (mixed_graph_shape); the logits they return are the
        graph's static output, valid until the next step.
        """
        if self.uses_graph(inp):
            return self._decode_graphs().run(inp)
        shape = self.mixed_graph_shape(inp)
        if shape is not None:
            return self._mixed_graphs().run(inp, shape)
        hidden = self.forward_hidden(inp)
        if not inp.is_decode:
            last = to_device(inp.query_lens, torch.int64, self.device).cumsum(0).sub(1)
            hidden = hidden[last]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def logits_at(self, inp: StepInput, rows: list[int]) -> torch.Tensor:
        """The step's fp32 logits at the given new-token indices (into input_ids), [len(rows), vocab]."""
        hidden = self.forward_hidden(inp)
        return self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)])
