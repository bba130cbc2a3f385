"""Continuous batching: which sequences run in the next step, and with how many new tokens.

Host-side policy only (the engine runs the steps). Every step:
1. each decoding sequence gets its next token (oldest first; it costs 1 + context_cost x its context of
   the token budget); when the pool has no block for one, the newest running sequences are preempted
   (blocks freed, requeued first in line to be recomputed);
2. sequences still prefilling get their next chunk of prompt, as far as the token budget goes;
3. waiting sequences are admitted, oldest first, while the token budget, `max_num_seqs` and the free
   blocks (less a small watermark) last. An admitted sequence first takes the cached blocks of the
   longest prefix it shares with earlier requests (prefix caching), then prefills the rest in chunks.
A request with several candidates (n > 1, temperatures) is admitted as one sequence; when its prompt is
in the cache, the other candidates fork it: full blocks shared by refcount, the last partial block copied.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from decoding.cache import BlockPool, blocks_for
from decoding.errors import InvalidRequest
from decoding.sequence import Sequence


@dataclass(slots=True)
class SchedulerConfig:
    """How the engine batches requests and sizes its KV cache (all optional keywords of Generator)."""

    max_num_seqs: int | None = None
    """Most sequences in the running batch (decoding or prefilling, candidates counted one by one), >= 1;
    None: 256, or max_num_batched_tokens if that is smaller."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: one per decoding sequence plus the prefill chunks (>= max_num_seqs).
    Smaller keeps inter-token latency low while prompts are prefilled; larger prefills faster."""
    num_kv_blocks: int | None = None
    """KV cache size in blocks; None sizes it from free GPU memory (CUDA) or a 1 GiB budget (CPU)."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's total memory the process may use: weights, activations, sampler and KV cache,
    in (0, 1]. The KV cache gets what the rest leaves, once, when the first request arrives."""
    enable_prefix_caching: bool = True
    """Keep full prompt blocks after their request ends and reuse them for requests with the same prefix."""
    watermark: float = 0.01
    """Share of the pool left free when admitting a new sequence, in [0, 1): room to grow before preempting."""
    context_cost: float = 0.0
    """What one token of context read by a decoding sequence's attention costs in max_num_batched_tokens, in
    units of one new token: a decode row costs 1 + context_cost x its context length (prefill chunks cost
    their tokens). 0 (default): every row costs 1. A new token costs about 2 x params FLOPs in the matmuls, a
    decode row also reads its context's K/V (kv_bytes_per_token each), so the cost of a context token is
    kv_bytes_per_token x FLOP/s / (2 x params x bytes/s): Llama-3-8B (128 KiB a token) on an H100 (~600
    TFLOP/s reached, ~2.9 TB/s), about 1/590 = 0.0017. With it, long-context decodes leave less of the
    budget to prefill chunks and admissions, so a step's time, and the inter-token latency, stay bounded
    as contexts grow; running decodes are always scheduled, whatever their cost."""
    static_batch_size: int | None = None
    """Baseline for benchmarks only: admit up to this many sequences when none runs, then none until all of
    them finish (static batching). None (default) is continuous batching."""

    def __post_init__(self) -> None:
        if self.max_num_seqs is None:
            self.max_num_seqs = min(256, self.max_num_batched_tokens) if isinstance(
                self.max_num_batched_tokens, int) else 256
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be an int >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidRequest(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                                 f"({self.max_num_seqs}): every running sequence decodes one token a step")
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise InvalidRequest(f"num_kv_blocks must be an int >= 1 or None, got {self.num_kv_blocks!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidRequest(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if isinstance(self.context_cost, bool) or not isinstance(self.context_cost, (int, float)) \
                or not 0 <= self.context_cost < math.inf:
            raise InvalidRequest(f"context_cost must be a number >= 0, got {self.context_cost!r}")
        if not 0 <= self.watermark < 1:
            raise InvalidRequest(f"watermark must be in [0, 1), got {self.watermark!r}")
        if self.static_batch_size is not None and self.static_batch_size < 1:
            raise InvalidRequest(f"static_batch_size must be >= 1 or None, got {self.static_batch_size!r}")


@dataclass
class ScheduledSeq:
    """One sequence in a step: its tokens num_computed .. num_computed + num_tokens - 1 are computed."""

    seq: Sequence
    num_tokens: int
    forks: list[tuple[Sequence, int | None]] = field(default_factory=list)
    """Candidates that fork this sequence after the step, each with the block its partial last prompt
    block is copied to (None when the prompt fills whole blocks)."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences that lost their blocks this step (their sampler rows must go)."""


class Scheduler:
    """Waiting and running sequences over one BlockPool."""

    def __init__(self, config: SchedulerConfig, pool: BlockPool, block_size: int) -> None:
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last ones are the newest
        self._order = 0  # admission counter (seq.order)
        self._step = 0  # schedule() calls (seq.scheduled_step)
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.prefill_tokens = 0  # tokens computed for prompts and recomputation, prefix-cache hits excluded
        self.watermark_blocks = math.ceil(config.watermark * pool.num_blocks)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def blocks_needed(self, num_prompt: int, budget: int, num_candidates: int) -> int:
        """Blocks a request needs when it runs alone: one candidate at its longest, or the prompt plus the
        candidates' copies of its partial last block at the fork."""
        copies = (num_candidates - 1) if num_prompt % self.block_size else 0
        return max(blocks_for(num_prompt + budget, self.block_size), blocks_for(num_prompt, self.block_size) + copies)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._step += 1
        budget = self.config.max_num_batched_tokens
        bs = self.block_size
        for seq in [s for s in self.running if s.decoding]:  # 1. decodes, oldest first
            if not seq.running:  # preempted for an older one this step
                continue
            if seq.num_computed >= seq.num_tokens or len(seq.output_ids) + seq.pending >= seq.budget:
                continue  # its last token is drawn, not yet read: it finishes when the engine reads it
            if seq.num_computed >= len(seq.blocks) * bs:  # its next token starts a new block
                while self.pool.num_free == 0:
                    victim = self._newest_unscheduled()
                    self.preempt(victim, out)
                    if victim is seq:
                        break
                if not seq.running:
                    continue
            self._schedule(seq, 1, out)
            budget -= 1 + self.config.context_cost * seq.num_computed
        budget = math.floor(budget)  # the tokens left for prefill chunks (context_cost makes it fractional)
        starved = False
        for seq in [s for s in self.running if not s.decoding]:  # 2. prefills under way, oldest first
            if budget <= 0:
                break
            if not seq.running:
                continue
            n = self._fit(seq, budget)
            while n == 0:
                victim = self._newest_unscheduled()
                if victim is seq or victim.order < seq.order:
                    break
                self.preempt(victim, out)
                n = self._fit(seq, budget)
            if n == 0:
                starved = True
                continue
            self._schedule(seq, n, out)
            budget -= n
        if not (starved or out.preempted):  # 3. admissions
            self._admit(budget, out)
        return out

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        static = self.config.static_batch_size
        if not self.waiting or (static is not None and self.running):
            return
        admitted = 0
        # Candidates yet to fork count too, and those forking after this step (they join at step_done).
        seats = (len(self.running) + sum(len(s.forks) for s in self.running)
                 + sum(len(it.forks) for it in out.scheduled))
        while self.waiting:
            seq = self.waiting[0]
            size = 1 + len(seq.forks)
            if seats + size > self.config.max_num_seqs or (static is not None and admitted and admitted + size > static):
                return
            if budget <= 0 and static is None:
                return
            matched = self._match(seq)
            for block in matched:
                self.pool.take(block)
            seq.blocks, seq.num_computed = matched, len(matched) * self.block_size
            reserve = self.watermark_blocks if self.running else 0
            n = self._fit(seq, budget, reserve) if budget > 0 else 0
            if n == 0 and not (static is not None and budget <= 0):
                self.pool.free(seq.blocks)
                seq.blocks, seq.num_computed, seq.chain = [], 0, []
                return
            self.waiting.popleft()
            seq.running = True
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_computed
            seq.order, self._order = self._order, self._order + 1
            self.running.append(seq)
            admitted += size
            seats += size
            if n:
                self._schedule(seq, n, out)
                budget -= n

    def _match(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens (at least its last token is left to
        compute, since the step must produce its logits); sets seq.chain to their entry ids."""
        seq.chain = []
        if not self.config.enable_prefix_caching:
            return []
        blocks, parent, bs = [], 0, self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            hit = self.pool.lookup(parent, tuple(seq.token_slice(i * bs, (i + 1) * bs)))
            if hit is None:
                break
            blocks.append(hit[0])
            parent = hit[1]
            seq.chain.append(parent)
        return blocks

    def _new_blocks(self, seq: Sequence, n: int) -> int:
        """Blocks seq must get to compute n more tokens, with its forks' copies if that ends its prompt."""
        total = seq.num_computed + n
        need = blocks_for(total, self.block_size) - len(seq.blocks)
        if seq.forks and total == seq.num_tokens and total % self.block_size:
            need += len(seq.forks)
        return max(0, need)

    def _fit(self, seq: Sequence, budget: int, reserve: int = 0) -> int:
        """The most of seq's remaining tokens (up to budget) whose blocks are free, keeping `reserve` free."""
        free = self.pool.num_free - reserve
        n = min(seq.num_tokens - seq.num_computed, budget)
        if self._new_blocks(seq, n) <= free:
            return n
        room = (len(seq.blocks) + free) * self.block_size - seq.num_computed  # tokens that fit without forks
        n = min(n, room, seq.num_tokens - seq.num_computed - 1 if seq.forks else n)
        return max(0, n)

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        grow = blocks_for(seq.num_computed + n, self.block_size) - len(seq.blocks)
        if grow > 0:
            seq.blocks = seq.blocks + self.pool.allocate(grow)
        item = ScheduledSeq(seq, n)
        if seq.forks and seq.num_computed + n == seq.num_tokens:
            full = seq.num_tokens // self.block_size
            partial = seq.num_tokens % self.block_size != 0
            for fork in seq.forks:
                self.pool.share(seq.blocks[:full])
                copy = self.pool.allocate(1)[0] if partial else None
                fork.blocks = seq.blocks[:full] + ([copy] if partial else [])
                item.forks.append((fork, copy))
            seq.forks = []
        out.scheduled.append(item)
        seq.scheduled_step = self._step

    def _newest_unscheduled(self) -> Sequence:
        for seq in reversed(self.running):
            if seq.scheduled_step != self._step:
                return seq
        raise AssertionError("no sequence left to preempt")  # the current one is always unscheduled

    def preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free seq's blocks and put it first in line: it is recomputed (prompt + output so far) later."""
        self.running.remove(seq)
        seq.running = False
        self.pool.free(seq.blocks)
        seq.blocks, seq.chain, seq.num_computed = [], [], 0
        seq.pending = 0  # a token drawn but not read is dropped: the recompute draws it again
        if seq.decoding:
            out.preempted.append(seq)
            seq.decoding = False
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ after the step
    def step_done(self, out: SchedulerOutput) -> list[Sequence]:
        """Account for the computed tokens; returns the sequences that now join decoding (their prompt, or
        their recomputed tokens, are all in the cache), forks included, each after the one it forks."""
        joined = []
        for item in out.scheduled:
            seq = item.seq
            if not seq.decoding:
                self.prefill_tokens += item.num_tokens
            seq.num_computed += item.num_tokens
            if min(seq.num_computed, seq.num_known) // self.block_size > len(seq.chain):
                self._register(seq)
            if not seq.decoding and seq.num_computed == seq.num_tokens:
                seq.decoding = True
                joined.append(seq)
                for fork, _ in item.forks:
                    fork.num_computed, fork.chain, fork.decoding = seq.num_computed, list(seq.chain), True
                    fork.order, self._order = self._order, self._order + 1
                    fork.running = True
                    self.running.append(fork)
                    joined.append(fork)
        return joined

    def _register(self, seq: Sequence) -> None:
        """Put seq's newly full blocks in the prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.chain), min(seq.num_computed, seq.num_known) // bs):  # blocks of known tokens
            parent = seq.chain[-1] if seq.chain else 0
            seq.chain.append(self.pool.register(seq.blocks[i], parent, tuple(seq.token_slice(i * bs, (i + 1) * bs))))

    def finish(self, seqs: list[Sequence]) -> None:
        """Retire finished (or cancelled, or failed) sequences: their blocks go back to the pool at once."""
        gone = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in gone]
        if any(id(s) in gone for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        for seq in seqs:
            self.pool.free(seq.blocks)
            seq.blocks, seq.decoding, seq.running, seq.pending = [], False, False, 0
            for fork in seq.forks:  # candidates that never forked hold nothing
                fork.blocks = []
            seq.forks = []
