"""Ranking the candidates of one request (n > 1 or multi-temperature sampling)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from decoding.errors import DecodingError
from decoding.sequence import Candidate

if TYPE_CHECKING:
    from decoding.sequence import Sequence

# Candidates that ended like this rank after every other one, whatever their score.
RANK_LAST = ("cycle", "error")


def judge_scores(judge: object, prompt: str, texts: list[str]) -> list[float]:
    """Scores from a judge: a Generator (its `score` method) or any callable (prompt, texts) -> scores."""
    try:
        scores = judge.score(prompt, texts) if hasattr(judge, "score") else judge(prompt, texts)
        scores = [float(s) for s in scores]
    except Exception as e:  # a user-supplied judge may raise anything: say where it came from
        raise DecodingError(f"judge failed: {type(e).__name__}: {e}") from e
    if len(scores) != len(texts):
        raise DecodingError(f"judge returned {len(scores)} scores for {len(texts)} candidates")
    return [s if not math.isnan(s) else -math.inf for s in scores]


def rank(prompt: str, seqs: list[Sequence]) -> list[Candidate]:
    """Candidates best first: by the judge if the params name one, else by mean or sum token log-prob;
    candidates cut for cycling (or failed) come last."""
    params = seqs[0].params
    if params.judge is not None:
        scores = judge_scores(params.judge, prompt, [s.text for s in seqs])
    elif params.rank_by == "sum_logprob":
        scores = [s.sum_logprob for s in seqs]
    else:
        scores = [s.mean_logprob for s in seqs]
    cands = [Candidate(s.text, list(s.output_ids), s.finish_reason or "length", s.temperature, score,
                       s.mean_logprob, s.sum_logprob) for s, score in zip(seqs, scores)]
    order = sorted(range(len(cands)), key=lambda i: (cands[i].finish_reason in RANK_LAST, -cands[i].score))
    return [cands[i] for i in order]
