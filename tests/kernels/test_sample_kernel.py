"""The fused Triton sampler against the PyTorch sampler (its reference): identical tokens and state.

Both draw from the same counter-based noise, so from the same state they must pick the same token,
except when float rounding decides: an exact tie at a top-p/top-k cut, or two noisy scores within an
ulp. On random logits that is vanishingly rare, so any mismatch fails the test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from decoding import SamplingParams
from decoding.sampling.sampler import SamplingState, sample_tokens_ref as _ref_tokens

sampling = pytest.importorskip("decoding.kernels.sampling", reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.4),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.0, top_k=7),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.8, min_p=0.02),
    SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=-0.5, repetition_penalty=0.8),
    SamplingParams(temperature=0.5, top_p=1e-6),
]


def _states(vocab: int, rows: list[SamplingParams]):
    prompts = [[(7 * r + j) % vocab for j in range(20)] for r in range(len(rows))]
    state = SamplingState(rows, [p.temperature for p in rows], [100 + r for r in range(len(rows))], prompts,
                          vocab, DEVICE)
    return state, copy.deepcopy(state)


IMPLS = ["sample_tokens_split"] + (["sample_tokens_graphed"] if DEVICE == "cuda" else [])
# The interpreter runs programs one by one: on CPU split rows into 4 slices, on the GPU use the default.
SPLIT = {} if DEVICE == "cuda" else {"nparts": 4}


def _impl(name):
    fn = getattr(sampling, name)
    return (lambda logits, state: fn(logits, state, **SPLIT)) if name.endswith("split") else fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [300, 2500] if DEVICE == "cpu" else [300, 2500, 32000, 128256])
def test_fused_sampler_matches_reference(vocab, impl):
    torch.manual_seed(vocab)
    rows = PARAMS * 2
    ref_state, ker_state = _states(vocab, rows)
    for step in range(4):
        logits = torch.randn(len(rows), vocab, device=DEVICE) * 4
        want = _ref_tokens(logits.clone(), ref_state)
        got = _impl(impl)(logits.clone(), ker_state)
        assert got.tolist() == want.tolist(), f"step {step}"
    for name in ("counts", "seen", "steps"):
        assert torch.equal(getattr(ker_state, name), getattr(ref_state, name)), name


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_sampler_flags_bad_rows(impl):
    vocab = 300
    rows = [SamplingParams(temperature=0.9)] * 4
    _, state = _states(vocab, rows)
    logits = torch.randn(4, vocab, device=DEVICE)
    logits[1, 5] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    assert _impl(impl)(logits, state).tolist()[1:] == [-1, -1, -1]


@pytest.mark.parametrize("rows", [[SamplingParams(temperature=0)] * 3, [SamplingParams(temperature=0.9, top_k=5)] * 2,
                                  [SamplingParams(temperature=0.9, top_p=0.5)] * 2], ids=["greedy", "top_k", "top_p"])
def test_split_sampler_skips_unused_passes_correctly(rows):
    """Batches where some passes are skipped altogether (no top-k row, no top-p row, all greedy)."""
    torch.manual_seed(1)
    ref_state, ker_state = _states(2500, rows)
    for _ in range(3):
        logits = torch.randn(len(rows), 2500, device=DEVICE) * 4
        assert _impl("sample_tokens_split")(logits.clone(), ker_state).tolist() == \
            _ref_tokens(logits.clone(), ref_state).tolist()
