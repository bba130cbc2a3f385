"""SamplingParams validation: every bad value raises InvalidRequest naming the field and the range."""

from __future__ import annotations

import pytest

from decoding import InvalidRequest, SamplingParams


@pytest.mark.parametrize("field, value, match", [
    ("max_tokens", 0, "max_tokens must be an int >= 1"),
    ("max_tokens", 2.5, "max_tokens must be an int"),
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("top_k", -1, "top_k must be an int >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", 1.1, r"min_p must be in \[0, 1\]"),
    ("seed", -5, "seed must be an int >= 0"),
    ("stop", [""], "non-empty str"),
    ("stop_token_ids", [-1], "stop_token_ids must be an int >= 0"),
    ("ignore_eos", "yes", "ignore_eos must be a bool"),
])
def test_bad_values(field, value, match):
    with pytest.raises(InvalidRequest, match=match):
        SamplingParams(**{field: value})


def test_invalid_request_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_p=2)


def test_normalises_sequences():
    p = SamplingParams(stop="###", stop_token_ids=[1, 2])
    assert p.stop == ("###",) and p.stop_token_ids == (1, 2)
    assert SamplingParams(temperature=0).greedy
