"""CycleDetector: exact detection and cut, guards for ordinary code, safe_length, bounded work per token."""

from __future__ import annotations

import random

import pytest

from decoding.errors import CheckpointError
from decoding.sampling.cycles import CycleConfig, CycleDetector, line_break_ids

EXACT = CycleConfig(min_repeats=3, max_period=64, min_span_tokens=0)


def _feed(det: CycleDetector, ids: list[int]) -> tuple[int, int] | None:
    """(index of the token that fired, tokens kept), or None."""
    for i, t in enumerate(ids):
        cut = det.push(t)
        if cut is not None:
            return i, cut
    return None


def _naive_first_cut(cfg: CycleConfig, ids: list[int]) -> tuple[int, int] | None:
    """O(n * max_period) per token oracle: the first prefix whose tail is a cycle, and the cut for it."""
    for n in range(1, len(ids) + 1):
        best = 0
        for period in range(1, cfg.max_period + 1):
            run = 0
            while n - 1 - run - period >= 0 and ids[n - 1 - run] == ids[n - 1 - run - period]:
                run += 1
            if run >= cfg.run_needed(period):
                best = max(best, run)
        if best:
            return n - 1, n - best
    return None


def _unique(n: int, base: int = 10_000) -> list[int]:
    return list(range(base, base + n))


@pytest.mark.parametrize("period", [1, 2, 3, 5, 7, 16, 31, 63, 64])
@pytest.mark.parametrize("repeats", [2, 3, 5])
def test_cut_keeps_exactly_the_first_copy(period: int, repeats: int) -> None:
    cfg = CycleConfig(min_repeats=repeats, max_period=64, min_span_tokens=0)
    prefix, block = _unique(11), _unique(period, base=100)
    ids = prefix + block * (repeats + 2)
    det = CycleDetector(cfg)
    fired, cut = _feed(det, ids)
    assert fired == len(prefix) + repeats * period - 1  # on the token that completes copy number `repeats`
    assert cut == len(prefix) + period
    assert det.period == period and det.cut == cut and det.safe_length() == cut
    assert det.push(1) == cut  # later pushes keep answering the same cut


@pytest.mark.parametrize("block", [[1, 1, 2], [4, 5, 4, 5, 6], [7, 8, 7, 7, 8, 8]])
def test_block_with_inner_repeats_is_cut_at_its_own_period(block: list[int]) -> None:
    prefix = _unique(5)
    fired, cut = _feed(CycleDetector(EXACT), prefix + block * 4)
    assert cut == len(prefix) + len(block)
    assert fired == len(prefix) + 3 * len(block) - 1


@pytest.mark.parametrize("period", [1, 4, 9, 64])
def test_no_cut_below_the_repeat_count(period: int) -> None:
    block = _unique(period, base=100)
    almost = _unique(3) + block * 2 + block[:-1]  # one token short of 3 copies
    det = CycleDetector(EXACT)
    assert _feed(det, almost) is None
    assert det.push(block[-1]) == 3 + period


def test_longer_periods_than_max_are_ignored() -> None:
    cfg = CycleConfig(min_repeats=3, max_period=8, min_span_tokens=0)
    assert _feed(CycleDetector(cfg), _unique(9, base=100) * 10) is None
    assert _feed(CycleDetector(cfg), _unique(8, base=100) * 3)[1] == 8


def test_min_span_needs_more_copies_of_short_blocks() -> None:
    cfg = CycleConfig(min_repeats=3, max_period=64, min_span_tokens=20)
    fired, cut = _feed(CycleDetector(cfg), [1] + [2, 3] * 30)
    assert (fired, cut) == (20, 3)  # 20 looping tokens (10 copies) before the cut, which keeps one copy
    fired, cut = _feed(CycleDetector(cfg), [1] + _unique(12) * 3)
    assert (fired, cut) == (36, 13)  # 3 copies of 12 tokens already span 36 >= 20


def test_disabled_never_fires() -> None:
    det = CycleDetector(CycleConfig(min_repeats=0))
    assert _feed(det, [3] * 10_000) is None
    assert det.safe_length() == len(det) == 10_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_repeats": 1},
        {"min_repeats": -1},
        {"max_period": 0},
        {"min_span_tokens": -5},
        {"max_period": True},
        {"min_repeats": 2.0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CycleConfig(**kwargs)


def test_line_breaks_keep_the_whole_first_line() -> None:
    # foo ( 1 )\n bar ( 1 )\n bar ...: the periodic tail starts at "( 1 )\n" of the foo line.
    foo, bar, lp, one, rp_nl = 1, 2, 3, 4, 9
    ids = [foo, lp, one, rp_nl] + [bar, lp, one, rp_nl] * 5
    assert _feed(CycleDetector(EXACT), ids)[1] == 5  # "foo(1)\nbar": exactly one copy of the block
    assert _feed(CycleDetector(EXACT, line_break_ids={rp_nl}), ids)[1] == 8  # "foo(1)\nbar(1)\n"


def test_matches_the_naive_oracle_on_random_streams() -> None:
    rng = random.Random(0)
    for trial in range(300):
        cfg = CycleConfig(
            min_repeats=rng.choice([2, 3, 4]),
            max_period=rng.choice([1, 3, 8, 16]),
            min_span_tokens=rng.choice([0, 5, 12]),
        )
        ids = [rng.randrange(rng.choice([2, 3, 6])) for _ in range(rng.randrange(1, 120))]
        assert _feed(CycleDetector(cfg), ids) == _naive_first_cut(cfg, ids), (trial, cfg, ids)


def _stream(rng: random.Random) -> list[int]:
    """Random tokens with injected loops, near-loops that break off, and line-break tokens."""
    out: list[int] = []
    while len(out) < 400:
        kind = rng.random()
        if kind < 0.4:
            out += [rng.randrange(rng.choice([2, 4, 50])) for _ in range(rng.randrange(1, 30))]
        else:
            block = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]
            copies = rng.randrange(1, 8)
            out += (block * copies)[: rng.randrange(1, len(block) * copies + 1)]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_safe_length_is_monotone_and_never_cut_back(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        cfg = CycleConfig(
            min_repeats=rng.choice([2, 3, 4]),
            max_period=rng.choice([1, 5, 12, 64]),
            min_span_tokens=rng.choice([0, 8, 30]),
        )
        det = CycleDetector(cfg, line_break_ids={0, 3} if rng.random() < 0.5 else ())
        safe, cut = 0, None
        for t in _stream(rng):
            cut = det.push(t)
            if cut is not None:
                break
            now = det.safe_length()
            assert safe <= now <= len(det)
            safe = now
        if cut is not None:
            assert cut >= safe


def test_safe_length_lags_only_while_a_repeat_builds_up() -> None:
    det = CycleDetector(CycleConfig())
    _feed(det, _unique(500))
    assert det.safe_length() == 500
    _feed(det, [1, 2, 3, 4, 5, 6] * 3)
    assert det.safe_length() == 500 + 6  # everything up to the first copy stays streamable
    det.push(99)
    assert det.safe_length() == len(det)


def test_work_per_token_is_bounded_on_long_streams() -> None:
    # A config that never fires keeps every run alive: the worst case for the per-token work.
    never = CycleConfig(min_repeats=10**9, max_period=64)
    for ids in ([5] * 100_000, [i % 7 for i in range(100_000)]):
        det = CycleDetector(never)
        _feed(det, ids)
        # The work of one push is one step per recent position of the token plus the runs it ends: both are
        # bounded by the window of max_period positions, however long the sequence.
        assert sum(map(len, det._recent.values())) == never.max_period + 1  # the last max_period and this one
        assert len(det._runs) <= never.max_period
        assert det.safe_length() >= 0


@pytest.fixture(scope="module")
def tok():
    pytest.importorskip("tokenizers")
    gguf = pytest.importorskip("decoding.gguf")
    try:
        return gguf.load_gguf(gguf.embedded_gguf_path()).tokenizer
    except CheckpointError as e:  # the embedded model package is optional
        pytest.skip(f"embedded tokenizer unavailable: {e}")


ORDINARY = {
    "brackets": "x = f(g(h(i(j(k(l(1)))))))\ny = [[[[[[0]]]]]]\nz = {{{{1: 2}}}}\n" + ")" * 30 + "\n",
    "pass runs": "".join(f"class E{i}(Exception):\n    pass\n\n\n" for i in range(12)) + "    pass\n" * 6,
    "dict of 30": "d = {\n" + "".join(f'    "k{i}": {i},\n' for i in range(30)) + "}\n",
    "self.x = x": "    def __init__(self, a, b, c, d, e, f):\n"
    + "".join(f"        self.{v} = {v}\n" for v in "abcdef"),
    "blank lines": "x = 1\n\n\n\ny = 2\n\n\n\n\n\nz = 3\n",
    "separators": ("# " + "-" * 76 + "\n") * 3 + ("#" * 79 + "\n") * 3,
    "zeros row": "ROW = [" + "0, " * 16 + "]\n",
    "bytes literal": 'b"' + "\\x00" * 12 + '"\n',
}


@pytest.mark.parametrize("name", list(ORDINARY))
def test_defaults_leave_ordinary_code_alone(tok, name: str) -> None:
    assert _feed(CycleDetector(CycleConfig()), tok.encode(ORDINARY[name]).ids) is None


def test_defaults_cut_a_real_loop_after_its_first_line(tok) -> None:
    prefix = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    ids = tok.encode(prefix + "print(fibonacci(1))\n" * 30).ids
    breaks = line_break_ids(tok.decode, tok.get_vocab_size())
    fired, cut = _feed(CycleDetector(CycleConfig(), breaks), ids)
    assert tok.decode(ids[:cut]) == prefix + "print(fibonacci(1))\n"
    assert fired < len(tok.encode(prefix).ids) + 100
