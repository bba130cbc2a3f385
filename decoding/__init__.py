"""decoding: a low-level LLM decoding engine."""

from decoding.config import ModelConfig
from decoding.errors import CacheExhausted, CheckpointError, DecodingError, InvalidRequest

__all__ = ["CacheExhausted", "CheckpointError", "DecodingError", "InvalidRequest", "ModelConfig"]
