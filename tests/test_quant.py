"""decoding.quant: quantizer error bounds, the layer swap, quantized checkpoints (and bad ones), generation
with quantize= on small random HF models, and the CLI flags.

Agreement measure for generation: teacher-forced greedy agreement. The unquantized model generates
greedily; the quantized model is then run over the same prompt + tokens in one prefill and we count the
positions where its argmax equals the token the unquantized model chose. (A free-running comparison
stops meaning anything after the first divergence.) The random models use initializer_range 0.05 (HF's
default 0.02 leaves the blocks so small next to the embeddings that even a broken layer keeps most
tokens): there int8 and w8a8 agree on 0.96-0.99 of the tokens, while the same model with each layer's
scales shifted by one row agrees on 0.27-0.35 and with zeroed int8 weights on 0-0.08.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from decoding import CheckpointError, Generator, InvalidRequest, SamplingParams, quant
from decoding.config import ModelConfig
from hf_utils import prefill_logits, save_random_checkpoint


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_round_trip_error_within_half_a_step(group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different range
    w[5] = 0.0
    q, s = quant.quantize_weight(w, group_size)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.dtype == torch.float32
    assert s.shape == ((48,) if group_size is None else (48, 128 // group_size))
    err = (quant.dequantize_weight(q, s) - w).abs()
    step = s.view(48, -1).repeat_interleave(128 // s.view(48, -1).shape[1], dim=1)
    # Rounding to the nearest multiple of the step: at most half a step, plus fp32 rounding of q * s.
    assert (err <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert torch.equal(q[5], torch.zeros(128, dtype=torch.int8)) and s.view(48, -1)[5].eq(1).all()
    # Symmetric: the largest magnitude of each row (group) maps to +-127.
    assert q.view(48, -1, group_size or 128).abs().amax(-1)[torch.arange(48) != 5].eq(127).all()


def test_groups_reduce_error_on_mixed_range_rows():
    w = torch.randn(32, 256)
    w[:, :16] *= 50  # one block of large columns sets a per-channel scale that crushes the rest
    err_channel = (quant.dequantize_weight(*quant.quantize_weight(w)) - w)[:, 64:].norm()
    err_group = (quant.dequantize_weight(*quant.quantize_weight(w, 64)) - w)[:, 64:].norm()
    assert err_group < err_channel / 10  # the other groups get a ~50x finer step


def test_quant_config_validation():
    with pytest.raises(InvalidRequest, match="quantize must be one of"):
        quant.QuantConfig("int4")
    with pytest.raises(InvalidRequest, match="group_size is for quantize='int8' only"):
        quant.QuantConfig("w8a8", group_size=64)
    with pytest.raises(InvalidRequest, match="multiple of 16"):
        quant.QuantConfig("int8", group_size=24)
    with pytest.raises(InvalidRequest, match="does not divide"):
        quant.quantize_weight(torch.randn(4, 48), 32)


# ----------------------------------------------------------------------------- layers and the model swap
def test_linear_layers_match_dequantized_linear():
    lin = torch.nn.Linear(64, 40, bias=True)
    x = torch.randn(3, 5, 64)
    for layer in (quant.Int8Linear.from_linear(lin), quant.Int8Linear.from_linear(lin, group_size=32)):
        expected = torch.nn.functional.linear(x, quant.dequantize_weight(layer.qweight, layer.scales), lin.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    w8a8 = quant.W8A8Linear.from_linear(lin, threshold=6.0, max_outliers=8, min_tokens=4)
    small, large = torch.randn(4, 64), torch.randn(9, 64)
    torch.testing.assert_close(w8a8(small), quant.Int8Linear.from_linear(lin)(small))  # <= min_tokens: W8A16
    from decoding.reference import w8a8_linear_ref

    torch.testing.assert_close(w8a8(large), w8a8_linear_ref(large, w8a8.qweight, w8a8.scales, w8a8.bias, 6.0, 8))


def test_forward_silu_mul_is_the_unfused_activation():
    """The MLP's hook (LlamaMLP calls gate_up.forward_silu_mul): silu_and_mul of the layer's own output, for
    leading batch dims, group-wise scales, a bias (unfused), and W8A8 on both sides of min_tokens."""
    from decoding import ops

    lin, lin_bias = torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(64, 48, bias=True)
    layers = [quant.Int8Linear.from_linear(lin), quant.Int8Linear.from_linear(lin, group_size=32),
              quant.Int8Linear.from_linear(lin_bias),
              quant.W8A8Linear.from_linear(lin, threshold=6.0, max_outliers=8, min_tokens=4)]
    for layer in layers:
        for x in (torch.randn(2, 1, 64), torch.randn(3, 5, 64)):  # 2 and 15 tokens
            out = layer.forward_silu_mul(x)
            assert out.shape == (*x.shape[:-1], 24)
            assert torch.equal(out, ops.silu_and_mul(layer(x)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_random_checkpoint("llama", path, seed=3, initializer_range=0.05)
    return path


def _greedy_agreement(base: Generator, other: Generator, prompts: list[str], n: int) -> float:
    """Teacher-forced greedy agreement of `other` with `base` over n generated tokens per prompt."""
    agree = total = 0
    for prompt in prompts:
        out = base.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, cycle_min_repeats=0))
        ids = out.prompt_token_ids + out.token_ids
        logits, _, _ = prefill_logits(other.model, ids)
        predicted = logits[len(out.prompt_token_ids) - 1: -1].argmax(-1)
        agree += (predicted == torch.tensor(out.token_ids, device=predicted.device)).sum().item()
        total += len(out.token_ids)
    return agree / total


PROMPTS = ["def f(x):", "The cat sat on", "import numpy as np\n", "1, 2, 3, 4,"]


@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_generation_agrees_with_unquantized(ckpt, mode):
    base = Generator.from_pretrained(ckpt, device="cpu", progress=False)
    q = Generator.from_pretrained(ckpt, device="cpu", progress=False, quantize=mode)
    if mode == "w8a8":  # quantize activations at every size, decode steps included
        for layer in q.model.modules():
            if isinstance(layer, quant.W8A8Linear):
                layer.min_tokens = 0
    assert isinstance(q.model.layers[0].attn.qkv, quant.W8A8Linear if mode == "w8a8" else quant.Int8Linear)
    assert isinstance(q.model.lm_head, quant.Int8Linear) and q.info()["quantize"] == mode  # W8A16 in every mode
    rate = _greedy_agreement(base, q, PROMPTS, 24)
    assert rate >= 0.9, rate  # measured 0.98 (int8), 0.96 (w8a8); broken scales: 0.35
    # Logits of one prefill stay close: measured relative L2 error 0.011 (int8), 0.016 (w8a8); with the
    # scales shifted by one row it is 0.33.
    ids = base.tokenizer.encode("def f(x): return x * 2")
    ref = prefill_logits(base.model, ids)[0]
    got = prefill_logits(q.model, ids)[0]
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_decode_steps_agree_with_prefill_on_cuda(ckpt):
    """On CUDA, decode steps run the W8A16 GEMVs (gate/up fused with SiLU·up) in CUDA graphs and a prefill
    runs the Triton GEMM: teacher-forced, the quantized model's prefill picks the tokens its own decode
    steps chose, up to bf16 near-ties (with a broken layer, agreement falls to ~0.3: module docstring)."""
    from decoding import ops

    if ops.select("w8a16_linear_silu_mul", "cuda") != "cuda":
        pytest.skip("no CUDA W8A16 GEMV in this build")
    q = Generator.from_pretrained(ckpt, device="cuda", progress=False, quantize="int8")
    assert _greedy_agreement(q, q, PROMPTS, 24) >= 0.9


@pytest.mark.parametrize("variant", ["llama", "llama3"])  # an LM head of its own; one tied to the embedding
def test_lm_head_quantized_or_kept(tmp_path, variant):
    """QuantConfig.lm_head (default on) makes the head W8A16; a tied head gets an int8 copy and the embedding
    stays 16-bit. The logits are those of the dequantized head over the same hidden states; with
    lm_head=False the head is the model's own (nn.Linear, or None when tied) and its logits are bit-identical
    to those of a model with every projection but the head quantized the same way."""
    save_random_checkpoint(variant, tmp_path, seed=2, initializer_range=0.05)
    tied = variant == "llama3"
    on = Generator.from_pretrained(tmp_path, device="cpu", progress=False, quantize="int8")
    off = Generator.from_pretrained(tmp_path, device="cpu", progress=False,
                                    quantize=quant.QuantConfig("int8", lm_head=False))
    base = Generator.from_pretrained(tmp_path, device="cpu", progress=False)
    head = on.model.lm_head
    assert isinstance(head, quant.Int8Linear) and on.model.embed_tokens.weight.dtype == base.model.embed_tokens.weight.dtype
    assert torch.equal(on.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert off.model.lm_head is None if tied else isinstance(off.model.lm_head, torch.nn.Linear)
    w16 = base.model.embed_tokens.weight if tied else base.model.lm_head.weight
    q, s = quant.quantize_weight(w16)
    assert torch.equal(head.qweight, q) and torch.equal(head.scales, s)
    hidden = torch.randn(3, on.config.hidden_size)
    expected = torch.nn.functional.linear(hidden, quant.dequantize_weight(q, s))
    torch.testing.assert_close(on.model.compute_logits(hidden), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(off.model.compute_logits(hidden), base.model.compute_logits(hidden))
    assert _greedy_agreement(base, on, PROMPTS[:2], 16) >= 0.9
    # The head's bytes are counted once, the embedding's not at all (a step reads only its looked-up rows).
    from decoding.bench import weight_bytes_per_step

    emb = base.model.embed_tokens.weight
    assert weight_bytes_per_step(on.model) == weight_bytes_per_step(off.model) - (
        emb.numel() * emb.element_size() - q.numel() - s.numel() * 4)


def test_lm_head_round_trip_and_old_checkpoints(tmp_path):
    """A tied int8 head is saved and loaded back (as lm_head.qweight/.scales); a checkpoint written before
    the lm_head key (no key in the metadata, no head tensors) still loads, with its 16-bit head."""
    save_random_checkpoint("llama3", tmp_path / "hf", seed=4, initializer_range=0.05)
    q = Generator.from_pretrained(tmp_path / "hf", device="cpu", progress=False, quantize="int8")
    path = q.save_quantized(tmp_path / "q")
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        assert st.metadata()["lm_head"] == "1" and "lm_head.qweight" in set(st.keys())
    loaded = Generator.from_pretrained(path, device="cpu", progress=False)
    assert loaded.model.quant.lm_head and torch.equal(loaded.model.lm_head.qweight, q.model.lm_head.qweight)
    params = SamplingParams(max_tokens=12, temperature=0)
    assert loaded.generate("def f(x):", params).token_ids == q.generate("def f(x):", params).token_ids
    old = Generator.from_pretrained(tmp_path / "hf", device="cpu", progress=False,
                                    quantize=quant.QuantConfig("int8", lm_head=False))
    old_path = old.save_quantized(tmp_path / "old")
    with safe_open(str(old_path / "model.safetensors"), framework="pt") as st:
        meta = {k: v for k, v in st.metadata().items() if k != "lm_head"}
    _rewrite(old_path, tmp_path / "old2", metadata=meta)
    reloaded = Generator.from_pretrained(tmp_path / "old2", device="cpu", progress=False)
    assert not reloaded.model.quant.lm_head and reloaded.model.lm_head is None
    assert reloaded.generate("def f(x):", params).token_ids == old.generate("def f(x):", params).token_ids


def test_quantize_at_load_qwen2_bias(tmp_path):
    save_random_checkpoint("qwen2", tmp_path, seed=1, initializer_range=0.05)  # QKV bias goes into the int8 layer as a 16-bit bias
    base = Generator.from_pretrained(tmp_path, device="cpu", progress=False)
    q = Generator.from_pretrained(tmp_path, device="cpu", progress=False, quantize="int8")
    assert q.model.layers[0].attn.qkv.bias is not None
    assert _greedy_agreement(base, q, PROMPTS[:2], 16) >= 0.9


def test_group_wise_through_from_pretrained(ckpt, tmp_path):
    base = Generator.from_pretrained(ckpt, device="cpu", progress=False)
    q = Generator.from_pretrained(ckpt, device="cpu", progress=False, quantize=quant.QuantConfig("int8", group_size=32))
    assert q.model.layers[0].mlp.down.scales.shape == (64, 128 // 32)
    assert _greedy_agreement(base, q, PROMPTS[:2], 16) >= 0.9
    loaded = Generator.from_pretrained(q.save_quantized(tmp_path / "g32"), device="cpu", progress=False)
    assert loaded.model.quant.group_size == 32
    assert torch.equal(loaded.model.layers[1].mlp.down.scales, q.model.layers[1].mlp.down.scales)


def test_quantize_model_refuses_twice_and_bad_groups(ckpt):
    gen = Generator.from_pretrained(ckpt, device="cpu", progress=False, quantize="int8")
    with pytest.raises(InvalidRequest, match="already quantized"):
        quant.quantize_model(gen.model, "int8")
    plain = Generator.from_pretrained(ckpt, device="cpu", progress=False)
    with pytest.raises(InvalidRequest, match="does not divide"):
        quant.quantize_model(plain.model, quant.QuantConfig("int8", group_size=48))
    with pytest.raises(InvalidRequest, match="quantize must be one of"):
        Generator.from_pretrained(ckpt, device="cpu", progress=False, quantize="int4")


def test_odd_shapes_fall_back_to_a_correct_path():
    """K = 72 is no multiple of the GEMV's 16-weight chunks: the layer still computes the right thing."""
    lin = torch.nn.Linear(72, 24)
    layer = quant.Int8Linear.from_linear(lin)
    x = torch.randn(2, 72)
    expected = torch.nn.functional.linear(x, quant.dequantize_weight(layer.qweight, layer.scales), lin.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- quantized checkpoints
@pytest.fixture(scope="module")
def saved(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    gen = Generator.from_pretrained(ckpt, device="cpu", progress=False, quantize="int8")
    gen.save_quantized(out)
    return gen, out


def test_save_load_round_trip(saved):
    gen, path = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        meta = st.metadata()
        keys = set(st.keys())
    assert meta[quant.FORMAT_KEY] == "int8" and meta["quantize"] == "int8"
    assert "layers.0.attn.qkv.qweight" in keys and "layers.0.attn.qkv.scales" in keys
    loaded = Generator.from_pretrained(path, device="cpu", progress=False)
    assert loaded.model.quant == gen.model.quant
    for (name, a), (name_b, b) in zip(gen.model.state_dict().items(), loaded.model.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    assert ModelConfig.from_file(path / "config.json") == gen.config.__class__.from_hf(
        quant.config_to_hf(gen.config)) and loaded.tokenizer.eos_token_ids == gen.tokenizer.eos_token_ids
    params = SamplingParams(max_tokens=12, temperature=0)
    assert loaded.generate("def f(x):", params).token_ids == gen.generate("def f(x):", params).token_ids


def test_load_quantized_as_the_other_mode_is_refused(saved):
    with pytest.raises(CheckpointError, match="already quantized as 'int8'"):
        Generator.from_pretrained(saved[1], device="cpu", progress=False, quantize="w8a8")
    assert Generator.from_pretrained(saved[1], device="cpu", progress=False, quantize="int8").model.quant.mode == "int8"


def _rewrite(src, dst, drop=(), metadata=None):
    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), framework="pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys() if k not in drop}
        meta = st.metadata() if metadata is None else metadata
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


def test_missing_scales_refused(saved, tmp_path):
    path = _rewrite(saved[1], tmp_path / "c", drop=("layers.1.mlp.down.scales",))
    with pytest.raises(CheckpointError, match=r"missing tensors: layers\.1\.mlp\.down\.scales"):
        Generator.from_pretrained(path, device="cpu", progress=False)


@pytest.mark.parametrize("change,match", [
    ({quant.FORMAT_KEY: "int4"}, "format marker 'int4'"),
    ({quant.VERSION_KEY: "2"}, "version '2'"),
    ({"quantize": "fp8"}, "bad quantization metadata"),
])
def test_mismatched_marker_refused(saved, tmp_path, change, match):
    with safe_open(str(saved[1] / "model.safetensors"), framework="pt") as st:
        meta = {**st.metadata(), **change}
    path = _rewrite(saved[1], tmp_path / "c", metadata=meta)
    with pytest.raises(CheckpointError, match=match):
        Generator.from_pretrained(path, device="cpu", progress=False)


def test_missing_marker_refused(saved, tmp_path):
    path = _rewrite(saved[1], tmp_path / "c", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no decoding int8 format marker"):
        Generator.from_pretrained(path, device="cpu", progress=False)


def test_wrong_dtype_of_qweight_refused(saved, tmp_path):
    path = _rewrite(saved[1], tmp_path / "c")
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
        meta = st.metadata()
    tensors["layers.0.attn.o.qweight"] = tensors["layers.0.attn.o.qweight"].float()
    save_file(tensors, str(path / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="layers.0.attn.o.qweight: dtype torch.float32"):
        Generator.from_pretrained(path, device="cpu", progress=False)


def test_save_unquantized_refused(ckpt, tmp_path):
    with pytest.raises(InvalidRequest, match="needs a quantized model"):
        Generator.from_pretrained(ckpt, device="cpu", progress=False).save_quantized(tmp_path / "x")


# ----------------------------------------------------------------------------- CLI
def test_cli_generate_quantize_and_save(ckpt, tmp_path, capsys):
    from decoding.cli import main

    args = ["--model", str(ckpt), "--device", "cpu", "--max-tokens", "6", "--json"]
    assert main(["generate", "def f(x):", *args, "--quantize", "int8"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 6
    out = tmp_path / "q"
    assert main(["quantize", str(out), "--model", str(ckpt), "--mode", "w8a8", "--device", "cpu"]) == 0
    assert "wrote w8a8 checkpoint" in capsys.readouterr().out
    assert main(["info", "--model", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "w8a8"


def test_cli_bench_compare(tmp_path, capsys):
    from decoding.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--shape", "tiny", "--random-weights", "--prompt", "8", "--new", "4", "--device", "cpu",
                 "--quantize", "int8", "--compare-bf16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cpu float32: tiny" in text and "cpu float32 int8: tiny" in text and "speed-up of int8" in text
    data = json.loads(out.read_text())
    assert data["quantized"]["quantize"] == "int8" and data["baseline"]["quantize"] is None
    assert data["speedup"] == pytest.approx(data["quantized"]["tok_s"] / data["baseline"]["tok_s"])
    # int8 weights (1 byte) + fp32 scales are counted, not the fp32 weights they replace.
    assert data["quantized"]["weight_bytes"] < data["baseline"]["weight_bytes"]
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "tiny", "--quantize", "int4"])
