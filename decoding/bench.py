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
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from decoding.config import ModelConfig

# Llama-family shapes for benchmarks (HF config.json field names); weights are random.
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=8192),
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


def random_generator(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                     quantize: str | None = None):
    """A Generator over random weights (std 0.02, norms 1) and a placeholder tokenizer of config's vocab;
    quantize="int8"|"w8a8" quantizes the projections afterwards (decoding.quant)."""
    import tokenizers

    from decoding.generator import Generator
    from decoding.loader import build_model
    from decoding.tokenizer import Tokenizer

    model = build_model(config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if quantize is not None:
        from decoding.quant import quantize_model

        quantize_model(model, quantize)
    vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Generator(model, Tokenizer(tok, []))


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
    """Prefill of the whole batch plus the first token."""
    quantize: str | None = None
    """None (the dtype's weights), "int8" or "w8a8" (decoding.quant)."""


def run(shape: str, batch: int = 1, prompt: int = 128, new: int = 256, device: str | None = None,
        dtype: str | None = None, profile: str | None = None, progress: bool = True,
        quantize: str | None = None) -> BenchResult:
    from decoding.generator import resolve_device_dtype
    from decoding.sampling.params import SamplingParams

    dev, dt = resolve_device_dtype(device, dtype)
    config = preset_config(shape)
    gen = random_generator(config, dev, dt, quantize=quantize)
    copy_gbps = copy_bandwidth_gbps(dev, nbytes=(2 << 30) if dev.type == "cuda" else (64 << 20))
    ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, cycle_min_repeats=0)
    gen.generate([" ".join(f"<{i}>" for i in row[:8]) for row in ids[:1]],
                 params.replace(max_tokens=2))  # warm-up: kernels compiled, caches allocated
    requests = gen._make_requests([" ".join(f"<{i}>" for i in row) for row in ids], params)
    assert all(len(r.prompt_ids) == prompt for r in requests), "placeholder tokenizer must keep one id per word"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])) if profile else None
    sync()
    t0 = time.perf_counter()
    t_first, steps = None, 0
    bar = tqdm(total=new, desc=f"decode {shape} b{batch}{' ' + quantize if quantize else ''}", unit="step",
               disable=not progress)
    seqs = [s for r in requests for s in r.seqs]
    for seq in gen._run(requests):
        if seq is not seqs[-1]:
            continue  # one event per step: the last sequence of the batch got its token
        steps += 1
        bar.update(1)
        if steps == 1:
            sync()
            t_first = time.perf_counter()
            if prof is not None:
                prof.__enter__()
    sync()
    t_end = time.perf_counter()
    bar.close()
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(profile)
    decode_s = t_end - t_first
    ms = decode_s / max(1, steps - 1) * 1e3
    wbytes = weight_bytes_per_step(gen.model)
    return BenchResult(shape, batch, prompt, new, str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
                       str(dt).removeprefix("torch."), batch * (steps - 1) / decode_s, ms, wbytes, copy_gbps,
                       100 * wbytes / (ms / 1e3) / (copy_gbps * 1e9), (t_first - t0) * 1e3, quantize)


def _print(result: BenchResult) -> None:
    mode = f" {result.quantize}" if result.quantize else ""
    print(f"{result.device} {result.dtype}{mode}: {result.shape} batch {result.batch}, prompt {result.prompt}, "
          f"{result.new} new tokens")
    print(f"  {result.tok_s:.1f} tok/s, {result.ms_per_step:.2f} ms/step, {result.weight_bytes / 1e9:.2f} GB "
          f"weights/step, {result.pct_of_copy_bw:.1f}% of the {result.copy_GBps:.0f} GB/s copy bandwidth; "
          f"TTFT {result.ttft_ms:.0f} ms")


def main(args) -> None:
    quantize = getattr(args, "quantize", None)
    compare = getattr(args, "compare_bf16", False)
    if compare and quantize is None:
        raise ValueError("--compare-bf16 needs --quantize int8|w8a8")
    common = (args.shape, args.batch, args.prompt, args.new, args.device, args.dtype)
    baseline = None
    if compare:  # the unquantized model first, in the same process; freed before the quantized one is built
        baseline = run(*common)
        _print(baseline)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result = run(*common, args.profile, quantize=quantize)
    _print(result)
    record = asdict(result)
    if baseline is not None:
        speedup = result.tok_s / baseline.tok_s
        print(f"  speed-up of {quantize} over {baseline.dtype}: {speedup:.2f}x tok/s "
              f"({baseline.ms_per_step:.2f} -> {result.ms_per_step:.2f} ms/step; TTFT {baseline.ttft_ms:.0f} -> "
              f"{result.ttft_ms:.0f} ms)")
        record = {"baseline": asdict(baseline), "quantized": asdict(result), "speedup": speedup}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
