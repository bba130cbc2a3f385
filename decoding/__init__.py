"""decoding: a low-level LLM decoding engine."""

from decoding.config import ModelConfig
from decoding.errors import CacheExhausted, CheckpointError, DecodingError, InvalidRequest
from decoding.generator import Generator, Output
from decoding.sampling.params import SamplingParams

__all__ = ["CacheExhausted", "CheckpointError", "DecodingError", "Generator", "InvalidRequest", "ModelConfig",
           "Output", "SamplingParams"]
