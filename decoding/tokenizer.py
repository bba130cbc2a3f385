"""Tokenizer: text <-> ids (HF `tokenizers`), end-of-sequence ids, chat template, streaming detokenizer."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers

from decoding.config import ModelConfig
from decoding.errors import CheckpointError, InvalidRequest

if TYPE_CHECKING:
    from decoding.gguf import GGUFCheckpoint

# ChatML, used when a checkpoint has <|im_start|> tokens but ships no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with what generation needs around it."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_token_ids: list[int], chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.tok = tok
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.bos_token, self.eos_token = bos_token, eos_token
        if chat_template is None and tok.token_to_id("<|im_start|>") is not None:
            chat_template = CHATML_TEMPLATE
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def line_break_ids(self) -> frozenset[int]:
        """Ids of tokens whose text holds a newline: cycle cuts end at a line break (computed once)."""
        from decoding.sampling.cycles import line_break_ids

        return line_break_ids(self.decode, self.vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages ([{"role": ..., "content": ...}]) with the checkpoint's template (Jinja, as HF)."""
        if self.chat_template is None:
            raise InvalidRequest("this model has no chat template: use generate() with a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InvalidRequest(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    @classmethod
    def from_dir(cls, path: Path, config: ModelConfig) -> Tokenizer:
        """tokenizer.json (+ tokenizer_config.json, generation_config.json) of a HF checkpoint directory."""
        file = path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(f"no tokenizer.json in {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise CheckpointError(f"cannot read {file}: {e}") from e
        tok_cfg = _read_json(path / "tokenizer_config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        eos_ids = list(config.eos_token_id)
        gen_eos = gen_cfg.get("eos_token_id")
        if gen_eos is not None:
            eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        bos, eos = _token_str(tok_cfg.get("bos_token")), _token_str(tok_cfg.get("eos_token"))
        if eos is not None and tok.token_to_id(eos) is not None:
            eos_ids.append(tok.token_to_id(eos))
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # the named-template form: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, eos_ids, template, bos, eos)

    @classmethod
    def from_gguf(cls, ckpt: GGUFCheckpoint, config: ModelConfig) -> Tokenizer:
        eos_ids = list(config.eos_token_id)
        if ckpt.eos_token is not None and ckpt.tokenizer.token_to_id(ckpt.eos_token) is not None:
            eos_ids.append(ckpt.tokenizer.token_to_id(ckpt.eos_token))
        return cls(ckpt.tokenizer, eos_ids, ckpt.chat_template, ckpt.bos_token, ckpt.eos_token)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


class Detokenizer:
    """Turns a growing list of ids into text deltas, never emitting half a UTF-8 character.

    Decodes a short window of ids before the unread ones too, so tokenizers that drop a leading
    space when decoding from mid-sequence still give the right delta (vLLM's incremental scheme).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly '')."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete multi-byte character (or nothing visible) so far
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
