"""`python -m decoding generate|info`: the command line."""

from __future__ import annotations

import argparse
import json
import sys

from decoding.errors import DecodingError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (bf16 on CUDA, fp32 on CPU)")


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
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--no-stream", action="store_true", help="print the completion once it is finished")
    gen.add_argument("--json", action="store_true", help="print each Output as a JSON line")

    info = sub.add_parser("info", help="show the model, device and active op backends")
    _add_model_args(info)
    return parser


def _generate(args: argparse.Namespace) -> None:
    from decoding import Generator, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos)
    gen = Generator.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    prompts = [gen.render_chat(p) if args.chat else p for p in args.prompt]
    if len(prompts) == 1 and not (args.no_stream or args.json):
        print(args.prompt[0] if not args.chat else "", end="", flush=True)
        for piece in gen.stream(prompts[0], params):
            print(piece, end="", flush=True)
        print()
        return
    outs = gen.generate(prompts, params)
    for prompt, out in zip(args.prompt, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "time_to_first_token": out.time_to_first_token,
                              "tokens_per_second": out.tokens_per_second}))
        else:
            print(f"{prompt}{out.text}" if not args.chat else out.text)
            print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}, "
                  f"ttft={out.time_to_first_token * 1e3:.0f} ms, {out.tokens_per_second:.1f} tok/s]", file=sys.stderr)


def _info(args: argparse.Namespace) -> None:
    from decoding import Generator, ops

    gen = Generator.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    info = gen.info()
    describe = getattr(ops, "describe", None)
    if describe is not None:
        info["ops"] = describe()
    print(json.dumps(info, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"generate": _generate, "info": _info}[args.command](args)
    except DecodingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
