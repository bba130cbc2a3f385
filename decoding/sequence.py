"""One completion's state during generation, and what a finished request returns."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from decoding.sampling.cycles import CycleConfig, CycleDetector
from decoding.sampling.params import SamplingParams
from decoding.tokenizer import Detokenizer, Tokenizer


@dataclass
class TokenLogprob:
    """One generated token's log-prob and the most likely alternatives (unmodified distribution)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Candidate:
    """One of several completions of a request (n > 1 or multi-temperature sampling)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    temperature: float
    score: float
    """The ranking score (higher is better): mean or sum token log-prob, or the judge's score."""
    mean_logprob: float
    sum_logprob: float


@dataclass
class Output:
    """One finished request."""

    text: str
    """The completion (special tokens and any stop string left out; cut after the first copy of a cycle)."""
    token_ids: list[int]
    """Generated token ids, including the end-of-sequence or stop token if one ended it."""
    finish_reason: str
    """"stop" (end-of-sequence, a stop token or stop string), "length" (max_tokens or the context window),
    "cycle" (the completion started looping and was cut), "cancelled" (the caller cancelled the request)
    or "error" (see `error`)."""
    prompt_token_ids: list[int] = field(repr=False)
    time_to_first_token: float = 0.0
    """Seconds from submission to the first generated token (includes queueing and the prefill)."""
    tokens_per_second: float = 0.0
    """Decode rate after the first token: (tokens - 1) / seconds between first and last; 0 for one token."""
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when SamplingParams.logprobs is set."""
    candidates: list[Candidate] | None = None
    """Every candidate, best first, when the request asked for several (n > 1 or temperatures)."""
    error: str | None = None
    """Why generation failed for this request (finish_reason "error"), e.g. NaN logits from the model."""


class Sequence:
    """A completion being generated: tokens, text, stop checks, cycle detection, timing, and the
    scheduler's view of it (KV blocks, how many of its tokens are in the cache)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, temperature: float, budget: int,
                 tokenizer: Tokenizer, seed: int | None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.temperature = temperature
        # Unseeded rows draw their seed now, so a sequence preempted and recomputed keeps its random stream.
        self.seed = seed if seed is not None else random.getrandbits(62)
        self.budget = budget  # tokens it may generate (max_tokens, clipped to the context window)
        self.output_ids: list[int] = []
        # Tokens drawn on the device whose values the host has not read yet (the engine launches the next
        # step before it reads this one's tokens): they count in num_tokens, token_slice gives -1 for them.
        self.pending = 0
        self.blocks: list[int] = []  # KV blocks, enough for num_computed tokens (and this step's)
        self.num_computed = 0  # leading tokens of prompt + output whose KV is in the cache
        self.chain: list[int] = []  # prefix-cache entry ids of its leading full blocks
        self.decoding = False  # has a sampler row: its prompt (and any recomputed output) is in the cache
        self.running = False  # in the scheduler's running batch
        self.order = 0  # admission order (newest runs last, is preempted first)
        self.scheduled_step = -1  # the last scheduler step that gave it tokens
        self.forks: list[Sequence] = []  # candidates that take a copy of this one's KV once its prompt is in
        self.token_times: list[float] = []  # perf_counter() at each generated token
        self.request = None  # the engine's Request this candidate belongs to
        self.detok = Detokenizer(tokenizer, prompt_ids)
        self.text = ""
        self.text_ends: list[int] = []  # len(text) after each token: where a cycle cut lands in the text
        self.emitted = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.chosen_logprobs: list[float] = []  # per token, for ranking candidates
        self.t_first = self.t_last = 0.0
        self.cycles = None
        if params.cycle_min_repeats:
            config = CycleConfig(min_repeats=params.cycle_min_repeats, max_period=params.cycle_max_period,
                                 min_span_tokens=params.cycle_min_span_tokens)
            self.cycles = CycleDetector(config, tokenizer.line_break_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_known(self) -> int:
        """Prompt and output tokens whose values the host has."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of prompt + output, -1 for the pending ones."""
        n = len(self.prompt_ids)
        known = n + len(self.output_ids)
        tail = [-1] * (stop - max(start, known)) if stop > known else []
        stop = min(stop, known)
        if stop <= n:
            head = self.prompt_ids[start:stop]
        elif start >= n:
            head = self.output_ids[start - n:stop - n]
        else:
            head = self.prompt_ids[start:] + self.output_ids[:stop - n]
        return head + tail

    def fail(self, message: str) -> None:
        self.finish_reason, self.error = "error", message

    def append(self, token: int, eos_ids: list[int], logprob: float | None = None,
               top: list[tuple[int, float]] | None = None) -> None:
        """Add one generated token and decide whether the sequence is finished."""
        now = time.perf_counter()
        if not self.output_ids:
            self.t_first = now
        self.t_last = now
        self.token_times.append(now)
        self.output_ids.append(token)
        if logprob is not None:
            self.chosen_logprobs.append(logprob)
            if self.params.logprobs is not None:
                self.logprobs.append(TokenLogprob(token, logprob, top or []))
        p = self.params
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.text_ends.append(len(self.text))
            self.finish_reason = "stop"
            return
        search_from = max(0, len(self.text) - max((len(s) for s in p.stop), default=0))
        self.text += self.detok.add(token)
        self.text_ends.append(len(self.text))
        for s in p.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return
        keep = self.cycles.push(token) if self.cycles is not None else None
        if keep is not None:
            self._cut(keep)
        elif len(self.output_ids) >= self.budget:
            self.finish_reason = "length"

    def _cut(self, keep: int) -> None:
        del self.output_ids[keep:]
        del self.logprobs[keep:]
        del self.chosen_logprobs[keep:]
        self.text = self.text[: self.text_ends[keep - 1]] if keep else ""
        self.finish_reason = "cycle"

    def take_delta(self) -> str:
        """Text not yet streamed that can no longer change: a tail that could still become a stop string,
        or tokens a cycle cut could still remove, are held back until the sequence finishes."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((len(s) - 1 for s in self.params.stop), default=0)
            if self.cycles is not None:
                safe = self.cycles.safe_length()
                end = min(end, self.text_ends[safe - 1] if safe else 0)
        end = max(self.emitted, end)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    @property
    def sum_logprob(self) -> float:
        return sum(self.chosen_logprobs)

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.chosen_logprobs) if self.chosen_logprobs else -float("inf")

    def timing(self) -> tuple[float, float]:
        n = len(self.output_ids)
        rate = (n - 1) / (self.t_last - self.t_first) if n > 1 and self.t_last > self.t_first else 0.0
        return self.t_first, rate
