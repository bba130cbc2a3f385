"""Batched sampler with per-row parameters, one pass for the whole batch, no host sync inside.

Order per row (shared/DESIGN.md): repetition penalty -> frequency/presence penalties -> temperature
-> top-k -> top-p -> min-p -> draw. The draw is Gumbel-max: argmax(x + g) with g = -log(-log u), which
samples softmax(x) exactly. u comes from a counter-based hash of (row seed, row step, token id), so a
row's tokens depend only on its own seed and history, never on what else shares the batch.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch

from decoding import ops
from decoding.nosync import to_device
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


def bucket(n: int) -> int:
    """The batch-size bucket that holds n rows: the next power of two (1, 2, 4, ..., 64, 128, ...)."""
    return 1 << max(0, n - 1).bit_length()


# Rows of the packed per-row parameter buffers (one [rows, capacity] tensor per dtype, so that admitting
# rows is one host-to-device copy per dtype, and each parameter is a contiguous [capacity] row view).
_F32 = ("temperature", "top_p", "min_p", "frequency", "presence", "repetition")
_I64 = ("top_k", "seeds", "steps")
_NEUTRAL_F32 = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # an empty row: greedy, no filter, no penalty


class SamplingState:
    """Per-row sampling parameters and penalty state as device tensors, for a batch whose rows come and go.

    Rows live in preallocated buffers of `capacity` rows, kept compact (rows 0..num_rows-1): `add` writes
    new rows after the last one, `remove` moves the last rows into the holes. Every tensor attribute
    (`temperature`, `counts`, ...) is a view of the first `width` rows, where width is num_rows, or with
    `pad_to_bucket` the bucket of num_rows (1, 2, 4, 8, ...): rows past num_rows are inert (greedy, no
    penalty) and their tokens are ignored. The buffers, hence the views' addresses, only change when the
    capacity grows, so a fused sampler can capture one CUDA graph per (bucket, flags) and replay it
    whatever rows the batch holds (`fused_graphs`, cleared when the buffers move).

    The host-side flags say which passes a step must run at all. They only ever turn on (a pass that no
    row needs is a no-op for every row), so a batch whose composition changes does not get new graphs.

    Example
    -------
    >>> state = SamplingState([], [], [], [], vocab_size=50, device="cpu")
    >>> state.add(SamplingParams(temperature=0.7, seed=1), 0.7, 1, prompt_ids=[3, 4], owner="a")
    >>> state.remove([0])
    """

    def __init__(self, params: list[SamplingParams], temperatures: list[float], seeds: list[int | None],
                 prompts: list[list[int]], vocab_size: int, device: torch.device | str,
                 need_logprobs: bool = False, capacity: int = 0, pad_to_bucket: bool = False) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.pad_to_bucket = pad_to_bucket
        self.need_all_logprobs = need_logprobs
        self.capacity = 0
        self._neutral = torch.tensor(_NEUTRAL_F32, device=self.device)[:, None]  # [len(_F32), 1]: an empty row
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._f32 = torch.zeros(len(_F32), 0, device=self.device)
        self._i64 = torch.zeros(len(_I64), 0, dtype=torch.int64, device=self.device)
        self._counts: torch.Tensor | None = None  # [capacity, vocab] int32: times each token was generated
        self._seen: torch.Tensor | None = None  # [capacity, vocab] bool: in the prompt or the output
        self.owners: list = []  # per row: whatever the caller uses to find the row again
        self.use_filter: list[bool] = []  # per row: sorts for top-k/top-p (the reference sampler)
        self._logprobs: list[int | None] = []  # per row: top-logprobs asked for (0..20), -1 chosen only, None
        self.all_greedy = True
        self.any_top_k = self.any_top_p = self.use_min_p = False
        self.fused_graphs: dict = {}  # a fused GPU sampler's CUDA graphs, over the buffers above
        self._filter_rows: torch.Tensor | None | bool = False  # False: to rebuild
        self._grow(max(capacity, len(params)))
        for i, (p, temp, seed, prompt) in enumerate(zip(params, temperatures, seeds, prompts)):
            self.add(p, temp, seed, prompt, owner=i)

    # ------------------------------------------------------------------ rows
    @property
    def num_rows(self) -> int:
        return len(self.owners)

    @property
    def width(self) -> int:
        """Rows every step computes: num_rows, or its bucket with pad_to_bucket."""
        n = self.num_rows
        return bucket(n) if self.pad_to_bucket and n else n

    def add(self, params: SamplingParams, temperature: float, seed: int | None, prompt_ids: list[int],
            output_ids: list[int] = (), owner: object = None, need_logprobs: bool = False) -> None:
        """Append one row, as if it had already drawn `output_ids` (its step count and penalty counts
        follow them), so a sequence recomputed after preemption samples on exactly as before."""
        self.add_rows([(params, temperature, seed, prompt_ids, output_ids, owner, need_logprobs)])

    def add_rows(self, rows: list[tuple]) -> None:
        """Append several rows at once: tuples (params, temperature, seed, prompt_ids, output_ids, owner,
        need_logprobs), as for `add`. Costs a few device copies for the whole lot, not per row."""
        if not rows:
            return
        start = self.num_rows
        if start + len(rows) > self.capacity:
            self._grow(max(2 * self.capacity, bucket(start + len(rows))))
        f32, i64 = [], []
        for params, temp, seed, _, output_ids, owner, need_lp in rows:
            greedy = temp == 0.0
            seed = seed if seed is not None else random.getrandbits(62)
            f32.append((temp, params.top_p, params.min_p, params.frequency_penalty, params.presence_penalty,
                        params.repetition_penalty))
            i64.append((params.top_k, seed, len(output_ids)))
            self.owners.append(owner)
            self.use_filter.append((params.top_k > 0 or params.top_p < 1.0) and not greedy)
            self._logprobs.append(params.logprobs if params.logprobs is not None else (-1 if need_lp else None))
            self.all_greedy &= greedy
            self.any_top_k |= 0 < params.top_k < self.vocab_size and not greedy
            self.any_top_p |= params.top_p < 1.0 and not greedy
            self.use_min_p |= params.min_p > 0 and not greedy
            if self._counts is None and (params.frequency_penalty != 0 or params.presence_penalty != 0):
                self._counts = self._new_table(torch.int32)
            if self._seen is None and params.repetition_penalty != 1.0:
                self._seen = self._new_table(torch.bool)
        end = start + len(rows)
        self._f32[:, start:end] = to_device(f32, torch.float32, self.device).T
        self._i64[:, start:end] = to_device(i64, torch.int64, self.device).T
        if self._counts is not None or self._seen is not None:
            self._fill_tables(start, rows)
        self._filter_rows = False

    def _fill_tables(self, start: int, rows: list[tuple]) -> None:
        """Counts of each row's output tokens; seen = its prompt and output tokens."""
        end = start + len(rows)
        out_r = [start + i for i, r in enumerate(rows) for _ in r[4]]
        out_t = [t for r in rows for t in r[4]]
        if self._counts is not None:
            self._counts[start:end] = 0
            if out_t:
                r, t = self._index(out_r), self._index(out_t)
                self._counts.index_put_((r, t), torch.ones_like(t, dtype=torch.int32), accumulate=True)
        if self._seen is not None:
            self._seen[start:end] = False
            all_r = out_r + [start + i for i, r in enumerate(rows) for _ in r[3]]
            all_t = out_t + [t for r in rows for t in r[3]]
            if all_t:
                # a device True: a Python scalar as index_put_'s value is a blocking host-to-device copy
                self._seen.index_put_((self._index(all_r), self._index(all_t)), self._true)

    def remove(self, rows: list[int]) -> None:
        """Drop these rows; the last rows move into the holes (see `owners` for the new order)."""
        if not rows:
            return
        n = self.num_rows
        gone = set(rows)
        keep_n = n - len(gone)
        holes = sorted(r for r in gone if r < keep_n)
        movers = [r for r in range(keep_n, n) if r not in gone]
        if holes:
            dst, src = self._index(holes), self._index(movers)
            for buf in (self._f32, self._i64):
                buf[:, dst] = buf[:, src]
            for table in (self._counts, self._seen):
                if table is not None:
                    table[dst] = table[src]
            for h, m in zip(holes, movers):
                self.owners[h], self.use_filter[h], self._logprobs[h] = \
                    self.owners[m], self.use_filter[m], self._logprobs[m]
        del self.owners[keep_n:], self.use_filter[keep_n:], self._logprobs[keep_n:]
        # Rows past the end become inert again: padding rows are sampled (and ignored) by bucketed steps.
        self._f32[:, keep_n:n] = self._neutral  # (a constant made once: torch.tensor(..., device=) would sync)
        self._i64[0, keep_n:n] = 0
        self._filter_rows = False

    def clone(self) -> SamplingState:
        """A detached copy of the current rows (e.g. to run a step for warm-up without changing this one)."""
        other = copy.copy(self)
        w = self.width
        other._f32, other._i64 = self._f32[:, :w].clone(), self._i64[:, :w].clone()
        other._counts = self._counts[:w].clone() if self._counts is not None else None
        other._seen = self._seen[:w].clone() if self._seen is not None else None
        other.capacity = w
        other.owners, other.use_filter, other._logprobs = list(self.owners), list(self.use_filter), list(self._logprobs)
        other.fused_graphs = {}
        return other

    def __deepcopy__(self, memo: dict) -> SamplingState:
        return self.clone()

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        n = self.num_rows
        f32 = self._neutral.repeat(1, capacity)
        i64 = torch.zeros(len(_I64), capacity, dtype=torch.int64, device=self.device)
        f32[:, :n], i64[:, :n] = self._f32[:, :n], self._i64[:, :n]
        self._f32, self._i64 = f32, i64
        old = self.capacity
        self.capacity = capacity
        if self._counts is not None:
            self._counts = torch.cat([self._counts, self._new_table(torch.int32)[old:]])
        if self._seen is not None:
            self._seen = torch.cat([self._seen, self._new_table(torch.bool)[old:]])
        self.fused_graphs = {}  # captured over the old buffers

    def _new_table(self, dtype: torch.dtype) -> torch.Tensor:
        self.fused_graphs = {}  # a new table changes what a step reads and writes
        return torch.zeros(self.capacity, self.vocab_size, dtype=dtype, device=self.device)

    def _index(self, values: list[int]) -> torch.Tensor:
        return to_device(values, torch.int64, self.device)

    # ------------------------------------------------------------------ views the samplers read
    def _row(self, buf: torch.Tensor, names: tuple[str, ...], name: str) -> torch.Tensor:
        return buf[names.index(name), : self.width]

    temperature = property(lambda self: self._row(self._f32, _F32, "temperature"))
    top_p = property(lambda self: self._row(self._f32, _F32, "top_p"))
    min_p = property(lambda self: self._row(self._f32, _F32, "min_p"))
    frequency = property(lambda self: self._row(self._f32, _F32, "frequency"))
    presence = property(lambda self: self._row(self._f32, _F32, "presence"))
    repetition = property(lambda self: self._row(self._f32, _F32, "repetition"))
    top_k = property(lambda self: self._row(self._i64, _I64, "top_k"))
    seeds = property(lambda self: self._row(self._i64, _I64, "seeds"))
    steps = property(lambda self: self._row(self._i64, _I64, "steps"))
    counts = property(lambda self: self._counts[: self.width] if self._counts is not None else None)
    seen = property(lambda self: self._seen[: self.width] if self._seen is not None else None)

    @property
    def need_logprobs(self) -> bool:
        return self.need_all_logprobs or any(k is not None for k in self._logprobs)

    @property
    def top_logprobs(self) -> int:
        return max((k for k in self._logprobs if k is not None and k > 0), default=0)

    @property
    def filter_rows(self) -> torch.Tensor | None:
        """Rows that need the sort for top-k/top-p (the reference sampler); rebuilt when rows change."""
        if self._filter_rows is False:
            # Built when the batch changes, not every step: a tensor made from a host list is a blocking copy.
            rows = [r for r, use in enumerate(self.use_filter) if use]
            self._filter_rows = self._index(rows) if rows else None
        return self._filter_rows

    def record(self, tokens: torch.Tensor) -> None:
        """Account for the tokens just drawn (device ops only)."""
        valid = tokens.clamp(min=0)[:, None]
        if self._counts is not None:
            self.counts.scatter_add_(1, valid, torch.ones_like(valid, dtype=torch.int32))
        if self._seen is not None:
            self.seen.scatter_(1, valid, True)
        self.steps.add_(1)


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
