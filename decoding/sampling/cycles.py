"""N-gram cycle detection: stop a completion whose tail has become one block repeated (DESIGN, "Cycle truncation").

For each period L the detector keeps the length of the run of trailing tokens that equal the token L places
earlier. The tail is R copies of one L-token block exactly when that run is >= (R - 1) * L, so one pushed
token updates one counter per period: O(max_period) work, whatever the length of the sequence. Only the
periods whose counter can grow are touched: the places where the pushed token occurred within the last
max_period tokens (a per-token index of recent positions), plus the runs that this token ends.

Defaults come from benches/cycles_corpus.py (report: benches/CYCLES.md): they cut 0.07 % of 256-token windows
of the Python standard library (all of them data that really is one block repeated) and 99.7 % of synthetic
verbatim loops of one to five real lines, a median 65 tokens after the loop starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CycleConfig:
    min_repeats: int = 3
    """Copies of one block the tail must hold before the completion is cut (>= 2); 0 disables detection."""
    max_period: int = 64
    """Longest block, in tokens (>= 1); blocks longer than this are never detected."""
    min_span_tokens: int = 64
    """Fewest tokens the repeated tail must cover, all copies together (>= 0), so that short blocks need more
    copies than min_repeats: 64 single `)` tokens, or 22 copies of a 3-token `    pass` line. 0 disables."""

    def __post_init__(self) -> None:
        for name in ("min_repeats", "max_period", "min_span_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.min_repeats == 1:
            raise ValueError("min_repeats must be 0 (disabled) or >= 2, got 1")
        if self.max_period < 1:
            raise ValueError(f"max_period must be >= 1, got {self.max_period}")

    @property
    def enabled(self) -> bool:
        return self.min_repeats > 0

    def run_needed(self, period: int) -> int:
        """Trailing tokens equal to the token `period` places earlier needed to cut with this period."""
        return max((self.min_repeats - 1) * period, self.min_span_tokens - period, period)


class CycleDetector:
    """Watches one completion's generated tokens (not the prompt) for a tail that repeats one block.

    Parameters
    ----------
    config : CycleConfig
        Repeat count, longest period and guards.
    line_break_ids : collection of int, optional
        Ids of tokens whose text holds a newline (see `line_break_ids`). With them a cut keeps the first
        copy of the block up to the end of its line, so `foo(1)\\nbar(1)\\nbar(1)\\n...` keeps `bar(1)\\n`
        whole even though the periodic tail starts at `(1)\\n` of the `foo` line. Without them the cut
        keeps exactly the first copy of the block, counted from where the periodic tail starts.

    Example
    -------
    >>> det = CycleDetector(CycleConfig(min_repeats=3, max_period=4, min_span_tokens=0))
    >>> [det.push(t) for t in [7, 1, 2, 1, 2, 1, 2]]
    [None, None, None, None, None, None, 3]
    """

    def __init__(self, config: CycleConfig, line_break_ids: frozenset[int] | set[int] | tuple[int, ...] = ()) -> None:
        self.config = config
        self._breaks = frozenset(line_break_ids)
        self._tokens: list[int] = []
        self._runs: dict[int, int] = {}  # period -> trailing run length, only the nonzero ones
        self._recent: dict[int, deque[int]] = {}  # token -> its positions among the last max_period tokens
        self._need = [0] + [config.run_needed(period) for period in range(1, config.max_period + 1)]
        self._cut: int | None = None
        self.period: int | None = None  # the detected block's length in tokens, once push() returned a cut

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def cut(self) -> int | None:
        """Tokens to keep, once a cycle was detected; None before."""
        return self._cut

    def push(self, token: int) -> int | None:
        """Feed one generated token.

        Returns None, or, on the token that completes a cycle (and on any later push), the number of
        generated tokens to keep: everything before the loop plus its first copy of the block.
        """
        if self._cut is not None or not self.config.enabled:
            self._tokens.append(token)
            return self._cut
        n = len(self._tokens)
        window = self.config.max_period
        if n > window:  # the token at n - window - 1 leaves the window of candidate earlier positions
            old = self._tokens[n - window - 1]
            positions = self._recent[old]
            positions.popleft()
            if not positions:
                del self._recent[old]
        runs: dict[int, int] = {}
        positions = self._recent.get(token)
        if positions is None:
            self._recent[token] = deque((n,))
        else:
            for p in positions:
                period = n - p
                runs[period] = self._runs.get(period, 0) + 1
            positions.append(n)
        self._runs = runs
        self._tokens.append(token)
        best, best_period = 0, 0
        for period, run in runs.items():
            # The longest firing run gives the earliest cut; on a tie the shortest period is the block.
            if run >= self._need[period] and (run > best or (run == best and period < best_period)):
                best, best_period = run, period
        if best:
            self.period = best_period
            self._cut = self._align(n + 1 - best, best_period)
        return self._cut

    def safe_length(self) -> int:
        """How many pushed tokens no later cut can remove: a stream may emit text up to here.

        A cut with period L keeps at least the tokens before the run that L has when it fires. A run only
        grows by one token a push and restarts after the current end once broken, so no cut can fall before
        len - (longest current run). It lags the end only while some repetition is building up.
        """
        if self._cut is not None:
            return self._cut
        return len(self._tokens) - max(self._runs.values(), default=0)

    def _align(self, cut: int, period: int) -> int:
        # End the kept copy at a line break if one falls within the next period - 1 tokens: every rotation of
        # the block then appears once in full, as a user reading line by line would keep it.
        if self._breaks:
            for end in range(cut, cut + period):
                if self._tokens[end - 1] in self._breaks:
                    return end
        return cut


def line_break_ids(decode: Callable[[list[int]], str], vocab_size: int) -> frozenset[int]:
    """Ids of the tokens whose text holds a newline, for CycleDetector(line_break_ids=...).

    Parameters
    ----------
    decode : callable
        Token ids -> text, e.g. `Tokenizer.decode` or `tokenizers.Tokenizer.decode`.
    vocab_size : int
        Ids 0 .. vocab_size - 1 are checked (about 0.1 s for 50k tokens).

    Example
    -------
    >>> line_break_ids(lambda ids: ["a", "\\n", "b\\n"][ids[0]], 3)
    frozenset({1, 2})
    """
    return frozenset(i for i in range(vocab_size) if "\n" in decode([i]))
