"""Tunes and measures n-gram cycle truncation (decoding/sampling/cycles.py) on real Python code.

    python benches/cycles_corpus.py [--show 12] [--jobs 2]

Corpus: the standard library of the running Python (top-level *.py, encodings/*.py for data tables, and a
seeded sample of test/test_*.py), tokenized with the embedded SmolLM2 tokenizer.
  * false positives: every file is pushed whole (the detector restarts after each cut, so every firing site
    is counted) and as 256-token "completions" starting at random points; any cut is a false positive.
  * detection: synthetic looping completions: real code lines from the corpus, then one line or 2-5 lines
    of the same file repeated up to 256 tokens, ending in a partial copy or on a copy boundary; plus a few
    hand-written loops and ordinary snippets.
  * cost: µs per push() against the position in the sequence, for max_period 64.
Prints the tables that benches/CYCLES.md reports. Seeded; about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import sysconfig
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decoding.gguf import embedded_gguf_path, load_gguf
from decoding.sampling.cycles import CycleConfig, CycleDetector, line_break_ids

SEED = 0
WINDOW = 256
NUM_TEST_FILES = 60
NUM_LOOPS = 800
DEFAULT = CycleConfig()
SWEEP = [CycleConfig(2, 64, s) for s in (0, 16, 32, 64)]
SWEEP += [CycleConfig(3, 64, s) for s in (0, 16, 24, 32, 40, 48, 64, 80, 96, 128)]
SWEEP += [CycleConfig(4, 64, s) for s in (0, 32, 64)] + [
    CycleConfig(DEFAULT.min_repeats, p, DEFAULT.min_span_tokens) for p in (32, 128)
]

HAND_LOOPS = {
    "print(fibonacci(1))": "def fibonacci(n):\n    return n\n\n" + "print(fibonacci(1))\n" * 40,
    "import os": "import sys\n" + "import os\n" * 40,
    "assert 3-line block": "def test():\n" + "    x = f(1)\n    assert x == 1\n    x = f(2)\n" * 20,
    "return self.x": "    def get(self):\n" + "        return self.x\n" * 40,
    "x += 1": "x = 0\n" + "x += 1\n" * 60,
    "close parens": "print(f(g(h(" + ")" * 400,
    "blank lines": "x = 1\n" + "\n" * 400,
    "comment run": "# " * 300,
    "elif chain": "if x == 1:\n    pass\n" + "elif x == 1:\n    pass\n" * 20,
    "list item": "xs = [\n" + "    'a',\n" * 60,
}
ORDINARY = {
    "brackets": "x = f(g(h(i(j(k(l(1)))))))\ny = [[[[[[0]]]]]]\nz = {{{{1: 2}}}}\n",
    "pass runs": "".join(f"class E{i}(Exception):\n    pass\n\n\n" for i in range(12)) + "    pass\n" * 6,
    "dict of 30": "d = {\n" + "".join(f'    "k{i}": {i},\n' for i in range(30)) + "}\n",
    "self.x = x": "    def __init__(self, a, b, c, d, e, f):\n"
    + "".join(f"        self.{v} = {v}\n" for v in "abcdef"),
    "blank lines x3": "x = 1\n\n\n\ny = 2\n\n\n\nz = 3\n",
    "separators": "# " + "-" * 76 + "\n# Section\n# " + "-" * 76 + "\n" + "#" * 79 + "\n" * 2 + "#" * 79 + "\n",
    "decorators": "".join(f"    @property\n    @abstractmethod\n    def {v}(self):\n        ...\n\n" for v in "abcdef"),
    "data table": "TABLE = [\n" + "".join(f"    {i * 7 % 256:#04x}, 0x00, 0x00, 0x00,\n" for i in range(40)) + "]\n",
    "hex row": "    " + "0x00, " * 8 + "\n",
    "bytes literal": 'b"' + "\\x00" * 12 + '"\n',
    "end keywords": "begin\n  begin\n    x\n  end\nend\n" * 3,
    "indentation": "".join("    " * min(i, 12 - i) + f"if x{i}:\n" for i in range(12)) + "    " * 7 + "pass\n",
    "zeros row": "ROW = [" + "0, " * 16 + "]\n",
}


def load_corpus(tok) -> list[tuple[str, str, list[int]]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    tests = sorted(lib.glob("test/test_*.py"))
    files = sorted(lib.glob("*.py")) + sorted(lib.glob("encodings/*.py"))
    files += sorted(random.Random(SEED).sample(tests, min(NUM_TEST_FILES, len(tests))))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    encs = tok.encode_batch(texts, add_special_tokens=False)
    return [(str(f.relative_to(lib)), t, e.ids) for f, t, e in zip(files, texts, encs)]


def make_windows(corpus) -> list[tuple[int, int]]:
    rng = random.Random(SEED + 1)
    out = []
    for i, (_, _, ids) in enumerate(corpus):
        for _ in range(max(1, len(ids) // WINDOW)):
            out.append((i, rng.randrange(max(1, len(ids) - WINDOW + 1))))
    return out


def make_loops(corpus, tok) -> list[dict]:
    """Synthetic looping completions: `pre` lines of real code, then one block repeated up to WINDOW tokens."""
    rng = random.Random(SEED + 2)
    code = [c for c in corpus if not c[0].startswith("encodings/")]
    loops = []
    while len(loops) < NUM_LOOPS:
        _, text, _ = rng.choice(code)
        lines = text.splitlines(keepends=True)
        at = rng.randrange(len(lines))
        nblock = 1 if rng.random() < 0.5 else rng.randint(2, 5)
        block = "".join(lines[at : at + nblock])
        if not block.strip() or not block.endswith("\n") or len(block) > 400:
            continue
        pre = "".join(lines[max(0, at - rng.randint(0, 10)) : at])
        text = pre + block * (WINDOW // 2)
        enc = tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids[:WINDOW], enc.offsets[:WINDOW]
        boundary = rng.random() < 0.5
        if boundary:  # drop the trailing partial copy: end on a whole copy
            whole = max((k for k in range(1, WINDOW) if len(pre) + k * len(block) <= offsets[-1][1]), default=0)
            end = len(pre) + whole * len(block)
            ids = [t for t, (_, e) in zip(ids, offsets) if e <= end]
        start = next((k for k, (_, e) in enumerate(offsets) if e > len(pre)), len(ids))
        loops.append(
            {
                "pre": pre,
                "block": block,
                "ids": ids,
                "start": start,
                "period": _period(ids, start),
                "boundary": boundary,
            }
        )
    return loops


def _period(ids: list[int], start: int) -> int | None:
    """Token period of the looping tail (BPE merges across copies can make it differ from the block's length)."""
    for p in range(1, (len(ids) - start) // 3 + 1):
        if all(ids[i] == ids[i - p] for i in range(start + p + 2, len(ids))):
            return p
    return None


def run(cfg: CycleConfig, ids: list[int], breaks=frozenset()) -> tuple[int, int] | None:
    """(index of the token that fired, tokens kept), or None."""
    det = CycleDetector(cfg, breaks)
    for i, t in enumerate(ids):
        cut = det.push(t)
        if cut is not None:
            return i, cut
    return None


def fire_sites(cfg: CycleConfig, ids: list[int]) -> list[tuple[int, int, int]]:
    """Every (kept, fired, period) in a whole file, restarting the detector after each cut."""
    sites, begin = [], 0
    while begin < len(ids):
        det = CycleDetector(cfg)
        for i in range(begin, len(ids)):
            if det.push(ids[i]) is not None:
                sites.append((begin + det.cut, i, det.period))
                begin = i + 1
                break
        else:
            break
    return sites


_G: dict = {}


def _init(corpus, windows, loops, breaks) -> None:
    _G.update(corpus=corpus, windows=windows, loops=loops, breaks=breaks)


def evaluate(cfg: CycleConfig) -> dict:
    corpus, windows, loops, breaks = _G["corpus"], _G["windows"], _G["loops"], _G["breaks"]
    sites = {name: s for name, _, ids in corpus if (s := fire_sites(cfg, ids))}
    win_fp = sum(run(cfg, corpus[f][2][s : s + WINDOW]) is not None for f, s in windows)
    eligible = [lp for lp in loops if lp["period"] is not None and lp["period"] <= cfg.max_period]
    latency, copies, exact, in_pre, missed, by_period = [], [], 0, 0, 0, []
    for lp in eligible:
        hit = run(cfg, lp["ids"], breaks)
        if hit is None:
            missed += 1
            continue
        if hit[0] < lp["start"]:
            in_pre += 1
        latency.append(hit[0] + 1 - lp["start"])
        by_period.append((lp["period"], hit[0] + 1 - lp["start"]))
        copies.append((hit[0] + 1 - lp["start"]) / lp["period"])
        exact += _kept_text(lp["ids"][: hit[1]]).rstrip() == (lp["pre"] + lp["block"]).rstrip()
    return {
        "cfg": cfg,
        "fp_sites": sum(len(s) for s in sites.values()),
        "fp_files": len(sites),
        "sites": sites,
        "win_fp": win_fp,
        "eligible": len(eligible),
        "detected": len(latency),
        "in_pre": in_pre,
        "lat_med": statistics.median(latency) if latency else float("nan"),
        "lat_p90": _pct(latency, 0.9),
        "copies_med": statistics.median(copies) if copies else float("nan"),
        "exact": exact,
        "by_period": by_period,
    }


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _kept_text(ids: list[int]) -> str:
    return _G["tok"].decode(ids)


def cost_table() -> list[tuple[str, list[float]]]:
    """µs per push() by position in the sequence; configs that never fire, so the work is never cut short."""
    never = CycleConfig(min_repeats=10**9, max_period=64)
    rng = random.Random(SEED + 3)
    code = [t for _, _, ids in _G["corpus"] for t in ids][:200_000]
    streams = {
        "real code": code,
        "random, vocab 8": [rng.randrange(8) for _ in range(200_000)],
        "one token (worst: 64 runs live)": [5] * 200_000,
    }
    bounds = [0, 1_000, 10_000, 100_000, 200_000]
    rows = []
    for name, ids in streams.items():
        det, us = CycleDetector(never), []
        for lo, hi in itertools.pairwise(bounds):
            t0 = time.perf_counter()
            for t in ids[lo:hi]:
                det.push(t)
            us.append((time.perf_counter() - t0) / (hi - lo) * 1e6)
        rows.append((name, us))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--show", type=int, default=12, help="worst false-positive sites to print")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    tok = load_gguf(embedded_gguf_path()).tokenizer
    _G["tok"] = tok
    breaks = line_break_ids(tok.decode, tok.get_vocab_size())
    corpus = load_corpus(tok)
    windows = make_windows(corpus)
    loops = make_loops(corpus, tok)
    _init(corpus, windows, loops, breaks)
    ntok = sum(len(ids) for *_, ids in corpus)
    nbytes = sum(len(t.encode()) for _, t, _ in corpus)
    print(f"corpus: {len(corpus)} files, {nbytes / 1e6:.2f} MB, {ntok} tokens; {len(windows)} windows of {WINDOW}")
    periods = [lp["period"] for lp in loops]
    print(
        f"loops: {len(loops)} completions of <= {WINDOW} tokens ({sum(lp['boundary'] for lp in loops)} end on a "
        f"copy boundary), token period median {statistics.median(p for p in periods if p)}, "
        f"> 64: {sum(p is None or p > 64 for p in periods)}"
    )
    with Pool(args.jobs, initializer=_init, initargs=(corpus, windows, loops, breaks)) as pool:
        results = pool.map(evaluate, SWEEP)
    print(
        "\n| R | max_period | min_span | FP sites | FP files | FP windows | detected | fired in prefix | "
        "tokens to fire (median / p90) | copies (median) | kept == pre + block |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["cfg"]
        mark = " **(default)**" if c == DEFAULT else ""
        print(
            f"| {c.min_repeats} | {c.max_period} | {c.min_span_tokens}{mark} | {r['fp_sites']} | {r['fp_files']} | "
            f"{r['win_fp']}/{len(windows)} ({100 * r['win_fp'] / len(windows):.2f}%) | "
            f"{r['detected']}/{r['eligible']} ({100 * r['detected'] / max(1, r['eligible']):.1f}%) | {r['in_pre']} | "
            f"{r['lat_med']:.0f} / {r['lat_p90']:.0f} | {r['copies_med']:.1f} | "
            f"{100 * r['exact'] / max(1, r['detected']):.1f}% |"
        )
    default = next(r for r in results if r["cfg"] == DEFAULT)
    print("\ndefault, tokens past the loop start to fire, by token period of the block:")
    print("| period | loops | median | max |\n|---|---|---|---|")
    for lo, hi in ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64)):
        lat = [t for p, t in default["by_period"] if lo <= p <= hi]
        if lat:
            print(f"| {lo}-{hi} | {len(lat)} | {statistics.median(lat):.0f} | {max(lat)} |")
    show_sites(corpus, default, args.show, "default")
    for span in (40, 0):
        loose = next(r for r in results if r["cfg"] == CycleConfig(3, 64, span))
        show_sites(corpus, loose, args.show, f"R=3, min_span_tokens={span} (what the default guard removes)")
    show_snippets(tok, breaks)
    show_lag(corpus)
    print("\ncost of push(), µs/token by position in the sequence (max_period 64, detection never fires):")
    print("| stream | 0-1k | 1k-10k | 10k-100k | 100k-200k |\n|---|---|---|---|---|")
    for name, us in cost_table():
        print(f"| {name} | " + " | ".join(f"{u:.2f}" for u in us) + " |")
    print(f"\ntotal {time.time() - t0:.0f} s")


def show_sites(corpus, result, show: int, title: str) -> None:
    names = {name: ids for name, _, ids in corpus}
    flat = [(name, *s) for name, ss in result["sites"].items() for s in ss]
    flat.sort(key=lambda x: -(x[2] - x[1]))  # most tokens removed first
    print(f"\nfalse-positive sites, {title}: {len(flat)}")
    for name, kept, fired, period in flat[:show]:
        ids = names[name]
        text = _G["tok"].decode(ids[max(0, kept - period) : fired + 1])
        print(f"  {name} @{kept}: period {period}, fired {fired + 1 - kept} tokens after the cut: {text[:110]!r}")


def show_snippets(tok, breaks) -> None:
    print(f"\nhand-written loops, default {DEFAULT}:")
    print("| loop | fired after (tokens) | kept text (tail) |\n|---|---|---|")
    for name, text in HAND_LOOPS.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        hit = run(DEFAULT, ids, breaks)
        tail = "not cut" if hit is None else repr(tok.decode(ids[: hit[1]])[-40:])
        print(f"| {name} | {'-' if hit is None else hit[0] + 1} of {len(ids)} | `{tail}` |")
    print(
        "\nordinary snippets (must not be cut): "
        + ", ".join(
            f"{name}: {'CUT' if run(DEFAULT, tok.encode(t, add_special_tokens=False).ids) else 'ok'}"
            for name, t in ORDINARY.items()
        )
    )


def show_lag(corpus) -> None:
    """Streaming lag: tokens pushed but not yet safe, sampled after every push over the whole corpus."""
    lags = []
    for _, _, ids in corpus:
        det = CycleDetector(DEFAULT)
        for t in ids:
            if det.push(t) is not None:
                det = CycleDetector(DEFAULT)
                continue
            lags.append(len(det) - det.safe_length())
    lags.sort()
    print(
        f"\nstreaming lag (len - safe_length) over {len(lags)} pushes of real code: mean {statistics.mean(lags):.2f}, "
        f"median {_pct(lags, 0.5)}, p99 {_pct(lags, 0.99)}, p99.9 {_pct(lags, 0.999)}, max {lags[-1]} tokens"
    )


if __name__ == "__main__":
    main()
