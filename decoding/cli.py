"""`python -m decoding generate|info|bench|quantize`: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from decoding.errors import DecodingError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=int, default=None,
                   help="split the model over N GPUs (default 1; under torchrun, its number of processes)")
    p.add_argument("--quantize", default=None, choices=["int8", "w8a8", "w8a8-smooth"],
                   help="quantize on load: int8 weights (int8), int8 weights and activations with LLM.int8() "
                        "outlier columns (w8a8) or after SmoothQuant calibration (w8a8-smooth)")


def _quant_modes(value: str) -> str:
    """bench --quantize: one mode or several, comma-separated."""
    from decoding.quant import MODES

    bad = [m for m in value.split(",") if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; choose from {list(MODES)}, comma-separated")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decoding", description="decoding: LLM generation engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt and print the text as it is produced")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts are run as one batch)")
    _add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="candidates (per temperature); the best is printed")
    gen.add_argument("--temperatures", type=float, nargs="+", default=None,
                     help="multi-temperature sampling: n candidates at each, best one printed")
    gen.add_argument("--rank-by", default="mean_logprob", choices=["mean_logprob", "sum_logprob"])
    gen.add_argument("--logprobs", type=int, default=None, help="top-k log-probs per token (with --json)")
    gen.add_argument("--no-cycle-cut", action="store_true", help="do not cut completions that start looping")
    gen.add_argument("--cycle-min-repeats", type=int, default=None)
    gen.add_argument("--cycle-max-period", type=int, default=None)
    gen.add_argument("--cycle-min-span", type=int, default=None, help="fewest tokens a cut loop must cover")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--no-stream", action="store_true", help="print the completion once it is finished")
    gen.add_argument("--json", action="store_true", help="print each Output as a JSON line")

    info = sub.add_parser("info", help="show the model, device and active op backends")
    _add_model_args(info)

    bench = sub.add_parser("bench", help="decode speed of a model shape with random weights vs the roofline")
    bench.add_argument("--shape", default="llama-3.2-1b", help="llama-3-8b | llama-3.2-1b | smollm2-135m | tiny")
    bench.add_argument("--random-weights", action="store_true", help="(the only mode: no download is needed)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    bench.add_argument("--new", type=int, default=256, help="tokens to generate per sequence")
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--tp", type=int, default=1,
                       help="also run tensor-parallel over N GPUs (after TP=1, in the same invocation) and compare")
    bench.add_argument("--all-reduce", default=None, choices=["nccl", "symm_mem"],
                       help="TP all-reduce (default: $DECODING_TP_ALLREDUCE or nccl)")
    bench.add_argument("--quantize", default=None, type=_quant_modes,
                       help="int8 | w8a8 | w8a8-smooth (calibrated on random tokens), or several comma-separated: "
                            "quantize the random model (each mode after the other)")
    bench.add_argument("--compare-bf16", action="store_true",
                       help="with --quantize: also run the unquantized model (--dtype) first and print the speed-up")
    bench.add_argument("--json", default=None, help="also write the result as JSON to this file")
    bench.add_argument("--profile", default=None,
                       help="write a torch.profiler trace of the decode steps here (with --serve: of --profile-steps "
                            "steps of the continuous run, from when half of the requests have finished)")
    serve = bench.add_argument_group("serving load (--serve)")
    serve.add_argument("--serve", action="store_true",
                       help="load test of continuous batching: requests arriving at --rate with random lengths")
    serve.add_argument("--requests", type=int, default=200, help="number of requests")
    serve.add_argument("--rate", type=float, default=float("inf"),
                       help="mean arrivals per second (Poisson); inf (default): all at once")
    serve.add_argument("--prompt-len", default="128:512", help="prompt tokens, uniform in A:B")
    serve.add_argument("--output-len", default="32:256", help="tokens to generate, uniform in A:B")
    serve.add_argument("--static-baseline", action="store_true",
                       help="also run the same requests in static batches of 32 and print the throughput ratio")
    serve.add_argument("--temperature", type=float, default=0.0)
    serve.add_argument("--seed", type=int, default=0, help="workload (and sampling) seed")
    serve.add_argument("--max-num-seqs", type=int, default=None)
    serve.add_argument("--max-num-batched-tokens", type=int, default=None)
    serve.add_argument("--gpu-memory-utilization", type=float, default=None)
    serve.add_argument("--num-kv-blocks", type=int, default=None)
    serve.add_argument("--context-cost", type=float, default=None,
                       help="budget cost of a decode row's context token (SchedulerConfig.context_cost; 8B/H100 ~0.0017)")
    serve.add_argument("--profile-steps", type=int, default=30, help="steps in the --profile window")
    serve.add_argument("--step-trace", default=None,
                       help="write every step's host and device times of the continuous run here (JSON)")
    serve.add_argument("--no-progress", dest="progress", action="store_false")
    qnt = sub.add_parser("quantize", help="quantize a checkpoint once and save it (load it later with --model)")
    qnt.add_argument("out", help="directory to write (config.json, tokenizer, model.safetensors)")
    qnt.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file (default: embedded)")
    qnt.add_argument("--mode", default="int8", choices=["int8", "w8a8", "w8a8-smooth"])
    qnt.add_argument("--alpha", type=float, default=0.5, help="w8a8-smooth: SmoothQuant's migration strength")
    qnt.add_argument("--calibration-tokens", type=int, default=8192,
                     help="w8a8-smooth: tokens of calibration text (CPython's pydoc reference documentation)")
    qnt.add_argument("--device", default=None)
    qnt.add_argument("--dtype", default="auto")
    return parser


def _quantize(args: argparse.Namespace) -> None:
    from decoding import Generator
    from decoding.quant import QuantConfig

    mode = args.mode if args.mode != "w8a8-smooth" else QuantConfig(args.mode, alpha=args.alpha,
                                                                     calibration_tokens=args.calibration_tokens)
    gen = Generator.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=mode)
    path = gen.save_quantized(args.out)
    print(f"wrote {args.mode} checkpoint to {path}")


def _load(args: argparse.Namespace):
    """The Generator for --model/--device/--dtype/--tp; under torchrun, ranks > 0 serve rank 0 and exit here."""
    from decoding import Generator
    from decoding.workers import torchrun_world_size

    tp = args.tp if args.tp is not None else (torchrun_world_size() or 1)
    return Generator.from_pretrained(args.model, device=args.device, dtype=args.dtype, tensor_parallel_size=tp,
                                    quantize=getattr(args, "quantize", None))


def _generate(args: argparse.Namespace) -> None:
    from decoding import SamplingParams

    cycles = {}
    if args.no_cycle_cut:
        cycles["cycle_min_repeats"] = 0
    elif args.cycle_min_repeats is not None:
        cycles["cycle_min_repeats"] = args.cycle_min_repeats
    if args.cycle_max_period is not None:
        cycles["cycle_max_period"] = args.cycle_max_period
    if args.cycle_min_span is not None:
        cycles["cycle_min_span_tokens"] = args.cycle_min_span
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, n=args.n,
                            temperatures=args.temperatures, rank_by=args.rank_by, logprobs=args.logprobs, **cycles)
    with _load(args) as gen:  # closing stops tensor-parallel workers
        prompts = [gen.render_chat(p) if args.chat else p for p in args.prompt]
        if len(prompts) == 1 and params.num_candidates == 1 and not (args.no_stream or args.json):
            print(args.prompt[0] if not args.chat else "", end="", flush=True)
            for piece in gen.stream(prompts[0], params):
                print(piece, end="", flush=True)
            print()
            return
        outs = gen.generate(prompts, params)
        for prompt, out in zip(args.prompt, outs):
            if args.json:
                record = {"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "time_to_first_token": out.time_to_first_token,
                          "tokens_per_second": out.tokens_per_second, "error": out.error}
                if out.logprobs is not None:
                    record["logprobs"] = [dataclasses.asdict(lp) for lp in out.logprobs]
                if out.candidates is not None:
                    record["candidates"] = [dataclasses.asdict(c) for c in out.candidates]
                print(json.dumps(record))
            else:
                print(f"{prompt}{out.text}" if not args.chat else out.text)
                extra = f", best of {len(out.candidates)} candidates" if out.candidates else ""
                print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}{extra}, "
                      f"ttft={out.time_to_first_token * 1e3:.0f} ms, {out.tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _info(args: argparse.Namespace) -> None:
    from decoding import ops

    with _load(args) as gen:
        info = gen.info()
    info["ops"] = ops.describe()
    print(json.dumps(info, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench" and args.serve:
            from decoding import serve_bench

            serve_bench.main(args)
        elif args.command == "bench":
            from decoding import bench

            bench.main(args)
        else:
            {"generate": _generate, "info": _info, "quantize": _quantize}[args.command](args)
    except DecodingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
