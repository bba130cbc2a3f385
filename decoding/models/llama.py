"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): one block, flags for the differences.

Reads top to bottom: small layers, attention, MLP, block, model. Tokens of all sequences in a step
are flattened to [num_tokens, ...] (varlen), and AttentionMetadata says which belong to which
sequence, so prefill, decode and mixed steps are the same forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from decoding import ops
from decoding.cache import AttentionMetadata
from decoding.config import ModelConfig
from decoding.reference import rope_cos_sin_cache

if TYPE_CHECKING:
    from decoding.parallel import TensorParallel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, residual stream). With a residual, adds x into it first (fused, in place)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        ops.fused_add_rms_norm_(x, residual, self.weight, self.eps)
        return x, residual


class Linear(nn.Linear):
    """nn.Linear through ops.linear: a GEMV kernel at decode batch sizes on CUDA, F.linear otherwise.

    Quantized layers (decoding.quant) replace these modules; `forward_silu_mul` is the hook the MLP
    uses for its fused gate/up activation, which such a replacement may implement or inherit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this layer's output (rows: gate | up)."""
        if self.bias is None:
            return ops.linear_silu_mul(x, self.weight)
        return ops.silu_and_mul(self(x))


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        # q, k and v projections fused into one matmul (rows: q | k | v), as loaded by loader.py.
        self.qkv = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o = Linear(self.q_size, config.hidden_size, bias=False)
        # Under tensor parallelism (set by decoding.parallel) o is row-parallel: its outputs are partial sums.
        self.tp: TensorParallel | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin_cache: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        ops.rope_and_cache_(positions, q, k, v, cos_sin_cache, k_cache, v_cache, meta.slot_mapping)
        if meta.device_split is not None:  # a graphed mixed step: decode/prefill rows split on the device
            out = ops.paged_mixed_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, self.scale, self.sliding_window, meta.max_seq_len,
                                            *meta.device_split)
        else:
            out = ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, self.scale, self.sliding_window, meta.max_seq_len,
                                      meta.query_start_loc_cpu, meta.seq_lens_cpu)
        out = self.o(out.reshape(num_tokens, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate and up projections fused (rows: gate | up).
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.tp: TensorParallel | None = None  # as in LlamaAttention: down is row-parallel under TP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.gate_up, "forward_silu_mul", None)
        out = self.down(fused(x) if fused is not None else ops.silu_and_mul(self.gate_up(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_norm(x, residual)
        x = self.attn(positions, x, cos_sin_cache, k_cache, v_cache, meta)
        x, residual = self.post_attn_norm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embedding, decoder blocks, final norm and LM head (tied to the embedding when the config says so)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False)
        # Under TP, embed_tokens and lm_head hold this rank's slice of the vocabulary (decoding.parallel).
        self.tp: TensorParallel | None = None
        # fp32 [max_positions, head_dim]: cos | sin. Not a checkpoint tensor: init_buffers() fills it.
        self.register_buffer("cos_sin_cache", torch.empty(config.max_position_embeddings, config.head_dim),
                             persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE table, e.g. after the model was materialised from the meta device."""
        device = self.cos_sin_cache.device
        if device.type == "meta":
            return
        c = self.config
        with torch.device("cpu"):
            table = rope_cos_sin_cache(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
        self.cos_sin_cache = table.to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: tuple[list[torch.Tensor], list[torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; returns the final hidden states [num_tokens, hidden_size]."""
        x = self.embed_tokens(input_ids)
        residual = None
        k_caches, v_caches = kv_caches
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            x, residual = layer(positions, x, residual, self.cos_sin_cache, k_cache, v_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden_size] -> fp32 logits [num_seqs, vocab_size]."""
        if getattr(self.lm_head, "qweight", None) is not None:  # an int8 head (decoding.quant), tied or not
            logits = self.lm_head(hidden)
        else:
            logits = ops.linear(hidden, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        if self.tp is not None:  # gathered in the model dtype: the same values as one GPU's .float()
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits.float()
