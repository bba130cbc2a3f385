"""Sampling parameters and the batched sampler."""

from decoding.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
