"""ops.py dispatch: defaults per device, DECODING_BACKEND forcing, and describe()."""

import json
import os

import pytest
import torch

from decoding import ops


def test_default_cpu_never_uses_interpreted_triton(monkeypatch):
    monkeypatch.delenv("DECODING_BACKEND", raising=False)
    expected = "cpu" if "cpu" in ops._IMPLS["rms_norm"] else "reference"
    assert ops.select("rms_norm", "cpu") == expected
    assert ops.select("fused_add_rms_norm_", "cpu") == expected


def test_cpu_only_build_claims_no_cuda():
    if ops.extension_error() is not None:
        pytest.skip(f"decoding._C not loaded: {ops.extension_error()}")
    has_cuda_kernel = ops._has_kernel("rms_norm", "CUDA")
    assert ("cuda" in ops._IMPLS["rms_norm"]) == has_cuda_kernel
    assert ops.describe()["extension"]["cuda"] == has_cuda_kernel


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_forcing_selects_backend(monkeypatch, backend):
    monkeypatch.setenv("DECODING_BACKEND", backend)
    runnable = backend in ops._IMPLS["rms_norm"] and "cpu" in ops._DEVICES.get(backend, {"cpu"})
    if not runnable:
        pytest.skip(f"{backend} cannot run on CPU tensors here")
    assert ops.select("rms_norm", "cpu") == backend
    assert ops.active_backends("cpu")["fused_add_rms_norm_"] == backend
    # Ops without that backend keep their default.
    without = [op for op, impls in ops._IMPLS.items() if backend not in impls]
    assert without or backend == "reference"
    for op in without:
        assert ops.select(op, "cpu") == ("cpu" if "cpu" in ops._IMPLS[op] else "reference")
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ops.reference.rms_norm_ref(x, w, 1e-6))


def test_forcing_a_backend_for_another_device_falls_back(monkeypatch):
    monkeypatch.setenv("DECODING_BACKEND", "cuda")
    assert ops.select("rms_norm", "cpu") in ("cpu", "reference")


def test_bad_backend_raises(monkeypatch):
    monkeypatch.setenv("DECODING_BACKEND", "tpu")
    with pytest.raises(ValueError, match="DECODING_BACKEND"):
        ops.forced_backend()
    with pytest.raises(ValueError, match="tpu"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)


def test_describe_is_json(monkeypatch):
    monkeypatch.delenv("DECODING_BACKEND", raising=False)
    info = json.loads(json.dumps(ops.describe()))
    assert info["extension"]["loaded"] == (ops.extension_error() is None)
    assert set(info["backends"]) == {"cpu", "cuda"}
    assert info["triton"]["interpreted"] == (info["triton"]["available"] and os.environ.get("TRITON_INTERPRET") == "1")
    assert info["backends"]["cpu"]["rms_norm"] != "triton"
