"""Batched sampler with per-row parameters, one pass for the whole batch, no host sync inside.

Order per row (shared/DESIGN.md): repetition penalty -> frequency/presence penalties -> temperature
-> top-k -> top-p -> min-p -> draw. The draw is Gumbel-max: argmax(x + g) with g = -log(-log u), which
samples softmax(x) exactly. u comes from a counter-based hash of (row seed, row step, token id), so a
row's tokens depend only on its own seed and history, never on what else shares the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from decoding import ops
from decoding.sampling.params import SamplingParams

_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (hash-prospector's 16-21f0aaad-15-735a2d97-15) on int64 values in [0, 2^32).

    Both multipliers are below 2^31, so products stay below 2^63: exact int64 arithmetic on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] int64 keys from per-row seeds (< 2^63) and steps (generated-token counts)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return hash32((hash32(lo ^ hash32(hi)) + steps) & _MASK32)


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] fp32 Gumbel(0, 1) noise: g = -log(-log u), u in (0, 1) from 24 hashed bits per element."""
    ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = hash32(keys[:, None] ^ ids[None, :]) >> 8
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B] int64; -1 where the row's logits were NaN / +inf / all -inf
    logprobs: torch.Tensor | None  # [B] fp32, chosen token's log-prob under the unmodified distribution
    top_ids: torch.Tensor | None  # [B, k] int64, the k most likely tokens (unmodified distribution)
    top_logprobs: torch.Tensor | None  # [B, k] fp32


class SamplingState:
    """Per-row parameters as device tensors plus the token history the penalties need.

    Host-side flags (which filters any row uses) are fixed when the batch is built, so a step never
    has to look at device values to decide what to run.
    """

    def __init__(self, params: list[SamplingParams], temperatures: list[float], seeds: list[int | None],
                 prompts: list[list[int]], vocab_size: int, device: torch.device | str,
                 need_logprobs: bool = False) -> None:
        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        self.vocab_size = vocab_size
        self.device = torch.device(device)
        greedy = [temp == 0.0 for temp in temperatures]
        self.temperature = t(temperatures, torch.float32)
        self.top_k = t([p.top_k for p in params], torch.int64)
        self.top_p = t([p.top_p for p in params], torch.float32)
        self.min_p = t([p.min_p for p in params], torch.float32)
        self.frequency = t([p.frequency_penalty for p in params], torch.float32)
        self.presence = t([p.presence_penalty for p in params], torch.float32)
        self.repetition = t([p.repetition_penalty for p in params], torch.float32)
        # Rows without a seed get a fresh random one: every row then takes the same code path.
        self.seeds = t([s if s is not None else random.getrandbits(62) for s in seeds], torch.int64)
        self.steps = torch.zeros(len(params), dtype=torch.int64, device=self.device)
        self.fused_graph = None  # set by a fused GPU sampler that replays its launches from a CUDA graph
        self.all_greedy = all(greedy)
        self.use_filter = [(p.top_k > 0 or p.top_p < 1.0) and not g for p, g in zip(params, greedy)]
        self.filter_rows = self._filter_rows()
        self.use_min_p = any(p.min_p > 0 and not g for p, g in zip(params, greedy))
        # Which filter passes a fused kernel must run at all (rows leaving the batch never add one).
        self.any_top_k = any(0 < p.top_k < vocab_size and not g for p, g in zip(params, greedy))
        self.any_top_p = any(p.top_p < 1.0 and not g for p, g in zip(params, greedy))
        self.top_logprobs = max((p.logprobs or 0 for p in params), default=0)
        self.need_logprobs = need_logprobs or any(p.logprobs is not None for p in params)
        rows = len(params)
        # counts: how often each token was generated (frequency/presence); seen: in prompt or output (repetition).
        use_freq = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        self.counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=self.device) if use_freq else None
        self.seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=self.device)
            for r, ids in enumerate(prompts):
                self.seen[r, t(ids, torch.int64)] = True

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), e.g. when sequences finish."""
        idx = torch.tensor(rows, dtype=torch.int64, device=self.device)
        for name in ("temperature", "top_k", "top_p", "min_p", "frequency", "presence", "repetition", "seeds",
                     "steps", "counts", "seen"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, idx))
        self.use_filter = [self.use_filter[r] for r in rows]
        self.filter_rows = self._filter_rows()
        self.fused_graph = None  # captured over the old tensors: a fused sampler must capture again

    def _filter_rows(self) -> torch.Tensor | None:
        # Built when the batch changes, not every step: a tensor made from a host list is a blocking copy.
        rows = [r for r, use in enumerate(self.use_filter) if use]
        return torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True) if rows else None

    def record(self, tokens: torch.Tensor) -> None:
        """Account for the tokens just drawn (device ops only)."""
        valid = tokens.clamp(min=0)[:, None]
        if self.counts is not None:
            self.counts.scatter_add_(1, valid, torch.ones_like(valid, dtype=torch.int32))
        if self.seen is not None:
            self.seen.scatter_(1, valid, True)
        self.steps += 1


def apply_penalties(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Repetition (CTRL) then frequency/presence (OpenAI) penalties; rows with neutral values are unchanged."""
    x = logits
    if state.seen is not None:
        r = state.repetition[:, None]
        x = torch.where(state.seen, torch.where(x > 0, x / r, x * r), x)
    if state.counts is not None:
        counts = state.counts.float()
        x = x - counts * state.frequency[:, None] - (counts > 0).float() * state.presence[:, None]
    return x


def apply_filters(x: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """Tempered logits with tokens removed by top-k, top-p and min-p set to -inf."""
    temps = torch.where(state.temperature == 0, torch.ones_like(state.temperature), state.temperature)
    x = x / temps[:, None]
    idx = state.filter_rows
    if idx is not None:  # sort only the rows that need it: the sort is the costliest step of the sampler
        sub = x.index_select(0, idx)
        sorted_x, order = sub.sort(dim=-1, descending=True)
        k = state.top_k.index_select(0, idx)
        k = torch.where(k > 0, k, torch.full_like(k, x.shape[-1]))
        ranks = torch.arange(x.shape[-1], device=x.device)[None, :]
        drop = ranks >= k[:, None]
        probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
        # top-p keeps a token while the mass of the tokens strictly before it is below top_p.
        drop |= (probs.cumsum(-1) - probs) >= state.top_p.index_select(0, idx)[:, None]
        sub = sub.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
        x = x.index_copy(0, idx, sub)
    if state.use_min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < state.min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return x


def sample_tokens_ref(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """The reference sampler step: [B] int64 tokens (-1 for bad rows), recorded in `state`."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)
    x = apply_penalties(logits, state)
    tokens = x.argmax(dim=-1)
    if not state.all_greedy:
        noisy = apply_filters(x, state) + gumbel_noise(row_keys(state.seeds, state.steps), x.shape[-1])
        tokens = torch.where(state.temperature == 0, tokens, noisy.argmax(dim=-1))
    tokens = torch.where(bad, torch.full_like(tokens, -1), tokens)
    state.record(tokens)
    return tokens


def sample(logits: torch.Tensor, state: SamplingState) -> SampleResult:
    """Draw one token per row of logits [B, V] (fp32) and record it in `state`.

    The draw goes through decoding.ops (the fused Triton kernel on CUDA, else the reference above);
    log-probs, when asked for, come from the unmodified logits.
    """
    tokens = ops.sample_tokens(logits, state)
    chosen = top_ids = top_lp = None
    if state.need_logprobs:
        logprobs = logits.log_softmax(-1)
        chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])[:, 0]
        if state.top_logprobs:
            top_lp, top_ids = logprobs.topk(state.top_logprobs, dim=-1)
    return SampleResult(tokens, chosen, top_ids, top_lp)
