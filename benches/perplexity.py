"""Accuracy of INT8 on the embedded model (SmolLM2-135M-Instruct): perplexity on held-out real text and
greedy-token agreement with the unquantized model. Runs on the CPU.

    python benches/perplexity.py [--kbytes 200] [--window 512] [--tokens 256] [--json out.json]

Text: Python standard-library source, read from the running Python's Lib/ directory: the .py files
directly under it (no packages, so no test suites), in sorted order, whole files until --kbytes is
reached. It is real code the model may or may not have seen, and its exact bytes depend on the
Python version, which the output names. On Python 3.11 the default takes 11 files, __future__.py to
_pydecimal.py: 320 KB, 87013 tokens, 170 windows of 512. On the 2-core CPU machine, busy with other
jobs, fp32 and int8 take 0.6-0.9 s a window and w8a8 1.5-3 s. The whole run takes about 15-25
minutes; pass --modes int8 or a smaller --kbytes for a shorter one. Perplexity is exp(mean next-token NLL) over fixed,
non-overlapping windows of --window tokens (every token but the first of each window is predicted
from the ones before it in its window).

Models: the unquantized model in fp32 (the CPU's dtype), then `quantize="int8"` (W8A16: int8 weights,
activations in fp32 here) and `quantize="w8a8"` (per-token int8 activations with LLM.int8() outlier
columns over 6.0; every window is a 512-token prefill, so all of it runs in W8A8). `--modes w8a8-smooth`
adds SmoothQuant (plain per-token W8A8 after scales calibrated on CPython's pydoc reference
documentation, pydoc_data.topics: 8192 tokens, disjoint from the Lib/*.py files scored here; --alpha).

Greedy agreement over --tokens generated tokens, per prompt:
- teacher-forced: the quantized model reads the prompt + the unquantized model's greedy tokens in one
  prefill; the share of positions where its argmax is the token the unquantized model chose;
- free-running: its own greedy generation; tokens equal to the unquantized model's before the first
  difference.
For w8a8 the generation steps of one token run the W8A16 GEMV unless --w8a8-everywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from decoding import Generator, SamplingParams, quant
from decoding.runner import StepInput

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():", "class Stack:\n    \"\"\"A LIFO stack.\"\"\"\n",
           "The three most important ideas in computer science are"]


def stdlib_text(kbytes: int) -> tuple[str, list[str]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, names, size = [], [], 0
    for f in sorted(lib.glob("*.py")):
        if size >= kbytes * 1024:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        names.append(f.name)
        size += len(text.encode())
    return "\n".join(parts), names


def prefill_hidden(gen: Generator, ids: list[int]) -> torch.Tensor:
    """Final hidden states of every token of `ids`: one eager step over blocks of the engine's pool, taken
    and given back on the engine thread between steps (as Generator.score does)."""
    def job(engine) -> torch.Tensor:
        need = gen.runner.blocks_for(len(ids))
        engine.make_room(need)
        pool = gen.runner.cache.pool
        table = pool.allocate(need)
        try:
            return gen.runner.forward_hidden(StepInput([table], [len(ids)], ids, [len(ids)]))
        finally:
            pool.free(table)

    return gen.engine.call(job)


@torch.no_grad()
def window_nll(gen: Generator, ids: list[int], window: int, desc: str) -> tuple[float, int]:
    """Sum of next-token NLL and number of predicted tokens, over non-overlapping windows of `ids`."""
    total, count = 0.0, 0
    starts = range(0, len(ids) - 1, window)
    for s in tqdm(starts, desc=desc, unit="window"):
        chunk = ids[s: s + window]
        if len(chunk) < 2:
            continue
        logp = gen.model.compute_logits(prefill_hidden(gen, chunk)[:-1]).log_softmax(-1)
        target = torch.tensor(chunk[1:])[:, None]
        total -= logp.gather(1, target).sum().item()
        count += len(chunk) - 1
    return total, count


@torch.no_grad()
def teacher_forced_agreement(gen: Generator, prompt_ids: list[int], tokens: list[int]) -> float:
    hidden = prefill_hidden(gen, prompt_ids + tokens)
    predicted = gen.model.compute_logits(hidden[len(prompt_ids) - 1: -1]).argmax(-1)
    return (predicted == torch.tensor(tokens)).float().mean().item()


def outlier_stats(gen: Generator, ids: list[int], window: int) -> dict:
    """Per W8A8 matmul over one window: how many activation columns exceed LLM.int8()'s default threshold."""
    counts = []
    threshold = quant.QuantConfig("w8a8").threshold

    def hook(module, args):
        x = args[0].reshape(-1, module.in_features)
        counts.append(int((x.abs().amax(0) > threshold).sum()))

    handles = [m.register_forward_pre_hook(hook) for m in gen.model.modules() if isinstance(m, quant.W8A8Linear)]
    window_nll(gen, ids[:window], window, "outlier count")
    for h in handles:
        h.remove()
    return {"matmuls": len(counts), "with_outliers": sum(c > 0 for c in counts), "max_columns": max(counts),
            "mean_columns": sum(counts) / max(1, len(counts))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kbytes", type=int, default=200, help="KB of standard-library source to score (whole files)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens per prompt for the agreement")
    p.add_argument("--modes", default="int8,w8a8")
    p.add_argument("--w8a8-everywhere", action="store_true", help="quantize activations at decode steps too")
    p.add_argument("--max-outliers", type=int, default=None, help="w8a8: override QuantConfig.max_outliers")
    p.add_argument("--threshold", type=float, default=None, help="w8a8: override QuantConfig.threshold")
    p.add_argument("--alpha", type=float, default=0.5, help="w8a8-smooth: SmoothQuant's migration strength")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()

    text, files = stdlib_text(args.kbytes)
    base = Generator.from_pretrained(device="cpu", dtype="float32", progress=False)
    ids = base.tokenizer.encode(text, add_special_tokens=False)
    print(f"Python {platform.python_version()} Lib/: {len(files)} files ({files[0]} .. {files[-1]}), "
          f"{len(text.encode()) / 1024:.0f} KB, {len(ids)} tokens, windows of {args.window}")
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    base_outs = base.generate(PROMPTS, params)
    results = {"python": platform.python_version(), "files": files, "kbytes": len(text.encode()) / 1024,
               "tokens": len(ids), "window": args.window, "modes": {}}
    nll, n = window_nll(base, ids, args.window, "fp32")
    results["modes"]["fp32"] = {"ppl": math.exp(nll / n)}
    print(f"fp32: perplexity {math.exp(nll / n):.4f} over {n} predicted tokens")

    for mode in args.modes.split(","):
        qc = quant.QuantConfig(mode, alpha=args.alpha) if mode == "w8a8-smooth" else mode
        gen = Generator.from_pretrained(device="cpu", dtype="float32", progress=mode == "w8a8-smooth", quantize=qc)
        if getattr(gen.model, "calibration", None):
            print(f"{mode}: alpha {args.alpha}, calibrated on {gen.model.calibration}")
        for m in gen.model.modules():
            if isinstance(m, quant.W8A8Linear):
                m.min_tokens = 0 if args.w8a8_everywhere else m.min_tokens
                m.max_outliers = m.max_outliers if args.max_outliers is None else args.max_outliers
                m.threshold = m.threshold if args.threshold is None else args.threshold
        q_nll, q_n = window_nll(gen, ids, args.window, mode)
        ppl = math.exp(q_nll / q_n)
        forced = [teacher_forced_agreement(gen, o.prompt_token_ids, o.token_ids) for o in base_outs]
        free = []
        for o, qo in zip(base_outs, gen.generate(PROMPTS, params)):
            same = next((i for i, (a, b) in enumerate(zip(o.token_ids, qo.token_ids)) if a != b), len(o.token_ids))
            free.append(same)
        entry = {"ppl": ppl, "ppl_change_pct": 100 * (ppl / results["modes"]["fp32"]["ppl"] - 1),
                 "teacher_forced_agreement": forced, "free_running_identical_prefix": free}
        if mode == "w8a8-smooth":
            entry.update(alpha=args.alpha, calibration=gen.model.calibration)
        if mode == "w8a8":
            entry["outliers"] = outlier_stats(gen, ids, args.window)
        results["modes"][mode] = entry
        print(f"{mode}: perplexity {ppl:.4f} ({entry['ppl_change_pct']:+.2f}% vs fp32); teacher-forced greedy "
              f"agreement {', '.join(f'{a:.3f}' for a in forced)} (mean {sum(forced) / len(forced):.3f}); "
              f"free-running identical prefix {free} of {args.tokens} tokens")
        if "outliers" in entry:
            o = entry["outliers"]
            print(f"  outlier columns (> {quant.QuantConfig('w8a8').threshold}) in one window: {o['with_outliers']} "
                  f"of {o['matmuls']} matmuls have some; at most {o['max_columns']}, mean {o['mean_columns']:.1f}")
        del gen
    results["seconds"] = time.perf_counter() - t_start
    print(f"done in {results['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
