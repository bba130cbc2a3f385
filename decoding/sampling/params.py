"""SamplingParams: what one request asks of generation (names follow vLLM / OpenAI)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from decoding.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class SamplingParams:
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
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else shares the batch; None draws fresh."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end the completion; the stop string itself is not included in the text."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Token ids that end the completion (besides the model's end-of-sequence ids)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token (up to max_tokens)."""

    def __post_init__(self) -> None:
        # Accept lists and a bare string for the tuple fields, then check every value.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, 1)
        _check_float("temperature", self.temperature, 0.0, math.inf, ">= 0")
        _check_int("top_k", self.top_k, 0)
        _check_float("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest(f"stop: every stop string must be a non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequest(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float, allowed: str, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequest(f"{name} must be a number {allowed}, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise InvalidRequest(f"{name} must be {allowed}, got {value!r}")
