"""Generator: load a model once, then generate for one prompt or many, blocking or streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from decoding import ops
from decoding.cache import AttentionMetadata, KVCache
from decoding.errors import InvalidRequest
from decoding.models.llama import LlamaModel
from decoding.sampling.params import SamplingParams
from decoding.sampling.sampler import SamplingBatch, sample
from decoding.tokenizer import Detokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class Output:
    """One finished completion."""

    text: str
    """The completion (special tokens and any stop string left out)."""
    token_ids: list[int]
    """Generated token ids, including the end-of-sequence or stop token if one ended it."""
    finish_reason: str
    """"stop" (end-of-sequence, a stop token or stop string) or "length" (max_tokens or the context window)."""
    prompt_token_ids: list[int] = field(repr=False)
    time_to_first_token: float = 0.0
    """Seconds from the call to the first generated token (includes the prefill)."""
    tokens_per_second: float = 0.0
    """Decode rate after the first token: (tokens - 1) / seconds between first and last; 0 for one token."""


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None
                         ) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA if available, else CPU; bfloat16 on CUDA, float32 on CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InvalidRequest(f"device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device: 'cuda' was asked for but torch sees no CUDA device")
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InvalidRequest(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidRequest(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return device, dtype


class _Sequence:
    """One request's state during generation."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, budget: int,
                 tokenizer: Tokenizer, device: torch.device) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget  # tokens it may still generate (max_tokens, clipped to the context)
        self.output_ids: list[int] = []
        self.blocks: list[int] = []
        self.detok = Detokenizer(tokenizer, prompt_ids)
        self.text = ""
        self.emitted = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self.t_first = self.t_last = 0.0
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def append(self, token: int, eos_ids: list[int]) -> None:
        """Add one generated token and decide whether the sequence is finished."""
        now = time.perf_counter()
        if not self.output_ids:
            self.t_first = now
        self.t_last = now
        self.output_ids.append(token)
        p = self.params
        if (token in eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = "stop"
            return
        search_from = max(0, len(self.text) - max((len(s) for s in p.stop), default=0))
        self.text += self.detok.add(token)
        for s in p.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return
        if len(self.output_ids) >= self.budget:
            self.finish_reason = "length"

    def take_delta(self) -> str:
        """Text not yet streamed, holding back a tail that could still become a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def output(self, t_start: float) -> Output:
        n = len(self.output_ids)
        rate = (n - 1) / (self.t_last - self.t_first) if n > 1 and self.t_last > self.t_first else 0.0
        return Output(self.text, list(self.output_ids), self.finish_reason or "length", self.prompt_ids,
                      self.t_first - t_start, rate)


class Generator:
    """A loaded model with its tokenizer, ready to generate.

    Example
    -------
    >>> gen = Generator.from_pretrained()          # the embedded SmolLM2-135M-Instruct
    >>> gen.generate("def fibonacci(n):", SamplingParams(max_tokens=32, temperature=0)).text
    """

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, block_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self._cache: KVCache | None = None
        self.model_path: str = "<in memory>"

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, progress: bool = True) -> Generator:
        """Load a HF checkpoint directory, a .gguf file, or (path=None) the embedded default model.

        Parameters
        ----------
        path : directory with config.json, *.safetensors and tokenizer.json; or a .gguf file; or None.
        device : "cuda", "cpu", ... (default: CUDA when available).
        dtype : "bfloat16" | "float16" | "float32" | "auto" (default: bf16 on CUDA, fp32 on CPU).
        progress : show a progress bar while loading.
        """
        from decoding import loader

        device, dtype = resolve_device_dtype(device, dtype)
        model, tokenizer = loader.load(path, device, dtype, progress=progress)
        gen = cls(model, tokenizer)
        gen.model_path = str(path) if path is not None else "embedded: SmolLM2-135M-Instruct (GGUF Q4_1)"
        return gen

    # ----------------------------------------------------------------------------- public API
    def generate(self, prompts: str | list[str], params: SamplingParams | None = None
                 ) -> Output | list[Output]:
        """Complete one prompt (returns an Output) or a list of prompts (returns a list, same order)."""
        single = not isinstance(prompts, (list, tuple))
        seqs = self._make_sequences([prompts] if single else list(prompts), params)
        t_start = time.perf_counter()
        for _ in self._run(seqs):
            pass
        outs = [s.output(t_start) for s in seqs]
        return outs[0] if single else outs

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are produced."""
        seqs = self._make_sequences([prompt], params)
        run = self._run(seqs)
        try:
            for seq in run:
                delta = seq.take_delta()
                if delta:
                    yield delta
        finally:
            run.close()  # the caller may stop early: free the KV blocks now, not whenever GC runs

    def chat(self, messages: str | list[dict[str, str]], params: SamplingParams | None = None) -> Output:
        """Answer a conversation ([{"role": "user", "content": ...}, ...], or one user message as a str)."""
        return self.generate(self.render_chat(messages), params)

    def render_chat(self, messages: str | list[dict[str, str]]) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def info(self) -> dict:
        c = self.config
        return {
            "model": self.model_path,
            "architecture": c.model_type,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "context_window": c.max_position_embeddings,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "op_backends": ops.active_backends(self.device),
        }

    # ----------------------------------------------------------------------------- internals
    def _make_sequences(self, prompts: list[str], params: SamplingParams | None) -> list[_Sequence]:
        """Tokenize and validate every prompt before any work starts."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompts:
            raise InvalidRequest("prompts: the list is empty")
        context = self.config.max_position_embeddings
        seqs = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidRequest(f"prompt {i} must be a str, got {type(prompt).__name__}")
            if not prompt:
                raise InvalidRequest(f"prompt {i} is empty")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest(f"prompt {i} encodes to no tokens")
            if len(ids) >= context:
                raise InvalidRequest(
                    f"prompt {i} has {len(ids)} tokens; the context window is {context} tokens "
                    f"(prompt + completion), so the prompt must be under {context}")
            seqs.append(_Sequence(ids, params, min(params.max_tokens, context - len(ids)),
                                  self.tokenizer, self.device))
        return seqs

    def _ensure_cache(self, seqs: list[_Sequence]) -> KVCache:
        # Static batching: every sequence gets the blocks for its whole budget up front.
        need = sum(-(-(len(s.prompt_ids) + s.budget) // self.block_size) for s in seqs)
        if self._cache is None or self._cache.num_blocks < need:
            self._cache = None  # free the old pool before taking a bigger one
            self._cache = KVCache(self.config, need, self.block_size, self.device, self.dtype)
        for s in seqs:
            s.blocks = self._cache.pool.allocate(self._cache.blocks_for(len(s.prompt_ids) + s.budget))
        return self._cache

    @torch.inference_mode()
    def _forward(self, cache: KVCache, seqs: list[_Sequence], input_ids: list[int], query_lens: list[int]
                 ) -> torch.Tensor:
        """One model step over the new tokens of `seqs`; returns last-token logits [len(seqs), vocab]."""
        seq_lens = [s.num_tokens for s in seqs]
        positions = [p for n, q in zip(seq_lens, query_lens) for p in range(n - q, n)]
        meta = AttentionMetadata.build([s.blocks for s in seqs], seq_lens, query_lens, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(self.device, non_blocking=True)
        hidden = self.model(ids, pos, (cache.k, cache.v), meta)
        last = torch.tensor(query_lens).cumsum(0).sub(1).to(self.device)
        return self.model.compute_logits(hidden[last])

    def _run(self, seqs: list[_Sequence]) -> Iterator[_Sequence]:
        """Prefill all sequences, then decode the unfinished ones together; yields each sequence
        every time it gets a token. Blocks go back to the pool as sequences finish."""
        cache = self._ensure_cache(seqs)
        eos = self.tokenizer.eos_token_ids
        batch = SamplingBatch.build([s.params for s in seqs], [s.generator for s in seqs], self.device)
        try:
            running = list(range(len(seqs)))
            logits = self._forward(cache, seqs, [t for s in seqs for t in s.prompt_ids],
                                   [len(s.prompt_ids) for s in seqs])
            while running:
                tokens = sample(logits, batch.select(running) if len(running) < len(seqs) else batch).tolist()
                for i, token in zip(running, tokens):
                    seqs[i].append(token, eos)
                    yield seqs[i]
                for i in running:
                    if seqs[i].finish_reason is not None:
                        cache.pool.free(seqs[i].blocks)
                        seqs[i].blocks = []
                running = [i for i in running if seqs[i].finish_reason is None]
                if running:
                    active = [seqs[i] for i in running]
                    logits = self._forward(cache, active, [s.output_ids[-1] for s in active], [1] * len(active))
        finally:
            for s in seqs:  # also on error or when a stream is abandoned: give every block back
                if s.blocks:
                    cache.pool.free(s.blocks)
                    s.blocks = []
