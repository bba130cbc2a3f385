"""SamplingParams: what one request asks of generation (names follow vLLM / OpenAI)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from decoding.errors import InvalidRequest

RANK_BY = ("mean_logprob", "sum_logprob")
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class _Fields:
    max_tokens: int = 128
    """Most tokens to generate (>= 1); generation also stops at the model's context window."""
    temperature: float = 1.0
    """Logits are divided by this (>= 0); 0 selects greedy decoding (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens (>= 0); 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least this, in (0, 1]; 1 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one, in [0, 1]; 0 disables."""
    frequency_penalty: float = 0.0
    """OpenAI: subtracted from a token's logit once per time it was generated so far, in [-2, 2]; 0 disables."""
    presence_penalty: float = 0.0
    """OpenAI: subtracted from a token's logit if it was generated at least once so far, in [-2, 2]; 0 disables."""
    repetition_penalty: float = 1.0
    """CTRL/HF: a token seen in the prompt or the output has its logit divided by this if positive,
    multiplied if negative (once per token id), in (0, 2]; 1 disables."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else shares the batch; None draws fresh."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end the completion; the stop string itself is not included in the text."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Token ids that end the completion (besides the model's end-of-sequence ids)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token (up to max_tokens)."""
    logprobs: int | None = None
    """Return, per generated token, its log-prob and the top-`logprobs` (0..20) alternatives, all from the
    model's unmodified distribution (before penalties and temperature); None returns none."""
    n: int = 1
    """Candidates per temperature (>= 1); more than one candidate returns them all, ranked (see rank_by)."""
    temperatures: tuple[float, ...] | None = None
    """Multi-temperature sampling: n candidates at each of these temperatures, one shared prefill; overrides
    `temperature`. None disables."""
    rank_by: str = "mean_logprob"
    """How candidates are ranked when there are several: "mean_logprob" or "sum_logprob" of the chosen
    tokens under the model's unmodified distribution. Ignored when `judge` is given."""
    judge: Any = None
    """Ranks candidates instead of rank_by: a callable (prompt, [candidate texts]) -> [scores], or a
    decoding.Generator that scores each candidate by its mean token log-prob given the prompt."""
    cycle_min_repeats: int = 3
    """Cut a completion once its tail is one block of tokens repeated this many times (finish_reason
    "cycle", the text keeps the first copy); 0 disables cycle detection."""
    cycle_max_period: int = 64
    """Longest repeated block, in tokens, that cycle detection looks for (>= 1)."""
    cycle_min_span_tokens: int = 64
    """Fewest tokens all copies of the block must cover together (>= 0), so short blocks need more copies:
    ordinary code repeats short things (`)`, `    pass`) legitimately. 0 disables this guard."""


class SamplingParams(_Fields):
    """Per-request sampling parameters; every field is keyword-only and checked on construction.

    Example
    -------
    >>> SamplingParams(max_tokens=64, temperature=0.2, top_p=0.95, stop=["\\n\\n"], seed=7)
    """

    __slots__ = ()

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            raise InvalidRequest(f"unknown SamplingParams field(s) {unknown}; valid fields: {sorted(_FIELD_NAMES)}")
        super().__init__(**kwargs)
        _normalise(self)
        _validate(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a JSON-like dict (e.g. a service request body); unknown keys raise InvalidRequest."""
        if not isinstance(values, dict):
            raise InvalidRequest(f"sampling params must be a dict, got {type(values).__name__}")
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_candidates(self) -> int:
        return self.n * (len(self.temperatures) if self.temperatures else 1)

    def candidate_temperatures(self) -> list[float]:
        """The temperature of each candidate, in candidate order (temperature-major)."""
        temps = self.temperatures if self.temperatures else (self.temperature,)
        return [t for t in temps for _ in range(self.n)]

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


_FIELD_NAMES = {f.name for f in dataclasses.fields(_Fields)}


def _normalise(p: _Fields) -> None:
    # Accept lists and a bare string for the tuple fields.
    stop = (p.stop,) if isinstance(p.stop, str) else p.stop
    _set(p, "stop", tuple(stop) if isinstance(stop, (list, tuple)) else stop)
    if isinstance(p.stop_token_ids, (list, tuple)):
        _set(p, "stop_token_ids", tuple(p.stop_token_ids))
    if isinstance(p.temperatures, (list, tuple)):
        _set(p, "temperatures", tuple(p.temperatures))


def _set(p: _Fields, name: str, value: Any) -> None:
    object.__setattr__(p, name, value)


def _validate(p: _Fields) -> None:
    _check_int("max_tokens", p.max_tokens, 1)
    _check_float("temperature", p.temperature, 0.0, math.inf, ">= 0")
    _check_int("top_k", p.top_k, 0)
    _check_float("top_p", p.top_p, 0.0, 1.0, "in (0, 1]", low_open=True)
    _check_float("min_p", p.min_p, 0.0, 1.0, "in [0, 1]")
    _check_float("frequency_penalty", p.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
    _check_float("presence_penalty", p.presence_penalty, -2.0, 2.0, "in [-2, 2]")
    _check_float("repetition_penalty", p.repetition_penalty, 0.0, 2.0, "in (0, 2]", low_open=True)
    if p.seed is not None:
        _check_int("seed", p.seed, 0)
    if not isinstance(p.stop, tuple):
        raise InvalidRequest(f"stop must be a str or a list of str, got {p.stop!r}")
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequest(f"stop: every stop string must be a non-empty str, got {s!r}")
    if not isinstance(p.stop_token_ids, tuple):
        raise InvalidRequest(f"stop_token_ids must be a list of int, got {p.stop_token_ids!r}")
    for t in p.stop_token_ids:
        _check_int("stop_token_ids", t, 0)
    if not isinstance(p.ignore_eos, bool):
        raise InvalidRequest(f"ignore_eos must be a bool, got {p.ignore_eos!r}")
    if p.logprobs is not None:
        _check_int("logprobs", p.logprobs, 0, MAX_LOGPROBS)
    _check_int("n", p.n, 1)
    if p.temperatures is not None:
        if not isinstance(p.temperatures, tuple) or not p.temperatures:
            raise InvalidRequest(f"temperatures must be a non-empty list of numbers >= 0, got {p.temperatures!r}")
        for t in p.temperatures:
            _check_float("temperatures", t, 0.0, math.inf, ">= 0 (each)")
    if p.rank_by not in RANK_BY:
        raise InvalidRequest(f"rank_by must be one of {RANK_BY}, got {p.rank_by!r}")
    if p.judge is not None and not callable(p.judge) and not hasattr(p.judge, "score"):
        raise InvalidRequest(f"judge must be a callable (prompt, candidates) -> scores or a Generator, got {p.judge!r}")
    _check_int("cycle_min_repeats", p.cycle_min_repeats, 0)
    if p.cycle_min_repeats == 1:
        raise InvalidRequest("cycle_min_repeats must be 0 (off) or >= 2, got 1")
    _check_int("cycle_max_period", p.cycle_max_period, 1)
    _check_int("cycle_min_span_tokens", p.cycle_min_span_tokens, 0)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(f"{name} must be an int {allowed}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequest(f"{name} must be a number {allowed}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise InvalidRequest(f"{name} must be {allowed}, got {value!r}")
