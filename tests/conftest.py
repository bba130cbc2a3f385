"""Test-wide setup: Triton's interpreter on CPU-only machines, and skipping `gpu` tests without CUDA.

TRITON_INTERPRET must be set before `triton` itself is imported, not just before the kernels are
decorated: `@triton.jit` picks InterpretedFunction from the variable at decoration time, and the
helpers Triton decorates when it is imported (the combine functions behind tl.sum, ...) must be
interpreted too, or a kernel fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
pytest imports this file before any test module, so setting it here at import time is early enough.
On a machine with CUDA it is left unset, so Triton compiles for the GPU; an explicit value always wins.
"""

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise pytest.UsageError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
