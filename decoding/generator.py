"""Generator: load a model once, then serve generation requests from any thread or asyncio task.

Every call (generate, stream, chat, their async forms, submit) becomes a Request for the engine
(decoding/engine.py), whose thread batches all live requests continuously over one paged KV cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import torch

from decoding import ops, quant
from decoding.engine import Engine, Request
from decoding.errors import DecodingError, InvalidRequest
from decoding.models.llama import LlamaModel
from decoding.runner import ModelRunner, StepInput
from decoding.sampling.candidates import rank
from decoding.sampling.params import SamplingParams
from decoding.scheduler import SchedulerConfig
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


class RequestHandle:
    """A submitted request (see Generator.submit): wait for its Output, iterate its text, or cancel it.

    Thread-safe; one consumer reads it. Example
    -------
    >>> handle = gen.submit("def f(x):", SamplingParams(max_tokens=32), stream=True)
    >>> for piece in handle: print(piece, end="")
    >>> handle.result().finish_reason
    """

    def __init__(self, gen: Generator, request: Request) -> None:
        self._gen = gen
        self._request = request
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = False
        request.sink = self._events.put

    @property
    def request_id(self) -> int:
        return self._request.id

    def done(self) -> bool:
        return self._request.finished

    def cancel(self) -> None:
        """Stop generating: the request's KV blocks are freed at the next step; result() then gives what was
        generated so far with finish_reason "cancelled"."""
        self._gen.engine.cancel(self._request)

    def result(self, timeout: float | None = None) -> Output:
        """Block until the request ends (TimeoutError after `timeout` seconds) and return its Output."""
        self._wait(timeout)
        return self._gen._output(self._request)

    def __iter__(self) -> Iterator[str]:
        """Text pieces as they are produced (needs submit(..., stream=True)); stopping early cancels the
        request and returns once its blocks are free."""
        if not self._request.stream:
            raise InvalidRequest("iterating a request needs submit(..., stream=True)")
        try:
            while not self._ended:
                kind, value = self._events.get()
                if kind == "delta":
                    yield value
                else:
                    self._ended = True
        finally:
            if not self._ended:
                self.cancel()
                self._wait(None)
        _raise_failure(self._request)

    def _wait(self, timeout: float | None) -> None:
        try:
            while not self._ended:
                if self._events.get(timeout=timeout)[0] == "done":
                    self._ended = True
        except queue.Empty:
            raise TimeoutError(f"request {self.request_id} still running after {timeout} s") from None


def _raise_failure(req: Request) -> None:
    """Streams raise what generate() reports in Output.error: the model or the engine failed."""
    if req.error is not None:
        raise DecodingError(f"generation failed: {type(req.error).__name__}: {req.error}") from req.error
    if req.seqs[0].error is not None:
        raise DecodingError(req.seqs[0].error)


class Generator:
    """A loaded model with its tokenizer and its engine, ready to serve requests.

    Engine options (keywords of the constructor and of from_pretrained, see SchedulerConfig):
    max_num_seqs, max_num_batched_tokens, num_kv_blocks, gpu_memory_utilization, enable_prefix_caching.

    Example
    -------
    >>> gen = Generator.from_pretrained()          # the embedded SmolLM2-135M-Instruct
    >>> gen.generate("def fibonacci(n):", SamplingParams(max_tokens=32, temperature=0)).text
    """

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, block_size: int = 16,
                 runner: ModelRunner | None = None, **engine_options) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config if model.tp is None else model.tp.config  # the whole model's, not a shard's
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.runner = runner if runner is not None else ModelRunner(model, block_size)
        self.model_path: str = "<in memory>"
        fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(set(engine_options) - fields)
        if unknown:
            raise InvalidRequest(f"unknown Generator option(s) {unknown}; valid: {sorted(fields)}")
        self.engine = Engine(self.runner, tokenizer.eos_token_ids, SchedulerConfig(**engine_options))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, progress: bool = True,
                        tensor_parallel_size: int = 1, quantize: str | quant.QuantConfig | None = None,
                        **engine_options) -> Generator:
        """Load a HF checkpoint directory, a .gguf file, or (path=None) the embedded default model.

        Parameters
        ----------
        path : directory with config.json, *.safetensors and tokenizer.json; or a .gguf file; or None.
            A directory written by `save_quantized` loads as the quantized model it holds.
        device : "cuda", "cpu", ... (default: CUDA when available).
        dtype : "bfloat16" | "float16" | "float32" | "auto" (default: bf16 on CUDA, fp32 on CPU).
        progress : show a progress bar while loading.
        tensor_parallel_size : split the model over this many GPUs (cuda:i .. cuda:i+N-1 for device
            "cuda:i"; CPU processes over gloo for device "cpu"). N-1 worker processes are started and
            driven from this one; under torchrun, the ranks are torchrun's (see decoding.parallel).
            Call close() (or use a with block) to stop them; garbage collection and exit also do.
        quantize : None, "int8" (int8 weights, 16-bit activations), "w8a8" (int8 weights and per-token
            int8 activations with LLM.int8() outlier columns), "w8a8-smooth" (SmoothQuant scales
            calibrated on CPython's reference docs and folded into the weights, then plain W8A8), or a
            decoding.quant.QuantConfig (group size, outlier threshold, alpha, ...).
        engine_options : SchedulerConfig fields (max_num_seqs, gpu_memory_utilization, ...).
        """
        from decoding import loader

        device, dtype = resolve_device_dtype(device, dtype)
        if quantize in (None, "none"):
            quantize = None
        elif not isinstance(quantize, quant.QuantConfig) and (not isinstance(quantize, str)
                                                              or quantize not in quant.MODES):
            raise InvalidRequest(f"quantize must be one of {quant.MODES}, a QuantConfig or None, got {quantize!r}")
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise InvalidRequest(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
        if tensor_parallel_size > 1:
            if quantize is not None:
                raise InvalidRequest("quantize with tensor_parallel_size > 1 is not supported yet: the workers load "
                                     "unquantized shards")
            from decoding import parallel, workers

            runner, tokenizer = workers.launch(parallel.LoadSpec(path=None if path is None else str(path)),
                                               tensor_parallel_size, device, dtype, progress=progress)
            gen = cls(runner.model, tokenizer, runner.block_size, runner=runner, **engine_options)
        else:
            model, tokenizer = loader.load(path, device, dtype, progress=progress, quantize=quantize)
            gen = cls(model, tokenizer, **engine_options)
        gen.model_path = str(path) if path is not None else "embedded: SmolLM2-135M-Instruct (GGUF Q4_1)"
        return gen

    def save_quantized(self, path: str | Path) -> Path:
        """Write this (quantized) model and its tokenizer as a checkpoint directory that
        `Generator.from_pretrained(path)` loads without quantizing again (decoding.quant.save_quantized)."""
        return quant.save_quantized(self.model, self.tokenizer, path)

    # ----------------------------------------------------------------------------- blocking API
    def generate(self, prompts: str | list[str], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> Output | list[Output]:
        """Complete one prompt (returns an Output) or a list of prompts (returns a list, same order).

        `params` is one SamplingParams for every prompt, or a list with one per prompt. With n > 1 or
        `temperatures`, each Output is the best candidate and lists all of them. Safe to call from many
        threads at once: every call's requests join the same running batch.
        """
        single = not isinstance(prompts, (list, tuple))
        handles = [RequestHandle(self, r) for r in self._make_requests([prompts] if single else list(prompts), params)]
        self.engine.submit([h._request for h in handles])
        try:
            outs = [h.result() for h in handles]
        finally:
            for h in handles:  # an exception (KeyboardInterrupt, a judge) must not leave requests running
                if not h.done():
                    h.cancel()
        return outs[0] if single else outs

    def submit(self, prompt: str, params: SamplingParams | None = None, stream: bool = False) -> RequestHandle:
        """Queue one prompt and return at once: a RequestHandle to wait for (result), iterate (stream=True)
        or cancel. Raises InvalidRequest / CacheExhausted here, before anything runs."""
        (req,) = self._make_requests([prompt], params, stream)
        handle = RequestHandle(self, req)
        self.engine.submit([req])
        return handle

    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are produced.

        Text that a stop string or a cycle cut could still remove is held back until it is settled,
        so the pieces always join to exactly Output.text. Needs a single candidate (n = 1). Leaving the
        loop early cancels the request and frees its KV blocks before the generator closes.
        """
        yield from self.submit(prompt, params, stream=True)

    def chat(self, messages: str | list[dict[str, str]], params: SamplingParams | None = None) -> Output:
        """Answer a conversation ([{"role": "user", "content": ...}, ...], or one user message as a str)."""
        return self.generate(self.render_chat(messages), params)

    # ----------------------------------------------------------------------------- asyncio API
    async def generate_async(self, prompts: str | list[str],
                             params: SamplingParams | list[SamplingParams] | None = None) -> Output | list[Output]:
        """`generate` for asyncio: awaits without blocking the event loop; cancelling the task cancels
        the requests (their blocks are freed at the next step)."""
        loop = asyncio.get_running_loop()
        single = not isinstance(prompts, (list, tuple))
        reqs = self._make_requests([prompts] if single else list(prompts), params)
        futs = []
        for req in reqs:
            fut = loop.create_future()
            req.sink = _done_setter(loop, fut)
            futs.append(fut)
        self.engine.submit(reqs)
        try:
            await asyncio.gather(*futs)
        finally:
            for req in reqs:
                if not req.finished:
                    self.engine.cancel(req)
        if any(r.seqs[0].params.judge is not None for r in reqs):  # a judge may be slow: not on the loop
            outs = await loop.run_in_executor(None, lambda: [self._output(r) for r in reqs])
        else:
            outs = [self._output(r) for r in reqs]
        return outs[0] if single else outs

    async def stream_async(self, prompt: str, params: SamplingParams | None = None) -> AsyncIterator[str]:
        """`stream` for asyncio: `async for piece in gen.stream_async(prompt, params)`. Breaking out of the
        loop, or cancelling the task, cancels the request."""
        loop = asyncio.get_running_loop()
        (req,) = self._make_requests([prompt], params, stream=True)
        events: asyncio.Queue = asyncio.Queue()
        req.sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        self.engine.submit([req])
        ended = False
        try:
            while not ended:
                kind, value = await events.get()
                if kind == "delta":
                    yield value
                else:
                    ended = True
        finally:
            if not ended:
                self.engine.cancel(req)
        _raise_failure(req)

    async def chat_async(self, messages: str | list[dict[str, str]], params: SamplingParams | None = None) -> Output:
        return await self.generate_async(self.render_chat(messages), params)

    # ----------------------------------------------------------------------------- service
    def metrics(self) -> dict:
        """Serving metrics as a plain dict: requests running / waiting, tokens/s, TTFT and inter-token
        latency histograms (with p50/p90/p99 estimates), KV blocks used / free, preemptions, prefix-cache
        hit rate, and totals."""
        return self.engine.metrics_snapshot()

    def register_prometheus(self, registry=None, prefix: str = "decoding") -> object:
        """Export metrics() to Prometheus (needs prometheus-client); returns the registered collector."""
        from decoding.metrics import register_prometheus

        return register_prometheus(self.engine, registry, prefix)

    def close(self) -> None:
        """Cancel every request, stop the engine thread and any tensor-parallel workers (idempotent); the
        Generator refuses new requests after."""
        self.engine.close()
        self.runner.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render_chat(self, messages: str | list[dict[str, str]]) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def score(self, prompt: str, completions: list[str]) -> list[float]:
        """Mean log-prob per token of each completion given the prompt (a judge for candidates).

        An empty completion scores -inf. Runs on the engine thread between two steps.
        """
        prompt_ids = self.tokenizer.encode(prompt)
        comp_ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in completions]
        seqs = [prompt_ids + ids for ids in comp_ids]

        def job(engine: Engine) -> list[float]:
            engine.make_room(sum(self.runner.blocks_for(len(s)) for s in seqs))
            pool = self.runner.cache.pool
            tables = [pool.allocate(self.runner.blocks_for(len(s))) for s in seqs]
            rows, start = [], 0  # the new-token index whose logits predict each completion token
            for s, ids in zip(seqs, comp_ids):
                rows.extend(range(start + len(s) - len(ids) - 1, start + len(s) - 1))
                start += len(s)
            try:
                lens = [len(s) for s in seqs]
                # logits_at: under tensor parallelism every rank runs this pass (a collective)
                logits = self.runner.logits_at(StepInput(tables, lens, [t for s in seqs for t in s], lens), rows)
            finally:
                for table in tables:
                    pool.free(table)
            lp = logits.log_softmax(-1).gather(1, torch.tensor([t for ids in comp_ids for t in ids],
                                                               device=logits.device)[:, None])[:, 0]
            scores, at = [], 0
            for ids in comp_ids:
                scores.append(lp[at: at + len(ids)].mean().item() if ids else -float("inf"))
                at += len(ids)
            return scores

        return self.engine.call(job)

    def info(self) -> dict:
        c = self.config
        return {
            "model": self.model_path,
            "architecture": c.model_type,
            # under tensor parallelism: the parameters of this process's shard (rank 0); int8 scales not counted
            "parameters" if self.model.tp is None else "parameters_rank0":
                sum(t.numel() for n, t in self.model.state_dict().items() if not n.endswith(".scales")),
            "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "vocab_size": c.vocab_size, "context_window": c.max_position_embeddings,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "tensor_parallel_size": 1 if self.model.tp is None else self.model.tp.world_size,
            "quantize": None if getattr(self.model, "quant", None) is None else self.model.quant.mode,
            "op_backends": ops.active_backends(self.device),
        }

    # ----------------------------------------------------------------------------- internals
    def _make_requests(self, prompts: list[str], params: SamplingParams | list[SamplingParams] | None,
                       stream: bool = False) -> list[Request]:
        """Tokenize and validate every prompt before any work starts."""
        if not prompts:
            raise InvalidRequest("prompts: the list is empty")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise InvalidRequest(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
            per_prompt = list(params)
        else:
            per_prompt = [params or SamplingParams()] * len(prompts)
        context = self.config.max_position_embeddings
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            if not isinstance(p, SamplingParams):
                raise InvalidRequest(f"params must be a SamplingParams, got {type(p).__name__}")
            if stream and p.num_candidates > 1:
                raise InvalidRequest("stream() returns one completion: use generate() for n > 1 or temperatures")
            if p.num_candidates > self.engine.config.max_num_seqs:
                raise InvalidRequest(f"n x temperatures is {p.num_candidates} candidates; at most max_num_seqs "
                                     f"({self.engine.config.max_num_seqs}) run at once")
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
            budget = min(p.max_tokens, context - len(ids))
            seqs = [Sequence(ids, p, temp, budget, self.tokenizer, None if p.seed is None else p.seed + c)
                    for c, temp in enumerate(p.candidate_temperatures())]
            requests.append(Request(prompt, ids, seqs, stream))
        return requests

    def _output(self, req: Request) -> Output:
        if req.error is not None:
            raise DecodingError(f"generation failed: {type(req.error).__name__}: {req.error}") from req.error
        best = req.seqs[0]
        cands = None
        if len(req.seqs) > 1:
            cands = rank(req.prompt, req.seqs)
            best = next(s for s in req.seqs if s.output_ids == cands[0].token_ids
                        and s.temperature == cands[0].temperature)
        t_first, rate = best.timing()
        return Output(best.text, list(best.output_ids), best.finish_reason or "length", req.prompt_ids,
                      t_first - req.t_arrival if t_first else 0.0, rate,
                      best.logprobs if best.params.logprobs is not None else None, cands, best.error)


def _done_setter(loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    def set_done() -> None:
        if not fut.done():
            fut.set_result(None)

    def sink(event: tuple) -> None:
        if event[0] == "done":
            loop.call_soon_threadsafe(set_done)

    return sink
