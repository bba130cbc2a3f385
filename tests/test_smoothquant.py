"""decoding.smoothquant and quantize="w8a8-smooth": the folded scales leave the fp32 model's function
unchanged (GQA's shared o scales, QKV and MLP biases), calibration finds the activation maxima, the
quantized model stays close to fp32 and beats plain W8A8 on outlier channels, quantized checkpoints
round-trip, bad input is refused, and the CLI takes the mode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hf_utils import prefill_logits, save_random_checkpoint
from safetensors import safe_open

from decoding import CheckpointError, Generator, InvalidRequest, quant, smoothquant

IDS = list(range(3, 60, 2)) + [7, 7, 200, 13]
SMALL = quant.QuantConfig("w8a8-smooth", calibration_tokens=512)  # 1 window: quick on the CPU


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random checkpoints: llama3 (GQA 4:1, tied embeddings), qwen2 (QKV bias), llama with MLP bias."""
    out = {}
    for variant, extra in (("llama3", {}), ("qwen2", {}), ("llama", {"mlp_bias": True})):
        path = tmp_path_factory.mktemp(variant)
        save_random_checkpoint(variant, path, seed=5, initializer_range=0.05, **extra)
        out[variant] = path
    return out


def _random_maxima(model, seed: int) -> dict[str, torch.Tensor]:
    """Activation maxima spread over four decades, so the scales differ a lot from channel to channel."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"attn.qkv": model.config.hidden_size, "attn.o": model.config.q_size,
             "mlp.gate_up": model.config.hidden_size, "mlp.down": model.config.intermediate_size}
    return {f"layers.{i}.{p}": 10 ** (torch.rand(n, generator=g) * 4 - 2)
            for i in range(model.config.num_hidden_layers) for p, n in sizes.items()}


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "llama"])
def test_fold_leaves_fp32_model_unchanged(models, variant):
    base = Generator.from_pretrained(models[variant], device="cpu", progress=False).model
    ref = prefill_logits(base, IDS)[0]
    smoothed = copy.deepcopy(base)
    smoothquant.fold_smoothing(smoothed, _random_maxima(base, 1), alpha=0.5)
    # Every folded tensor moved, by factors far from 1 (a fold that did nothing would pass the check below).
    block, orig = smoothed.layers[1], base.layers[1]
    for new, old in ((block.input_norm.weight, orig.input_norm.weight), (block.attn.o.weight, orig.attn.o.weight),
                     (block.mlp.gate_up.weight, orig.mlp.gate_up.weight), (block.mlp.down.weight, orig.mlp.down.weight)):
        ratio = (new / old).abs()
        assert ratio.max() / ratio.min() > 3
    got = prefill_logits(smoothed, IDS)[0]
    # fp32: the folded model rounds differently (each scaled weight once, 2^-24), not more.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_scales_formula():
    x = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w = torch.tensor([1.0, 2.0, 0.0, 0.25])
    s = smoothquant.smooth_scales(x, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 1.0, 6.0]))  # sqrt(x / w); 1 where either is 0
    torch.testing.assert_close(smoothquant.smooth_scales(x, w, 1.0), torch.tensor([4.0, 1.0, 1.0, 9.0]))
    torch.testing.assert_close(smoothquant.smooth_scales(x, w, 0.0), torch.tensor([1.0, 1.0, 1.0, 4.0]))


def test_alpha_one_flattens_the_calibrated_maxima(models):
    """With alpha = 1, s = max|X|: after folding, every smoothed input's maximum over the same windows is
    1 (for o: the maximum over each GQA group of q heads, which share one scale)."""
    model = copy.deepcopy(Generator.from_pretrained(models["llama"], device="cpu", progress=False).model)
    windows = smoothquant.random_windows(model.config.vocab_size, 96, 48, seed=2)
    before = smoothquant.input_absmax(model, windows)
    smoothquant.fold_smoothing(model, before, alpha=1.0)
    after = smoothquant.input_absmax(model, windows)
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    for name, m in after.items():
        if name.endswith("attn.o"):
            m = m.view(c.num_key_value_heads, group, c.head_dim).amax(1)
        torch.testing.assert_close(m, torch.ones_like(m), rtol=1e-4, atol=0)


def _with_outlier_channels(model, factor: float = 40.0):
    """The same fp32 function, with a few hidden channels of the qkv / gate_up inputs `factor` times larger
    (the norm weight up, the weight columns down): the LLM activation outliers that break per-token int8."""
    cols = torch.tensor([3, 17, 40])
    with torch.no_grad():
        for block in model.layers:
            for norm, linear in ((block.input_norm, block.attn.qkv), (block.post_attn_norm, block.mlp.gate_up)):
                norm.weight[cols] *= factor
                linear.weight[:, cols] /= factor
    return model


def test_w8a8_smooth_beats_plain_w8a8_on_outliers(models):
    base = _with_outlier_channels(Generator.from_pretrained(models["llama"], device="cpu", progress=False).model)
    ref = prefill_logits(base, IDS)[0]
    windows = smoothquant.random_windows(base.config.vocab_size, 128, 64, seed=3)
    errors = {}
    for name, qc, cal in (("plain", quant.QuantConfig("w8a8", threshold=0.0, min_tokens=0), None),
                          ("smooth", quant.QuantConfig("w8a8-smooth", min_tokens=0), windows)):
        model = quant.quantize_model(copy.deepcopy(base), qc, calibration=cal)
        got = prefill_logits(model, IDS)[0]
        errors[name] = ((got - ref).norm() / ref.norm()).item()
    # Relative L2 error of the logits, measured: plain 0.042 (per-token int8 of rows whose step a 40x
    # channel sets), smooth 0.0046 (LLM.int8() with threshold 6: 0.019).
    assert errors["smooth"] < 0.015 and errors["smooth"] < errors["plain"] / 3, errors


def test_generation_close_to_fp32_and_round_trip(models, tmp_path):
    base = Generator.from_pretrained(models["qwen2"], device="cpu", progress=False)
    q = Generator.from_pretrained(models["qwen2"], device="cpu", progress=False, quantize=SMALL)
    layer = q.model.layers[0].attn.qkv
    assert isinstance(layer, quant.W8A8Linear) and layer.threshold == 0.0 and q.info()["quantize"] == "w8a8-smooth"
    assert q.model.calibration.startswith(smoothquant.CALIBRATION_SOURCE)
    ref = prefill_logits(base.model, IDS)[0]
    got = prefill_logits(q.model, IDS)[0]
    assert ((got - ref).norm() / ref.norm()).item() < 0.03  # measured 0.0093; plain W8A8 0.0087
    path = q.save_quantized(tmp_path / "smooth")
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        meta = st.metadata()
    assert meta["quantize"] == "w8a8-smooth" and meta["alpha"] == "0.5" and meta["threshold"] == "0.0"
    assert meta["calibration"] == q.model.calibration
    loaded = Generator.from_pretrained(path, device="cpu", progress=False)
    assert loaded.model.quant == q.model.quant and loaded.model.calibration == q.model.calibration
    for (name, a), (_, b) in zip(q.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name  # the folded norms and v / up rows included
    assert torch.equal(prefill_logits(loaded.model, IDS)[0], got)
    with pytest.raises(CheckpointError, match="already quantized as 'w8a8-smooth'"):
        Generator.from_pretrained(path, device="cpu", progress=False, quantize="w8a8")


def test_bad_input_refused(models):
    with pytest.raises(InvalidRequest, match="alpha must be in"):
        quant.QuantConfig("w8a8-smooth", alpha=1.5)
    with pytest.raises(InvalidRequest, match="calibration_tokens"):
        quant.QuantConfig("w8a8-smooth", calibration_tokens=0)
    assert quant.QuantConfig("w8a8").threshold == 6.0 and quant.QuantConfig("w8a8-smooth").threshold == 0.0
    model = Generator.from_pretrained(models["llama"], device="cpu", progress=False).model
    with pytest.raises(InvalidRequest, match="needs calibration"):
        quant.quantize_model(copy.deepcopy(model), "w8a8-smooth")
    with pytest.raises(InvalidRequest, match="token ids must be in"):
        smoothquant.input_absmax(model, [[1, 2, model.config.vocab_size]])
    with pytest.raises(InvalidRequest, match="no empty one"):
        smoothquant.input_absmax(model, [[1, 2], []])
    with pytest.raises(InvalidRequest, match="alpha must be in"):
        smoothquant.fold_smoothing(model, {}, alpha=-0.1)
    q = quant.quantize_model(copy.deepcopy(model), "w8a8")
    with pytest.raises(InvalidRequest, match="already quantized"):
        quant.quantize_model(q, "w8a8-smooth", calibration=[[1, 2, 3]])


def test_windows_are_spread_over_the_text():
    ids = list(range(1000))
    windows = smoothquant.text_windows(ids, 300, 100)
    assert [w[0] for w in windows] == [0, 300, 600] and all(len(w) == 100 for w in windows)
    assert smoothquant.text_windows(ids[:50], 300, 100) == [ids[:50]]  # shorter than a window: all of it


def test_cli_quantize_and_bench(models, tmp_path, capsys):
    from decoding.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(out), "--model", str(models["llama"]), "--mode", "w8a8-smooth", "--alpha", "0.6",
                 "--calibration-tokens", "512", "--device", "cpu"]) == 0
    assert "wrote w8a8-smooth checkpoint" in capsys.readouterr().out
    assert main(["info", "--model", str(out), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "w8a8-smooth"
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert st.metadata()["alpha"] == "0.6" and st.metadata()["calibration_tokens"] == "512"
    out = tmp_path / "b.json"
    assert main(["bench", "--shape", "tiny", "--random-weights", "--prompt", "40", "--new", "3", "--device", "cpu",
                 "--quantize", "w8a8,w8a8-smooth", "--compare-bf16", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cpu float32 w8a8-smooth: tiny" in text and "calibrated on random token ids" in text
    assert "speed-up of w8a8 over float32" in text and "speed-up of w8a8-smooth over float32" in text
    data = json.loads(out.read_text())
    runs = {r["quantize"]: r for r in data["quantized"]}
    assert set(runs) == {"w8a8", "w8a8-smooth"} and runs["w8a8-smooth"]["calibration"].startswith("random")
    assert data["prefill_speedup"]["w8a8-smooth"] == pytest.approx(
        data["baseline"]["prefill_ms"] / runs["w8a8-smooth"]["prefill_ms"])
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "tiny", "--quantize", "w8a8,int4"])
