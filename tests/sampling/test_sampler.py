"""The sampler's exact semantics (shared/DESIGN.md, Sampling semantics) against direct references."""

from __future__ import annotations

import math

import pytest
import torch

from decoding import SamplingParams
from decoding.sampling.sampler import SamplingState, apply_filters, apply_penalties, gumbel_noise, row_keys, sample

V = 50


def _state(params, prompts=None, seeds=None, vocab=V, need_logprobs=False):
    temps = [p.temperature for p in params]
    return SamplingState(params, temps, seeds or [p.seed for p in params], prompts or [[0]] * len(params), vocab,
                         "cpu", need_logprobs)


def test_repetition_penalty_formula():
    """CTRL/HF: logit > 0 -> logit / r, else logit * r, once per token id in prompt or output."""
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=1.0)]
    state = _state(params, prompts=[[3, 3, 7], [3]])
    state.record(torch.tensor([11, 12]))  # generated tokens count too
    got = apply_penalties(logits, state)
    want = logits.clone()
    for j in (3, 7, 11):  # 3 appears twice in the prompt: still penalised once
        want[0, j] = logits[0, j] / 1.3 if logits[0, j] > 0 else logits[0, j] * 1.3
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_frequency_and_presence_penalty_formula():
    """OpenAI: logit[j] -= c[j] * freq + (c[j] > 0) * pres, c over generated tokens only (not the prompt)."""
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    state = _state([SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25)], prompts=[[4, 4, 4]])
    for token in (9, 9, 9, 2):
        state.record(torch.tensor([token]))
    got = apply_penalties(logits, state)
    want = logits.clone()
    want[0, 9] -= 3 * 0.5 - 0.25
    want[0, 2] -= 1 * 0.5 - 0.25
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _reference_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Kept-token probabilities for one row, written as directly as possible (float64)."""
    x = row.double() / (p.temperature or 1.0)
    order = sorted(range(len(x)), key=lambda j: -x[j].item())
    keep = set(order[: p.top_k] if p.top_k else order)
    probs = torch.softmax(torch.tensor([x[j] if j in keep else -math.inf for j in range(len(x))]), 0)
    if p.top_p < 1:
        mass, kept = 0.0, set()
        for j in order:
            if j in keep and mass < p.top_p:
                kept.add(j)
                mass += probs[j].item()
        keep = kept
    probs = torch.softmax(torch.tensor([x[j] if j in keep else -math.inf for j in range(len(x))]), 0)
    if p.min_p > 0:
        keep = {j for j in keep if probs[j] >= p.min_p * probs.max()}
    return torch.softmax(torch.tensor([x[j] if j in keep else -math.inf for j in range(len(x))]), 0)


FILTER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=10, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=20, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=1e-6),  # keeps exactly the most likely token
]


def test_filters_match_reference_batched():
    """All cases in one batch (per-row parameters), each row compared with its own reference."""
    torch.manual_seed(2)
    logits = torch.randn(len(FILTER_CASES), V) * 3
    got = apply_filters(logits, _state(FILTER_CASES)).softmax(-1).double()
    for r, p in enumerate(FILTER_CASES):
        torch.testing.assert_close(got[r], _reference_filter(logits[r], p), rtol=0, atol=1e-6, msg=str(p))


def test_greedy_rows_take_argmax_of_penalised_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=1),
              SamplingParams(temperature=0, repetition_penalty=2.0)]
    top = int(logits[2].argmax())
    result = sample(logits, _state(params, prompts=[[0], [0], [top]]))
    assert result.tokens[0] == logits[0].argmax()
    penalised = logits[2].clone()
    penalised[top] = penalised[top] / 2 if penalised[top] > 0 else penalised[top] * 2
    assert result.tokens[2] == penalised.argmax()


@pytest.mark.parametrize("p", FILTER_CASES[:6], ids=str)
def test_sampled_frequencies_match_filtered_distribution(p):
    """20k seeded draws: tokens outside the filtered set never appear; histogram matches (cosine > 0.99
    and a chi-square test at p > 1e-4 over cells with >= 5 expected draws). Fixed seeds: not flaky."""
    torch.manual_seed(4)
    row = torch.randn(V) * 2
    n = 20000
    seeds = list(range(1000, 1000 + n))
    state = _state([p] * n, seeds=seeds)
    tokens = sample(row.expand(n, V).clone(), state).tokens
    counts = torch.bincount(tokens, minlength=V).double()
    target = _reference_filter(row, p)
    assert counts[target == 0].sum() == 0
    cosine = torch.nn.functional.cosine_similarity(counts, target * n, dim=0)
    assert cosine > 0.99
    expected = target * n
    cells = expected >= 5
    chi2 = (((counts - expected) ** 2 / expected)[cells]).sum().item()
    dof = int(cells.sum()) - 1
    # Wilson-Hilferty: chi2/dof is ~normal with mean 1 - 2/(9 dof) and sd sqrt(2/(9 dof)); z < 3.7 is p > 1e-4.
    z = ((chi2 / max(dof, 1)) ** (1 / 3) - (1 - 2 / (9 * max(dof, 1)))) / math.sqrt(2 / (9 * max(dof, 1)))
    assert z < 3.7, f"chi2 {chi2:.1f} with {dof} dof"


def test_noise_is_uniform_and_depends_only_on_seed_and_step():
    keys = row_keys(torch.tensor([5, 5, 6]), torch.tensor([0, 0, 0]))
    g = gumbel_noise(keys, 4096)
    assert torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    u = torch.exp(-torch.exp(-g))  # back to uniform
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(gumbel_noise(row_keys(torch.tensor([5]), torch.tensor([1])), 4096)[0], g[0])


def test_seeded_rows_ignore_batch_composition():
    torch.manual_seed(5)
    logits = torch.randn(4, V)
    mine = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = _state([mine])
    together = _state([SamplingParams(temperature=0.3), mine, SamplingParams(temperature=0),
                       SamplingParams(temperature=2.0, top_k=3)])
    for _ in range(10):
        a = sample(logits[1:2], alone).tokens
        b = sample(logits, together).tokens
        assert a[0] == b[1]


def test_nan_and_inf_rows_are_flagged_not_sampled():
    logits = torch.randn(4, V)
    logits[1, 3] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    params = [SamplingParams(temperature=0.5, seed=1, logprobs=2)] * 4
    result = sample(logits, _state(params))
    assert result.tokens.tolist()[1:] == [-1, -1, -1] and result.tokens[0] >= 0
    assert torch.isfinite(result.logprobs[0])


def test_logprobs_come_from_the_unmodified_distribution():
    torch.manual_seed(6)
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=2.0, top_k=3, repetition_penalty=1.5, logprobs=4, seed=3),
              SamplingParams(temperature=0, logprobs=0)]
    result = sample(logits, _state(params, prompts=[[1, 2], [3]]))
    raw = logits.log_softmax(-1)
    for r in range(2):
        assert result.logprobs[r] == pytest.approx(raw[r, result.tokens[r]].item(), abs=1e-6)
    top_lp, top_ids = raw[0].topk(4)
    assert result.top_ids[0].tolist() == top_ids.tolist()
    torch.testing.assert_close(result.top_logprobs[0], top_lp)
