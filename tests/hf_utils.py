"""Helpers shared by the model tests: tiny random HF checkpoints and a byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from decoding.cache import AttentionMetadata, KVCache
from decoding.models.llama import LlamaModel

BYTE_VOCAB = 256
EOS = "<|endoftext|>"


def byte_tokenizer():
    """Byte-level BPE with no merges: 256 byte tokens, then <|endoftext|> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def hf_config(variant: str, **overrides):
    """A small random transformers config of one supported variant."""
    import transformers

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, eos_token_id=BYTE_VOCAB, bos_token_id=None, tie_word_embeddings=False)
    extra = {k: overrides.pop(k) for k in list(overrides) if k in common or k == "head_dim"}
    if variant == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
    elif variant == "llama3":  # GQA, llama3 RoPE scaling, tied embeddings (Llama 3.2 style)
        common.update(tie_word_embeddings=True, num_key_value_heads=1)
        cfg = transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    elif variant == "llama_linear":
        cfg = transformers.LlamaConfig(**common, rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif variant == "mistral":  # sliding window shorter than the test sequences; explicit head_dim
        common.update(head_dim=32)
        cfg = transformers.MistralConfig(**common, sliding_window=24)
    elif variant == "qwen2":  # QKV bias
        cfg = transformers.Qwen2Config(**common)
    else:
        raise ValueError(variant)
    if extra:  # rebuild so derived fields (head_dim) follow the overridden sizes
        kwargs = {**cfg.to_dict(), **extra}
        if "head_dim" not in extra and variant != "mistral":
            kwargs.pop("head_dim", None)
        cfg = type(cfg)(**kwargs)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_random_checkpoint(variant: str, path: Path, seed: int = 0, **overrides):
    """Save a random-weight HF model of `variant` plus a byte tokenizer to `path`; return the HF model."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones test that we load them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    return model


def prefill_logits(model: LlamaModel, ids: list[int], block_size: int = 8, room: int = 64):
    """Run our model over `ids` as one prefill, leaving cache room for `room` more tokens.

    Returns (logits for every position [n, vocab], cache, blocks). The blocks are handed out in
    reverse order so that a sequence's blocks are not contiguous in the pool (as in real use).
    """
    cfg = model.config
    dev = model.embed_tokens.weight.device
    num_blocks = -(-(len(ids) + room) // block_size)
    cache = KVCache(cfg, num_blocks, block_size, dev, model.embed_tokens.weight.dtype)
    blocks = cache.pool.allocate(num_blocks)[::-1]
    meta = AttentionMetadata.build([blocks], [len(ids)], [len(ids)], block_size, dev)
    with torch.inference_mode():
        h = model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), (cache.k, cache.v), meta)
        return model.compute_logits(h), cache, blocks


def decode_logits(model: LlamaModel, cache, blocks: list[int], token: int, pos: int):
    dev = model.embed_tokens.weight.device
    meta = AttentionMetadata.build([blocks], [pos + 1], [1], cache.block_size, dev)
    with torch.inference_mode():
        h = model(torch.tensor([token], device=dev), torch.tensor([pos], device=dev), (cache.k, cache.v), meta)
        return model.compute_logits(h)[0]


def kv_pool(runner, need_blocks: int):
    """The runner's KV cache with room for need_blocks free blocks: a fresh pool when it has none or too
    small a one (tests that drive ModelRunner.step directly; the engine is idle between generate calls)."""
    if runner.cache is None or runner.cache.pool.num_free < need_blocks:
        runner.allocate_cache(max(need_blocks, 64))
    return runner.cache


def generate_in_threads(gen, prompts: list[str], params: list) -> list:
    """gen.generate(prompts[i], params[i]) from one thread per prompt, all at once; Outputs in prompt order."""
    import threading

    results: dict[int, object] = {}

    def worker(i: int) -> None:
        results[i] = gen.generate(prompts[i], params[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]
