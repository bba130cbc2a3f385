"""Generator: load a model once, then generate for one prompt or many, blocking or streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding import ops, quant
from decoding.cache import KVCache
from decoding.errors import DecodingError, InvalidRequest
from decoding.models.llama import LlamaModel
from decoding.runner import ModelRunner, StepInput
from decoding.sampling.candidates import rank
from decoding.sampling.params import SamplingParams
from decoding.sampling.sampler import SamplingState, sample
from decoding.sequence import Output, Sequence
from decoding.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


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


@dataclass
class _Request:
    """One prompt and its candidate sequences (one unless n > 1 or several temperatures)."""

    prompt: str
    prompt_ids: list[int]
    seqs: list[Sequence]


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
        self.runner = ModelRunner(model, block_size)
        self.model_path: str = "<in memory>"

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, progress: bool = True,
                        quantize: str | quant.QuantConfig | None = None) -> Generator:
        """Load a HF checkpoint directory, a .gguf file, or (path=None) the embedded default model.

        Parameters
        ----------
        path : directory with config.json, *.safetensors and tokenizer.json; or a .gguf file; or None.
            A directory written by `save_quantized` loads as the quantized model it holds.
        device : "cuda", "cpu", ... (default: CUDA when available).
        dtype : "bfloat16" | "float16" | "float32" | "auto" (default: bf16 on CUDA, fp32 on CPU).
        progress : show a progress bar while loading.
        quantize : None, "int8" (int8 weights, 16-bit activations) or "w8a8" (int8 weights and per-token
            int8 activations with LLM.int8() outlier columns), or a decoding.quant.QuantConfig (group
            size, outlier threshold, ...).
        """
        from decoding import loader

        device, dtype = resolve_device_dtype(device, dtype)
        if quantize in (None, "none"):
            quantize = None
        elif not isinstance(quantize, quant.QuantConfig) and (not isinstance(quantize, str)
                                                              or quantize not in quant.MODES):
            raise InvalidRequest(f"quantize must be one of {quant.MODES}, a QuantConfig or None, got {quantize!r}")
        model, tokenizer = loader.load(path, device, dtype, progress=progress, quantize=quantize)
        gen = cls(model, tokenizer)
        gen.model_path = str(path) if path is not None else "embedded: SmolLM2-135M-Instruct (GGUF Q4_1)"
        return gen

    def save_quantized(self, path: str | Path) -> Path:
        """Write this (quantized) model and its tokenizer as a checkpoint directory that
        `Generator.from_pretrained(path)` loads without quantizing again (decoding.quant.save_quantized)."""
        return quant.save_quantized(self.model, self.tokenizer, path)

    # ----------------------------------------------------------------------------- public API
    def generate(self, prompts: str | list[str], params: SamplingParams | None = None
                 ) -> Output | list[Output]:
        """Complete one prompt (returns an Output) or a list of prompts (returns a list, same order).

        With n > 1 or `temperatures`, each Output is the best candidate and lists all of them.
        """
        single = not isinstance(prompts, (list, tuple))
        requests = self._make_requests([prompts] if single else list(prompts), params)
        t_start = time.perf_counter()
        for _ in self._run(requests):
            pass
        outs = [self._output(r, t_start) for r in requests]
        return outs[0] if single else outs

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are produced.

        Text that a stop string or a cycle cut could still remove is held back until it is settled,
        so the pieces always join to exactly Output.text. Needs a single candidate (n = 1).
        """
        requests = self._make_requests([prompt], params)
        if len(requests[0].seqs) > 1:
            raise InvalidRequest("stream() returns one completion: use generate() for n > 1 or temperatures")
        seq = requests[0].seqs[0]
        run = self._run(requests)
        try:
            for _ in run:
                delta = seq.take_delta()
                if delta:
                    yield delta
        finally:
            run.close()  # the caller may stop early: free the KV blocks now, not whenever GC runs
        if seq.error is not None:  # the model failed (NaN logits): not the caller's request
            raise DecodingError(seq.error)

    def chat(self, messages: str | list[dict[str, str]], params: SamplingParams | None = None) -> Output:
        """Answer a conversation ([{"role": "user", "content": ...}, ...], or one user message as a str)."""
        return self.generate(self.render_chat(messages), params)

    def render_chat(self, messages: str | list[dict[str, str]]) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def score(self, prompt: str, completions: list[str]) -> list[float]:
        """Mean log-prob per token of each completion given the prompt (a judge for candidates).

        An empty completion scores -inf.
        """
        prompt_ids = self.tokenizer.encode(prompt)
        comp_ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in completions]
        seqs = [prompt_ids + ids for ids in comp_ids]
        cache = self.runner.ensure_cache(sum(self._blocks_for(len(s)) for s in seqs))
        tables = [cache.pool.allocate(self._blocks_for(len(s))) for s in seqs]
        try:
            lens = [len(s) for s in seqs]
            hidden = self.runner.forward_hidden(StepInput(tables, lens, [t for s in seqs for t in s], lens))
        finally:
            for table in tables:
                cache.pool.free(table)
        scores, start = [], 0
        for s, ids in zip(seqs, comp_ids):
            n_prompt = len(s) - len(ids)
            if ids:  # hidden at position p predicts token p + 1
                lp = self.model.compute_logits(hidden[start + n_prompt - 1: start + len(s) - 1]).log_softmax(-1)
                target = torch.tensor(ids, device=self.device)[:, None]
                scores.append(lp.gather(1, target).mean().item())
            else:
                scores.append(-float("inf"))
            start += len(s)
        return scores

    def info(self) -> dict:
        c = self.config
        return {
            "model": self.model_path,
            "architecture": c.model_type,
            "parameters": sum(t.numel() for n, t in self.model.state_dict().items() if not n.endswith(".scales")),
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "context_window": c.max_position_embeddings,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": None if getattr(self.model, "quant", None) is None else self.model.quant.mode,
            "op_backends": ops.active_backends(self.device),
        }

    # ----------------------------------------------------------------------------- internals
    def _blocks_for(self, num_tokens: int) -> int:
        return self.runner.blocks_for(num_tokens)

    def _make_requests(self, prompts: list[str], params: SamplingParams | None) -> list[_Request]:
        """Tokenize and validate every prompt before any work starts."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be a SamplingParams, got {type(params).__name__}")
        if not prompts:
            raise InvalidRequest("prompts: the list is empty")
        context = self.config.max_position_embeddings
        requests = []
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
            budget = min(params.max_tokens, context - len(ids))
            seqs = [Sequence(ids, params, temp, budget, self.tokenizer,
                             None if params.seed is None else params.seed + c)
                    for c, temp in enumerate(params.candidate_temperatures())]
            requests.append(_Request(prompt, ids, seqs))
        return requests

    def _fork(self, cache: KVCache, req: _Request, prompt_blocks: list[int]) -> None:
        """Give each candidate the prompt's KV: full blocks shared, the partial last block copied."""
        n_prompt, full = len(req.prompt_ids), len(req.prompt_ids) // self.block_size
        for seq in req.seqs:
            own = cache.pool.allocate(self._blocks_for(n_prompt + seq.budget) - full)
            cache.pool.share(prompt_blocks[:full])
            seq.blocks = prompt_blocks[:full] + own
            if n_prompt % self.block_size:
                for layer_cache in (*cache.k, *cache.v):
                    layer_cache[own[0]].copy_(layer_cache[prompt_blocks[full]])
        cache.pool.free(prompt_blocks)

    def _run(self, requests: list[_Request]) -> Iterator[Sequence]:
        """Prefill every prompt once, fork its candidates, then decode all unfinished sequences together;
        yields each sequence every time it gets a token. Blocks go back to the pool as sequences finish."""
        seqs = [s for r in requests for s in r.seqs]
        need = sum(self._blocks_for(len(r.prompt_ids)) + sum(self._blocks_for(len(r.prompt_ids) + s.budget)
                                                             for s in r.seqs) for r in requests)
        cache = self.runner.ensure_cache(need)
        eos = self.tokenizer.eos_token_ids
        rows = [i for i, r in enumerate(requests) for _ in r.seqs]  # candidate -> its request
        prompt_tables = [cache.pool.allocate(self._blocks_for(len(r.prompt_ids))) for r in requests]
        state = SamplingState([s.params for s in seqs], [s.temperature for s in seqs], [s.seed for s in seqs],
                              [s.prompt_ids for s in seqs], self.config.vocab_size, self.device,
                              need_logprobs=any(len(r.seqs) > 1 for r in requests))
        try:
            prompt_lens = [len(r.prompt_ids) for r in requests]
            logits = self.runner.step(StepInput(prompt_tables, prompt_lens,
                                                [t for r in requests for t in r.prompt_ids], prompt_lens))
            for req, table in zip(requests, prompt_tables):
                self._fork(cache, req, table)
            prompt_tables = []
            logits = logits.index_select(0, torch.tensor(rows, device=self.device))
            running = list(range(len(seqs)))
            while running:
                yield from self._accept(sample(logits, state), [seqs[i] for i in running], eos)
                for i in running:
                    if seqs[i].finish_reason is not None:
                        cache.pool.free(seqs[i].blocks)
                        seqs[i].blocks = []
                keep = [k for k, i in enumerate(running) if seqs[i].finish_reason is None]
                if keep and len(keep) < len(running):
                    state.select(keep)
                running = [running[k] for k in keep]
                if running:
                    active = [seqs[i] for i in running]
                    logits = self.runner.step(StepInput([s.blocks for s in active], [s.num_tokens for s in active],
                                                        [s.output_ids[-1] for s in active], [1] * len(active)))
        finally:
            for table in prompt_tables:
                cache.pool.free(table)
            for s in seqs:  # also on error or when a stream is abandoned: give every block back
                if s.blocks:
                    cache.pool.free(s.blocks)
                    s.blocks = []

    @staticmethod
    def _accept(result, active: list[Sequence], eos: list[int]) -> Iterator[Sequence]:
        """Hand each sequence its sampled token (one host sync for the whole batch)."""
        tokens = result.tokens.tolist()
        chosen = result.logprobs.tolist() if result.logprobs is not None else [None] * len(active)
        tops = [None] * len(active)
        if result.top_ids is not None:
            tops = [list(zip(i, lp)) for i, lp in zip(result.top_ids.tolist(), result.top_logprobs.tolist())]
        for seq, token, lp, top in zip(active, tokens, chosen, tops):
            if token < 0:
                seq.fail(f"the model produced NaN or infinite logits at generated token {len(seq.output_ids)}")
            else:
                seq.append(token, eos, lp, top[: seq.params.logprobs or 0] if top else None)
            yield seq

    def _output(self, req: _Request, t_start: float) -> Output:
        best = req.seqs[0]
        cands = None
        if len(req.seqs) > 1:
            cands = rank(req.prompt, req.seqs)
            best = next(s for s in req.seqs if s.output_ids == cands[0].token_ids
                        and s.temperature == cands[0].temperature)
        t_first, rate = best.timing()
        return Output(best.text, list(best.output_ids), best.finish_reason or "length", req.prompt_ids,
                      t_first - t_start if t_first else 0.0, rate,
                      best.logprobs if best.params.logprobs is not None else None, cands, best.error)
