"""`python -m decoding bench`: decode speed of a model shape with random weights, against the roofline.

Decode at small batch is memory-bound, so the figure of merit is weight bytes read per step over the
device's copy bandwidth, measured in the same process: one 2 GiB device-to-device copy at a time,
host-synchronised, bytes read + written, median of 10 (copies replayed in a CUDA graph read ~20% lower
and would flatter us).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from decoding.config import ModelConfig

# Llama-family shapes for benchmarks (HF config.json field names); weights are random.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=131072),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **PRESETS[name]})


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Median device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every checkpoint tensor once (int8 weights and their scales
    included), except the embedding table, of which only the looked-up rows are read (unless the LM
    head is tied to it and reads it whole)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if model.lm_head is not None:
        emb = model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


RANDOM_CALIBRATION = "random token ids (random weights: the scales do not change plain W8A8's speed)"


def random_generator(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                     tensor_parallel_size: int = 1, all_reduce: str | None = None, quantize: str | None = None,
                     **engine_options):
    """A Generator over random weights (std 0.02, norms 1) and a placeholder tokenizer of config's vocab.

    The weights are the same for every tensor_parallel_size (each rank slices its shard out of the same
    per-tensor draws, loader.random_tensors); over N > 1, N - 1 worker processes are started.
    quantize="int8"|"w8a8"|"w8a8-smooth" quantizes the projections afterwards (decoding.quant; one
    process only). SmoothQuant's scales are calibrated on random token ids (RANDOM_CALIBRATION): with
    random weights no text means anything, and plain W8A8's speed does not depend on the scales.
    """
    import tokenizers

    from decoding.generator import Generator
    from decoding.loader import build_model, load_weights, random_tensors
    from decoding.tokenizer import Tokenizer

    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    device = torch.device(device)
    if tensor_parallel_size > 1:
        if quantize is not None:
            raise ValueError("--quantize with --tp is not supported yet")
        from decoding import parallel, workers

        runner, _ = workers.launch(parallel.LoadSpec(random_config=config, seed=seed), tensor_parallel_size, device,
                                   dtype, progress=False, all_reduce=all_reduce)
        return Generator(runner.model, Tokenizer(tok, []), runner.block_size, runner=runner, **engine_options)
    model = build_model(config, device, dtype)
    load_weights(model, random_tensors(config, device, dtype, seed))
    if quantize is not None:
        from decoding import smoothquant
        from decoding.quant import QuantConfig, quantize_model

        qc = quantize if isinstance(quantize, QuantConfig) else QuantConfig(quantize)
        windows = (smoothquant.random_windows(config.vocab_size, qc.calibration_tokens, 512, seed)
                   if qc.mode == "w8a8-smooth" else None)
        quantize_model(model, qc, calibration=windows, calibration_name=RANDOM_CALIBRATION if windows else "")
    return Generator(model, Tokenizer(tok, []), **engine_options)


@dataclass
class BenchResult:
    shape: str
    batch: int
    prompt: int
    new: int
    device: str
    dtype: str
    tok_s: float
    """Generated tokens per second over the decode steps (all sequences together)."""
    ms_per_step: float
    weight_bytes: int
    copy_GBps: float
    pct_of_copy_bw: float
    """weight_bytes / ms_per_step over copy_GBps: how close a step comes to the memory roofline."""
    ttft_ms: float
    """Prefill of the whole batch plus the first token (warm: graphs captured, kernels compiled), once,
    from submitting the requests to the host holding the first tokens."""
    prefill_ms: float
    """One prefill step of the whole batch (prompt tokens through every layer, logits of the last ones):
    median of PREFILL_REPEATS, host-synchronised around the step alone, warm (a mixed-graph replay when the
    step fits one, ModelRunner.mixed_graph_shape; else eager)."""
    startup_s: float
    """From creating the Generator (random weights) to the first token of a decode step, cold: prefill,
    graph capture and kernel compilation included (Triton's disk cache may hold earlier compiles)."""
    tensor_parallel_size: int = 1
    """With N > 1, weight_bytes and pct_of_copy_bw are those of one GPU (rank 0's shard, its copy bandwidth)."""
    all_reduce: str | None = None
    """The TP all-reduce implementation ("nccl" is gloo on CPU); None without TP."""
    all_reduce_us: float | None = None
    """One all-reduce of a decode step's [batch, hidden] activations, per call, called from Python."""
    all_reduce_graph_us: float | None = None
    """The same, per call when replayed from a CUDA graph (CUDA only)."""
    all_reduce_ms_per_step: float | None = None
    """2 all-reduces per layer at all_reduce_us (an eager step's cost), and their share of ms_per_step."""
    all_reduce_pct_of_step: float | None = None
    quantize: str | None = None
    """None (the dtype's weights), "int8", "w8a8" or "w8a8-smooth" (decoding.quant)."""
    calibration: str | None = None
    """w8a8-smooth: what the SmoothQuant scales were calibrated on."""


def run(shape: str, batch: int = 1, prompt: int = 128, new: int = 256, device: str | None = None,
        dtype: str | None = None, profile: str | None = None, progress: bool = True,
        tensor_parallel_size: int = 1, all_reduce: str | None = None, quantize: str | None = None) -> BenchResult:
    from decoding.generator import resolve_device_dtype

    dev, dt = resolve_device_dtype(device, dtype)
    config = preset_config(shape)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    # One step prefills the whole batch, so every sequence then decodes in lockstep, as in a static batch.
    with random_generator(config, dev, dt, tensor_parallel_size=tensor_parallel_size, all_reduce=all_reduce,
                          quantize=quantize, max_num_seqs=batch,
                          max_num_batched_tokens=max(batch * prompt, 256)) as gen:
        result = replace(_decode(gen, shape, config, batch, prompt, new, dev, dt, profile, progress, sync, t_start),
                         quantize=quantize, calibration=getattr(gen.model, "calibration", None))
        if tensor_parallel_size > 1:
            timing = gen.runner.bench_all_reduce(batch * config.hidden_size, dt)
            per_step = 2 * config.num_hidden_layers * timing["eager_us"] / 1e3
            result = replace(result, tensor_parallel_size=tensor_parallel_size, all_reduce=gen.runner.tp.all_reduce_name,
                             all_reduce_us=timing["eager_us"], all_reduce_graph_us=timing["graph_us"],
                             all_reduce_ms_per_step=per_step, all_reduce_pct_of_step=100 * per_step / result.ms_per_step)
    return result


def _decode(gen, shape: str, config: ModelConfig, batch: int, prompt: int, new: int, dev: torch.device,
            dt: torch.dtype, profile: str | None, progress: bool, sync, t_start: float) -> BenchResult:
    from decoding.generator import RequestHandle
    from decoding.sampling.params import SamplingParams

    def random_prompts(seed: int) -> list[str]:
        ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
        return [" ".join(f"<{i}>" for i in row) for row in ids.tolist()]

    prompts = random_prompts(1)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    # Warm-up on a batch of the same shape, two tokens each: Triton compiles for these prefill sizes and the
    # decode graph of this batch's bucket is captured (the KV pool is allocated once), all before the timed
    # run. Other tokens than the timed prompts: the same ones would hit the prefix cache, and the timed
    # prefill would compute only the last block (16 tokens, at sizes the warm-up never compiled for).
    gen.generate(random_prompts(2), params.replace(max_tokens=2))
    sync()
    startup_s = time.perf_counter() - t_start  # Generator creation to the first decoded tokens, cold
    copy_gbps = copy_bandwidth_gbps(dev, nbytes=(2 << 30) if dev.type == "cuda" else (64 << 20))
    requests = gen._make_requests(prompts, params)
    assert all(len(r.prompt_ids) == prompt for r in requests), "placeholder tokenizer must keep one id per word"
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])) if profile else None
    sync()
    last = requests[-1]
    last.stream = True
    handle = RequestHandle(gen, last)
    t0 = time.perf_counter()
    gen.engine.submit(requests)
    bar = tqdm(total=new, desc=f"decode {shape} b{batch}", unit="step", disable=not progress)
    for _ in handle:  # one piece per step (the placeholder tokenizer gives text for every token); the batch
        # runs in lockstep, so when the last request ends, all have
        bar.update(1)
        if prof is not None and bar.n == 1:
            gen.engine.call(lambda engine: prof.__enter__())  # on the engine thread, which runs the steps
    bar.close()
    if prof is not None:
        gen.engine.call(lambda engine: prof.__exit__(None, None, None))
        prof.export_chrome_trace(profile)
    times = last.seqs[0].token_times  # host-synchronised: stamped after each step's token copy
    steps = len(times)
    t_first = times[0]
    decode_s = times[-1] - t_first
    ms = decode_s / max(1, steps - 1) * 1e3
    wbytes = weight_bytes_per_step(gen.model)
    prefill_ms = _prefill_ms(gen, [r.prompt_ids for r in requests], sync)
    return BenchResult(shape, batch, prompt, new, str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                       str(dt).removeprefix("torch."), batch * (steps - 1) / decode_s, ms, wbytes, copy_gbps,
                       100 * wbytes / (ms / 1e3) / (copy_gbps * 1e9), (t_first - t0) * 1e3, prefill_ms, startup_s)


PREFILL_REPEATS = 5


def _prefill_ms(gen, prompts: list[list[int]], sync) -> float:
    """Median time of one prefill step of all the prompts (BenchResult.prefill_ms), on the engine thread
    between steps, over KV blocks taken from the pool and given back."""
    from decoding.runner import StepInput

    runner = gen.runner

    def job(engine) -> float:
        engine.make_room(sum(runner.blocks_for(len(p)) for p in prompts))
        pool = runner.cache.pool
        tables = [pool.allocate(runner.blocks_for(len(p))) for p in prompts]
        lens = [len(p) for p in prompts]
        inp = StepInput(tables, lens, [t for p in prompts for t in p], lens)
        try:
            times = []
            for _ in range(PREFILL_REPEATS + 1):  # the first one warms this exact shape up
                sync()
                t0 = time.perf_counter()
                runner.step(inp)
                sync()
                times.append(time.perf_counter() - t0)
        finally:
            for table in tables:
                pool.free(table)
        return statistics.median(times[1:]) * 1e3

    return gen.engine.call(job)


def main(args) -> None:
    if args.all_reduce is not None:  # through the environment, so that the workers see it too
        import os

        from decoding.parallel import ALL_REDUCE_ENV

        os.environ[ALL_REDUCE_ENV] = args.all_reduce
    if args.tp > 1:  # a split the model or the machine cannot take fails now, not after the TP=1 run
        from decoding.generator import resolve_device_dtype
        from decoding.parallel import rank_devices, shard_config

        rank_devices(resolve_device_dtype(args.device, args.dtype)[0], args.tp)
        shard_config(preset_config(args.shape), args.tp)
    quantize = getattr(args, "quantize", None)
    modes = quantize.split(",") if quantize else [None]  # several: each quantized model after the baseline
    from decoding.quant import MODES

    if any(m is not None and m not in MODES for m in modes):
        raise ValueError(f"--quantize takes modes of {MODES}, comma-separated, got {quantize!r}")
    compare = getattr(args, "compare_bf16", False)
    if compare and quantize is None:
        raise ValueError("--compare-bf16 needs --quantize int8|w8a8|w8a8-smooth")
    if quantize is not None and args.tp > 1:
        raise ValueError("--quantize with --tp is not supported yet")
    common = (args.shape, args.batch, args.prompt, args.new, args.device, args.dtype)
    results = []
    if compare:  # the unquantized model first, in the same process; freed before the quantized one is built
        results.append(run(*common))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for i, mode in enumerate(modes):
        if i and torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(run(*common, args.profile if i == len(modes) - 1 else None, quantize=mode))
    if args.tp > 1:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # TP=1's weights are gone: give rank 0's GPU back before the shards load
        results.append(run(args.shape, args.batch, args.prompt, args.new, args.device, args.dtype, None,
                           tensor_parallel_size=args.tp))
    for result in results:
        quantized = f" {result.quantize}" if result.quantize else ""
        print(f"{result.device} {result.dtype}{quantized}: {result.shape} batch {result.batch}, prompt "
              f"{result.prompt}, {result.new} new tokens, TP={result.tensor_parallel_size}")
        print(f"  {result.tok_s:.1f} tok/s, {result.ms_per_step:.2f} ms/step, {result.weight_bytes / 1e9:.2f} GB "
              f"weights/step{' per GPU' if result.tensor_parallel_size > 1 else ''}, {result.pct_of_copy_bw:.1f}% of "
              f"the {result.copy_GBps:.0f} GB/s copy bandwidth; TTFT {result.ttft_ms:.0f} ms; "
              f"prefill {result.prefill_ms:.1f} ms (median of {PREFILL_REPEATS}); "
              f"start-up to first decoded token {result.startup_s:.1f} s")
        if result.calibration:
            print(f"  SmoothQuant scales calibrated on {result.calibration}")
        if result.all_reduce_us is not None:
            graph = (f", {result.all_reduce_graph_us:.1f} us in a CUDA graph" if result.all_reduce_graph_us is not None
                     else "")
            print(f"  all-reduce ({result.all_reduce}) of [{result.batch}, hidden]: {result.all_reduce_us:.1f} us per "
                  f"call{graph}; x{2 * preset_config(result.shape).num_hidden_layers} per step = "
                  f"{result.all_reduce_ms_per_step:.2f} ms, {result.all_reduce_pct_of_step:.0f}% of the step")
    record = asdict(results[0])
    if compare:
        baseline, quantized_runs = results[0], results[1:]
        speedups, prefill_speedups = {}, {}
        for result in quantized_runs:
            speedups[result.quantize] = result.tok_s / baseline.tok_s
            prefill_speedups[result.quantize] = baseline.prefill_ms / result.prefill_ms
            print(f"  speed-up of {result.quantize} over {baseline.dtype}: decode {speedups[result.quantize]:.2f}x "
                  f"tok/s ({baseline.ms_per_step:.2f} -> {result.ms_per_step:.2f} ms/step); prefill "
                  f"{prefill_speedups[result.quantize]:.2f}x ({baseline.prefill_ms:.1f} -> {result.prefill_ms:.1f} "
                  f"ms for {result.batch} x {result.prompt} tokens); TTFT {baseline.ttft_ms:.0f} -> "
                  f"{result.ttft_ms:.0f} ms")
        if len(quantized_runs) == 1:
            record = {"baseline": asdict(baseline), "quantized": asdict(quantized_runs[0]),
                      "speedup": speedups[quantize], "prefill_speedup": prefill_speedups[quantize]}
        else:
            record = {"baseline": asdict(baseline), "quantized": [asdict(r) for r in quantized_runs],
                      "speedup": speedups, "prefill_speedup": prefill_speedups}
    elif len(results) > 1:
        speedup = results[1].tok_s / results[0].tok_s
        print(f"TP={args.tp} vs TP=1: {speedup:.2f}x tok/s")
        record = {"runs": [asdict(r) for r in results], "speedup": speedup}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
