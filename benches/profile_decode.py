"""Where a decode step's time goes: torch.profiler over a few steps of a random-weight model shape.

    python benches/profile_decode.py --shape llama-3.2-1b --batch 1 [--steps 20] [--quantize int8]

Prints the CUDA kernels by total time (per step), the sum of kernel time per step against the wall time
per step (the gap is launch overhead, host work and idle GPU), and the weight bytes per step.
"""

from __future__ import annotations

import argparse
import torch

from decoding.bench import preset_config, random_generator, weight_bytes_per_step
from decoding.sampling.params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--quantize", default=None, help="int8 | w8a8 | w8a8-smooth (decoding.quant)")
    args = ap.parse_args()
    gen = random_generator(preset_config(args.shape), torch.device("cuda"), torch.bfloat16, quantize=args.quantize,
                           max_num_seqs=args.batch, max_num_batched_tokens=max(args.batch * args.prompt, 256))
    prompts = [" ".join(f"<{(i * 7 + j) % 1000}>" for j in range(args.prompt)) for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    gen.generate(prompts, params.replace(max_tokens=4))  # warm-up: graphs captured, kernels compiled
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])
    gen.engine.call(lambda engine: prof.__enter__())  # on the engine thread, which runs the steps
    outs = gen.generate(prompts, params)
    torch.cuda.synchronize()
    gen.engine.call(lambda engine: prof.__exit__(None, None, None))
    gen.close()
    n = args.steps  # kernel totals below include the prefill: compare them with the decode steps' wall
    wall = 1 / (sum(o.tokens_per_second for o in outs) / len(outs))
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / n
    print(f"{args.shape} {args.quantize or 'bf16'} batch {args.batch}: wall {wall * 1e3:.3f} ms/step (decode), kernels {total / 1e3:.3f} "
          f"ms/step (prefill included), "
          f"{weight_bytes_per_step(gen.model) / 1e9:.2f} GB weights")
    for e in events[: args.rows]:
        print(f"  {e.device_time_total / n:9.1f} us/step {e.count / n:6.1f} calls/step  {e.key[:90]}")
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print("host (self time):")
    for e in host[: args.rows]:
        print(f"  {e.self_cpu_time_total / n:9.1f} us/step {e.count / n:6.1f} calls/step  {e.key[:90]}")


if __name__ == "__main__":
    main()
