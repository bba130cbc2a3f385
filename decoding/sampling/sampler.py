"""Batched sampler: per-request temperature, top-k, top-p, min-p and seeds, one pass for the batch.

Order per request (shared/DESIGN.md): temperature -> top-k -> top-p -> min-p -> draw. A draw takes
argmax(probs / E) with E ~ Exp(1) i.i.d., which samples from probs exactly and needs no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampling.params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors, plus host flags to skip unused filters."""

    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] fp32, 1 = off
    min_p: torch.Tensor  # [B] fp32, 0 = off
    generators: list[torch.Generator | None]
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:
        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            temperature=t([p.temperature for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.int64),
            top_p=t([p.top_p for p in params], torch.float32),
            min_p=t([p.min_p for p in params], torch.float32),
            generators=generators,
            all_greedy=all(p.greedy for p in params),
            use_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
        )

    def select(self, rows: list[int]) -> SamplingBatch:
        """The same batch restricted to `rows` (sequences that are still running)."""
        idx = torch.tensor(rows, device=self.temperature.device)
        temps = self.temperature[idx]
        return SamplingBatch(temps, self.top_k[idx], self.top_p[idx], self.min_p[idx],
                             [self.generators[r] for r in rows], self.all_greedy,
                             self.use_top_k, self.use_top_p, self.use_min_p)


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Tempered logits [B, V] with filtered-out tokens at -inf (greedy rows only divided by 1)."""
    temps = torch.where(batch.temperature == 0, torch.ones_like(batch.temperature), batch.temperature)
    x = logits / temps[:, None]
    if batch.use_top_k:
        vocab = x.shape[-1]
        k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), torch.full_like(batch.top_k, vocab))
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if batch.use_top_p:
        probs_sorted, order = x.softmax(-1).sort(dim=-1, descending=True)
        # Drop a token when the mass of the tokens strictly before it already reaches top_p.
        drop_sorted = (probs_sorted.cumsum(-1) - probs_sorted) >= batch.top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if batch.use_min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < batch.min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return x


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Draw one token per row of logits [B, V] (fp32); returns [B] int64 on logits' device."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    probs = filter_logits(logits, batch).softmax(-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(batch.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy_tokens, drawn)
