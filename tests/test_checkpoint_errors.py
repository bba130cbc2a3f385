"""Every way a checkpoint can be wrong gives a CheckpointError that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from decoding import CheckpointError, Generator, InvalidRequest
from decoding.config import ModelConfig
from hf_utils import save_random_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_random_checkpoint("llama", path)
    return path


@pytest.fixture
def ckpt(good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    return path


def _load(path):
    return Generator.from_pretrained(path, device="cpu", progress=False)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(tmp_path)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _load(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        _load(ckpt)


def test_unsupported_architecture(ckpt):
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        _load(ckpt)


def test_unsupported_rope_scaling(ckpt):
    _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(CheckpointError, match="rope_scaling type 'yarn' is not supported"):
        _load(ckpt)


def test_bad_head_counts():
    with pytest.raises(CheckpointError, match="multiple of num_key_value_heads"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=3, num_key_value_heads=2, head_dim=4)


def test_no_safetensors_but_pickles(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled weights are never loaded"):
        _load(ckpt)


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        _load(ckpt)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing weights for: layers\.1\.mlp\.gate_up\.weight"):
        _load(ckpt)


def test_shape_mismatch(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight: shape \(7,\) in the checkpoint, \(64,\) expected"):
        _load(ckpt)


def test_unexpected_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        _load(ckpt)


def test_sharded_with_missing_shard(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, ckpt / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _load(ckpt).generate("hi").token_ids  # sharded loads
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing from .*: model-00002-of-00002.safetensors"):
        _load(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        _load(ckpt)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        _load(f)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"device": "nonsense"}, "device"),
])
def test_bad_device_or_dtype(good, kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        Generator.from_pretrained(good, progress=False, **{"device": "cpu", **kwargs})
