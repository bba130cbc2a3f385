"""SamplingState rows that come and go (continuous batching): padded to a bucket, swapped on removal,
re-added with their history after preemption. Each row must draw exactly the tokens it draws alone."""

from __future__ import annotations

import pytest
import torch

from decoding import SamplingParams
from decoding.sampling.sampler import SamplingState, bucket, sample_tokens_ref

V = 300
ROWS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.4),
    SamplingParams(temperature=0.8, seed=3),
    SamplingParams(temperature=1.0, top_k=7, seed=4),
    SamplingParams(temperature=0.7, top_p=0.9, seed=5),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.8, min_p=0.02, seed=6),
    SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=-0.5, repetition_penalty=0.8, seed=7),
    SamplingParams(temperature=0.9, frequency_penalty=1.5, seed=8),
]
PROMPTS = [[(7 * r + j) % V for j in range(5 + r)] for r in range(len(ROWS))]
# Which rows are in the batch at each step: rows join, leave (finished or preempted) and come back.
SCHEDULE = [[0, 1], [0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [2, 4, 5, 6, 7], [0, 2, 5, 7], [0, 1, 3, 4, 5, 6, 7],
            [3, 7]]


def _logits(row: int, k: int) -> torch.Tensor:
    """The logits row `row` sees at its k-th draw (the same whatever the batch)."""
    g = torch.Generator().manual_seed(1000 * row + k)
    return torch.randn(V, generator=g) * 4


def _simulate(draw, pad: bool, capacity: int) -> dict[int, list[int]]:
    state = SamplingState([], [], [], [], V, "cpu", capacity=capacity, pad_to_bucket=pad)
    outputs: dict[int, list[int]] = {r: [] for r in range(len(ROWS))}
    for active in SCHEDULE:
        gone = [i for i, owner in enumerate(state.owners) if owner not in active]
        state.remove(gone)
        new = [r for r in active if r not in state.owners]
        state.add_rows([(ROWS[r], ROWS[r].temperature, ROWS[r].seed, PROMPTS[r], outputs[r], r, False) for r in new])
        assert state.width == (bucket(len(active)) if pad else len(active))
        logits = torch.stack([_logits(r, len(outputs[r])) for r in state.owners])
        if state.width > len(active):  # padding rows get some finite logits; their tokens are ignored
            logits = torch.cat([logits, logits[:1].expand(state.width - len(active), V)])
        tokens = draw(logits, state).tolist()
        for r, t in zip(state.owners, tokens):
            outputs[r].append(t)
    return outputs


def _alone() -> dict[int, list[int]]:
    """Each row in a state of its own, sampled only at the steps it is active."""
    outputs = {}
    for r, p in enumerate(ROWS):
        state = SamplingState([p], [p.temperature], [p.seed], [PROMPTS[r]], V, "cpu")
        outputs[r] = [sample_tokens_ref(_logits(r, k)[None], state).item()
                      for k in range(sum(r in active for active in SCHEDULE))]
    return outputs


@pytest.mark.parametrize("pad, capacity", [(False, 0), (True, 2), (True, 8)])
def test_reference_sampler_rows_come_and_go(pad, capacity):
    assert _simulate(sample_tokens_ref, pad, capacity) == _alone()


def test_split_kernel_rows_come_and_go_padded():
    sampling = pytest.importorskip("decoding.kernels.sampling", reason="needs triton")
    nparts = {} if torch.cuda.is_available() else {"nparts": 2}  # the interpreter runs programs one by one
    assert _simulate(lambda x, s: sampling.sample_tokens_split(x, s, **nparts), True, 4) == _alone()


def test_remove_moves_last_rows_into_holes_and_resets_the_tail():
    state = SamplingState(ROWS[:5], [p.temperature for p in ROWS[:5]], [p.seed for p in ROWS[:5]], PROMPTS[:5], V,
                          "cpu", pad_to_bucket=True)
    seen_row4 = state.seen[4].clone()
    state.remove([1, 2])
    assert state.owners == [0, 3, 4] and state.width == 4
    assert torch.equal(state.seen[2], seen_row4)
    assert state.temperature.tolist() == [0.0, 1.0, pytest.approx(0.7), 0.0]  # the padding row is inert
    assert state.top_k.tolist() == [0, 7, 0, 0] and state.top_p[3].item() == 1.0


def test_readded_row_has_its_history():
    p = SamplingParams(temperature=1.0, frequency_penalty=0.5, repetition_penalty=1.2, seed=1)
    state = SamplingState([], [], [], [], V, "cpu")
    state.add(p, 1.0, 1, [3, 4], output_ids=[9, 9, 2], owner="x")
    assert state.steps.tolist() == [3]
    assert state.counts[0, 9].item() == 2 and state.counts[0, 2].item() == 1 and state.counts.sum().item() == 3
    assert state.seen[0].nonzero().flatten().tolist() == [2, 3, 4, 9]
