"""Tensor-parallel processes: torchrun launch, a killed worker, shutdown by garbage collection and at exit.

Tests that start their own TP Generator live here, apart from test_tp.py's module fixtures: only one
TP Generator can be open per process (it owns the default torch.distributed group).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decoding import DecodingError, Generator, SamplingParams
from hf_utils import save_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_life")
    save_random_checkpoint("llama", path, seed=4)
    return path


def test_torchrun_launch_matches_one_process(split_checkpoint):
    path = split_checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "decoding", "generate",
           "hello world", "--model", str(path), "--device", "cpu", "--max-tokens", "10", "--ignore-eos", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # printed by rank 0 only
    one = Generator.from_pretrained(path, device="cpu", progress=False)
    expected = one.generate("hello world", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert lines[0]["token_ids"] == expected.token_ids


def test_killed_worker_raises_decoding_error(split_checkpoint):
    gen = Generator.from_pretrained(split_checkpoint, device="cpu", progress=False, tensor_parallel_size=2)
    proc = gen.runner._group.workers[0].proc
    stream = gen.stream("hello", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    next(stream)
    os.kill(proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(DecodingError, match="worker rank 1 was killed by signal 9"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 5
    with pytest.raises(DecodingError, match="killed"):  # the Generator stays unusable, and says why
        gen.generate("x", SamplingParams(max_tokens=2))
    gen.close()


def test_garbage_collection_and_exit_stop_workers(split_checkpoint):
    gen = Generator.from_pretrained(split_checkpoint, device="cpu", progress=False, tensor_parallel_size=2)
    proc = gen.runner._group.workers[0].proc
    del gen
    gc.collect()
    assert proc.returncode == 0
    script = (f"from decoding import Generator\n"
              f"g = Generator.from_pretrained({str(split_checkpoint)!r}, device='cpu', progress=False, "
              f"tensor_parallel_size=2)\nprint(g.runner._group.workers[0].proc.pid, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    pid = int(done.stdout.split()[-1])
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
