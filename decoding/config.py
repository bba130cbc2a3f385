"""ModelConfig: the Llama-family hyper-parameters, read from a HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decoding.errors import CheckpointError

# HF `architectures` / `model_type` values that share the Llama block (flags cover the differences).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (names follow HF config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Per-head width; HF derives it as hidden_size // num_attention_heads unless given."""
    max_position_embeddings: int = 4096
    """Context window in tokens: prompt + completion must fit in it."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None, or {"rope_type": "linear"|"llama3", ...} as in HF config.json."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding matrix (SmolLM2, Llama-3.2-1B)."""
    attention_bias: bool = False
    """Biases on the q/k/v projections (Qwen2 has them; o_proj never does here)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """Each query attends to at most this many most recent keys (Mistral); None disables."""
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    """Every token id that ends a completion."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"config: rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF config.json; raises CheckpointError for other architectures."""
        arch = (hf.get("architectures") or [None])[0]
        model_type = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES and model_type not in SUPPORTED_ARCHITECTURES.values():
            raise CheckpointError(
                f"unsupported architecture {arch or model_type!r}: decoding runs "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        model_type = model_type or SUPPORTED_ARCHITECTURES[arch]
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope_scaling = hf.get("rope_scaling") or None
            if rope_scaling is not None:
                rope_scaling = dict(rope_scaling)
                rope_scaling["rope_type"] = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_theta = hf.get("rope_theta")
            if rope_theta is None:  # transformers 5 nests it under rope_parameters
                rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            if rope_scaling is None and hf.get("rope_parameters"):
                params = dict(hf["rope_parameters"])
                if params.get("rope_type", "default") != "default":
                    rope_scaling = params
            eos = hf.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            window = hf.get("sliding_window")
            if model_type == "qwen2" and not hf.get("use_sliding_window", False):
                window = None
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                model_type=model_type,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config.json is missing or has a bad value for {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise CheckpointError(f"no config.json in {path.parent}") from e
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf(hf)
