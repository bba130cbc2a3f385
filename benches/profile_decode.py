"""Where a decode step's time goes: torch.profiler over a few steps of a random-weight model shape.

    python benches/profile_decode.py --shape llama-3.2-1b --batch 1 [--steps 20]

Prints the CUDA kernels by total time (per step), the sum of kernel time per step against the wall time
per step (the gap is launch overhead, host work and idle GPU), and the weight bytes per step.
"""

from __future__ import annotations

import argparse
import time

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
    args = ap.parse_args()
    gen = random_generator(preset_config(args.shape), torch.device("cuda"), torch.bfloat16)
    prompts = [" ".join(f"<{(i * 7 + j) % 1000}>" for j in range(args.prompt)) for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    gen.generate(prompts, params)  # warm-up: graphs captured, kernels compiled
    requests = gen._make_requests(prompts, params)
    run = gen._run(requests)
    last = requests[-1].seqs[-1]
    steps = 0
    for seq in run:  # prefill and a few steps outside the profile
        if seq is last:
            steps += 1
            if steps == 4:
                break
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        n = 0
        for seq in run:
            if seq is last:
                n += 1
                if n == args.steps:
                    break
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    run.close()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / n
    print(f"{args.shape} batch {args.batch}: wall {wall * 1e3:.3f} ms/step, kernels {total / 1e3:.3f} ms/step, "
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
