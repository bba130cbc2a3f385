"""The one error hierarchy of `decoding` (shared/DESIGN.md, Errors)."""

from __future__ import annotations


class DecodingError(Exception):
    """Base class of every error `decoding` raises on purpose."""


class InvalidRequest(DecodingError, ValueError):
    """A bad parameter or prompt; the message names the field and the allowed range."""


class CheckpointError(DecodingError):
    """A checkpoint that is missing, corrupt, or of an unsupported architecture."""


class CacheExhausted(DecodingError):
    """A single request that can never fit in the KV cache."""
