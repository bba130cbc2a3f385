"""Streaming detokenizer and chat templates."""

from __future__ import annotations

import random

from decoding.tokenizer import CHATML_TEMPLATE, Detokenizer, Tokenizer
from hf_utils import byte_tokenizer


def _tok() -> Tokenizer:
    return Tokenizer(byte_tokenizer(), [256])


def test_detokenizer_deltas_join_to_full_text():
    tok = _tok()
    text = "def f(x):\n    return 'héllo wörld' + \"😀🚀\"  # ünïcode ✓\n"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    detok = Detokenizer(tok, tok.encode("prompt "))
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_random_bytes_never_leaks_partial_characters():
    tok = _tok()
    rng = random.Random(0)
    ids = [rng.randrange(256) for _ in range(300)]
    detok = Detokenizer(tok, [])
    streamed = "".join(detok.add(i) for i in ids)
    assert tok.decode(ids).startswith(streamed)


def test_special_tokens_skipped_in_text():
    tok = _tok()
    detok = Detokenizer(tok, [])
    assert detok.add(256) == ""
    assert tok.decode(tok.encode("ab") + [256]) == "ab"


def test_chatml_fallback_and_render():
    raw = byte_tokenizer()
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(raw, [256])
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_start|>")[0] == raw.token_to_id("<|im_start|>")
