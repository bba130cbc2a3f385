"""Tensor-parallel sharding rules and all-reduce selection, in one process (no workers started)."""

from __future__ import annotations

import pytest
import torch

from decoding import Generator, InvalidRequest, parallel, workers
from decoding.bench import preset_config
from decoding.config import ModelConfig


def _config(heads: int, kv: int, inter: int = 128, vocab: int = 101) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=8)


@pytest.mark.parametrize("heads,kv,world", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 8, 4), (32, 8, 2), (32, 8, 8),
                                            (12, 3, 3), (6, 2, 6)])
def test_each_rank_q_head_reads_the_kv_head_it_holds(heads, kv, world):
    """Across ranks: the global KV head each local q head reads (GQA within the shard) is the one the
    full model's q head reads."""
    full = _config(heads, kv, inter=120)
    local = parallel.shard_config(full, world)
    group, local_group = heads // kv, local.num_attention_heads // local.num_key_value_heads
    for rank in range(world):
        held = parallel.kv_heads_of_rank(full, rank, world)
        assert len(held) == local.num_key_value_heads
        for j in range(local.num_attention_heads):
            q = rank * local.num_attention_heads + j
            assert held[j // local_group] == q // group


def test_shard_tensor_pieces_rebuild_the_whole():
    full = _config(4, 2, inter=6, vocab=11)
    world = 2
    t = {n: torch.randn(*s) for n, s in {"q": (32, 64), "k": (16, 64), "o": (64, 32), "gu": (6, 64),
                                         "down": (64, 6), "emb": (11, 64), "bias": (64,)}.items()}

    def shards(name, part, x):
        return [parallel.shard_tensor(full, name, part, x, r, world) for r in range(world)]

    torch.testing.assert_close(torch.cat(shards("layers.0.attn.qkv.weight", 0, t["q"])), t["q"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(shards("layers.0.attn.qkv.weight", 1, t["k"])), t["k"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(shards("layers.0.attn.o.weight", None, t["o"]), 1), t["o"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(shards("layers.0.mlp.gate_up.weight", 0, t["gu"])), t["gu"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(shards("layers.0.mlp.down.weight", None, t["down"]), 1), t["down"],
                               rtol=0, atol=0)
    bias = shards("layers.0.mlp.down.bias", None, t["bias"])  # added once: rank 0 keeps it
    assert torch.equal(bias[0], t["bias"]) and not bias[1].any()
    emb = shards("embed_tokens.weight", None, t["emb"])  # 11 rows over 2 ranks: 6 + 5 and one zero row
    assert [e.shape[0] for e in emb] == [6, 6] and not emb[1][5].any()
    torch.testing.assert_close(torch.cat(emb)[:11], t["emb"], rtol=0, atol=0)
    norm = torch.randn(64)
    assert all(s is norm for s in shards("layers.0.input_norm.weight", None, norm))
    kv1 = _config(4, 1)  # one KV head, two ranks: both hold it
    k = torch.randn(8, 64)
    assert all(torch.equal(parallel.shard_tensor(kv1, "layers.0.attn.qkv.weight", 2, k, r, 2), k) for r in range(2))


@pytest.mark.parametrize("heads,kv,inter,world,field", [(9, 3, 1536, 2, "num_attention_heads"),
                                                        (6, 3, 128, 2, "num_key_value_heads"),
                                                        (12, 3, 128, 4, "num_key_value_heads"),
                                                        (4, 2, 130, 4, "intermediate_size")])
def test_indivisible_splits_are_rejected(heads, kv, inter, world, field):
    with pytest.raises(InvalidRequest, match=field):
        parallel.shard_config(_config(heads, kv, inter), world)


def test_bad_tensor_parallel_size_and_too_few_gpus():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(InvalidRequest, match="tensor_parallel_size"):
            Generator.from_pretrained("/nonexistent", device="cpu", tensor_parallel_size=bad)
    count = torch.cuda.device_count()
    with pytest.raises(InvalidRequest, match=f"needs GPUs cuda:0..cuda:{count}, but {count} are visible"):
        workers.launch(parallel.LoadSpec(random_config=preset_config("tiny")), count + 1, torch.device("cuda"),
                       torch.float32)
    with pytest.raises(InvalidRequest, match="num_attention_heads"):  # rejected before any worker starts
        workers.launch(parallel.LoadSpec(random_config=preset_config("smollm2-135m")), 2, torch.device("cpu"),
                       torch.float32)


def test_all_reduce_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(parallel.ALL_REDUCE_ENV, raising=False)
    assert parallel.select_all_reduce(None, cpu, 2) == "nccl"
    monkeypatch.setenv(parallel.ALL_REDUCE_ENV, "custom")
    with pytest.raises(InvalidRequest, match="DECODING_TP_ALLREDUCE must be one of"):
        parallel.select_all_reduce(None, cpu, 2)
    with pytest.raises(InvalidRequest, match="needs CUDA"):
        parallel.select_all_reduce("symm_mem", cpu, 2)
    for key in parallel.NO_MULTICAST_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="multicast must be disabled"):  # refused unless multicast is off
        parallel.select_all_reduce("symm_mem", cuda, 2)
    parallel.disable_multicast()
    assert all(__import__("os").environ[k] == v for k, v in parallel.NO_MULTICAST_ENV.items())
    assert parallel.select_all_reduce("symm_mem", cuda, 2) == "symm_mem"
    monkeypatch.setenv(parallel.SYMM_MEM_MAX_BYTES_ENV, "lots")
    with pytest.raises(InvalidRequest, match="DECODING_TP_SYMM_MEM_MAX_BYTES"):
        parallel.symm_mem_max_bytes()
