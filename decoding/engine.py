"""The engine: one thread that owns the model, the KV cache and the sampler, and runs steps while there is work.

Callers (any thread, or an asyncio loop) submit Requests and read their events from per-request queues;
the engine thread admits them at the next step (decoding/scheduler.py), runs the step, samples, and
posts text pieces and completion. The thread is a daemon, started on the first submission and ended
after a short idle time, at `close()` or at interpreter exit, so it never keeps a process alive.

Steps overlap the host's work: the engine launches step t+1 before it reads step t's tokens. Step t's
tokens stay on the device (ModelRunner.record_tokens) and step t+1 takes them from there
(StepInput.prev_rows); their host copy is read afterwards, while the GPU runs step t+1, and only then are
they appended, checked for stops and streamed. A sequence that step t finished has drawn one more token
in step t+1, which is dropped. DECODING_OVERLAP=0 turns this off (each step's tokens are read before the
next step is scheduled).
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future

import torch

from decoding.cache import KVCache, blocks_for, bytes_per_block
from decoding.errors import CacheExhausted, DecodingError
from decoding.metrics import Metrics
from decoding.nosync import to_device
from decoding.runner import ModelRunner, StepInput
from decoding.sampling.sampler import SamplingState, bucket, sample
from decoding.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from decoding.sequence import Sequence
from decoding.steplog import StepLog

_IDLE_EXIT_S = 2.0  # the thread ends after this long without work; the next submission starts another
_CPU_KV_BYTES = 1 << 30
_ids = itertools.count()
_ENGINES: weakref.WeakSet = weakref.WeakSet()


class Request:
    """One prompt, its candidate sequences, and where its events go (`sink`, called on the engine thread).

    Events: ("delta", text) while streaming, then ("done", None) once every candidate has finished and
    its KV blocks are back in the pool.
    """

    def __init__(self, prompt: str, prompt_ids: list[int], seqs: list[Sequence], stream: bool = False,
                 sink: Callable[[tuple], None] | None = None) -> None:
        self.id = next(_ids)
        self.prompt, self.prompt_ids, self.seqs = prompt, prompt_ids, seqs
        self.stream = stream
        self.sink = sink
        self.t_arrival = time.perf_counter()
        self.t_first = 0.0
        self.finished = False
        self.error: BaseException | None = None  # an engine failure (a NaN row is the sequence's own error)
        self.unfinished = len(seqs)
        for seq in seqs:
            seq.request = self
        seqs[0].forks = list(seqs[1:])

    def post(self, event: tuple) -> None:
        if self.sink is not None:
            try:
                self.sink(event)
            except RuntimeError:  # an asyncio loop that closed meanwhile: nobody is listening any more
                pass


class _Drawn:
    """A step's tokens on their way to the host: which sequence drew each row, the host copies (async on
    CUDA, complete once `ready` has passed)."""

    def __init__(self, owners: list[Sequence], result, device: torch.device) -> None:
        self.owners = owners
        n = len(owners)
        parts = (result.tokens, result.logprobs, result.top_ids, result.top_logprobs)
        if device.type == "cuda":
            # non_blocking to the CPU lands in pinned memory; `ready` says when it has
            self.tokens, self.logprobs, self.top_ids, self.top_logprobs = (
                None if t is None else t[:n].to("cpu", non_blocking=True) for t in parts)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.tokens, self.logprobs, self.top_ids, self.top_logprobs = (
                None if t is None else t[:n].clone() for t in parts)
            self.ready = None

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def overlap_enabled() -> bool:
    return os.environ.get("DECODING_OVERLAP", "1") != "0"


class Engine:
    """Continuous batching over a ModelRunner (see the module docstring)."""

    def __init__(self, runner: ModelRunner, eos_token_ids: list[int], config: SchedulerConfig) -> None:
        self.runner = runner
        self.eos = list(eos_token_ids)
        self.config = config
        self.scheduler: Scheduler | None = None
        self.sampler: SamplingState | None = None
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._jobs: list[tuple[Callable, Future]] = []
        self._live: dict[int, Request] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._closed = False
        self._drawn: _Drawn | None = None  # the last step's tokens, not yet read (engine thread only)
        self.step_log: StepLog | None = None  # record_steps() turns it on
        self.overlap = (overlap_enabled() and runner.takes_device_tokens
                        and bucket(config.max_num_seqs) <= runner.prev_capacity)
        _ENGINES.add(self)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Size and allocate the KV cache (once); submission calls this itself."""
        with self._cond:
            if self.scheduler is None:
                self._allocate()

    @property
    def num_blocks(self) -> int:
        self.start()
        return self.scheduler.pool.num_blocks

    def submit(self, requests: list[Request]) -> None:
        """Queue requests for the next step; raises CacheExhausted for one that could never fit."""
        with self._cond:
            if self._closed:
                raise DecodingError("this Generator is closed")
            if self.scheduler is None:
                self._allocate()
            for req in requests:
                seq = req.seqs[0]
                need = self.scheduler.blocks_needed(len(req.prompt_ids), seq.budget, len(req.seqs))
                if need > self.scheduler.pool.num_blocks:
                    raise CacheExhausted(
                        f"request needs {need} KV blocks of {self.runner.block_size} tokens (prompt {len(req.prompt_ids)} "
                        f"+ up to {seq.budget} new tokens, {len(req.seqs)} candidate(s)) but the whole cache has "
                        f"{self.scheduler.pool.num_blocks}: lower max_tokens, or raise num_kv_blocks / "
                        f"gpu_memory_utilization")
            self._inbox.extend(requests)
            self.metrics.requests_submitted += len(requests)
            self.metrics.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
            self._wake()

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step boundary: its blocks are freed, then it posts ("done", None)."""
        with self._cond:
            if not request.finished:
                self._cancels.append(request)
                self._wake()

    def call(self, fn: Callable[[Engine], object]) -> object:
        """Run fn(engine) on the engine thread between two steps (it may use the KV pool) and return its result."""
        if threading.current_thread() is self._thread:
            return fn(self)
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise DecodingError("this Generator is closed")
            if self.scheduler is None:
                self._allocate()
            self._jobs.append((fn, fut))
            self._wake()
        return fut.result()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every request, stop the thread, refuse new work."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return
        self._release()

    def _release(self) -> None:
        """Free the KV pool (and the graphs over it) this engine allocated, so that a closed Generator holds
        no GPU memory even while something still references it."""
        runner = self.runner
        if self.scheduler is not None and runner.cache is not None and runner.cache.pool is self.scheduler.pool:
            runner.free_cache()
        self.sampler = None

    def record_steps(self, capacity: int = 100_000) -> StepLog:
        """Log the next steps (at most the newest `capacity`) into a new StepLog (decoding/steplog.py) and
        return it; `self.step_log = None` turns the log off again."""
        self.step_log = StepLog(capacity, cuda=self.runner.device.type == "cuda")
        return self.step_log

    def metrics_snapshot(self) -> dict:
        m, now = self.metrics, time.perf_counter()
        sched = self.scheduler
        pool = sched.pool if sched is not None else None
        free = pool.num_free if pool is not None else 0
        total = pool.num_blocks if pool is not None else 0
        queried = sched.prefix_queried_tokens if sched is not None else 0
        return {
            "requests_running": len(sched.running) if sched is not None else 0,
            "requests_waiting": (len(sched.waiting) if sched is not None else 0) + len(self._inbox),
            "requests_submitted_total": m.requests_submitted,
            "requests_finished_total": m.requests_finished,
            "requests_cancelled_total": m.requests_cancelled,
            "requests_failed_total": m.requests_failed,
            "prompt_tokens_total": m.prompt_tokens,
            "generation_tokens_total": m.generation_tokens,
            "prefill_tokens_total": sched.prefill_tokens if sched is not None else 0,
            "steps_total": m.steps,
            "tokens_per_second": m.tokens_per_second(now),
            "time_to_first_token": m.ttft.snapshot(),
            "inter_token_latency": m.itl.snapshot(),
            "kv_blocks_total": total,
            "kv_blocks_used": total - free,
            "kv_blocks_free": free,
            "kv_blocks_cached": pool.num_cached if pool is not None else 0,
            "preemptions_total": sched.num_preemptions if sched is not None else 0,
            "prefix_cache_hit_rate": sched.prefix_hit_tokens / queried if queried else 0.0,
        }

    def _wake(self) -> None:  # with self._cond held
        if self._thread is None:
            self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self), self._cond),
                                            name="decoding-engine", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # ------------------------------------------------------------------ KV cache size
    def _allocate(self) -> None:
        cfg, runner = self.config, self.runner
        per_block = bytes_per_block(runner.config, runner.block_size, runner.dtype)
        context_blocks = blocks_for(runner.config.max_position_embeddings, runner.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif runner.device.type == "cuda":
            num_blocks = self._gpu_blocks(per_block)
        else:
            num_blocks = max(min(_CPU_KV_BYTES // per_block, 64 * context_blocks), context_blocks + 1)
        cache = runner.allocate_cache(num_blocks)
        self.scheduler = Scheduler(cfg, cache.pool, runner.block_size)
        self.sampler = SamplingState([], [], [], [], runner.config.vocab_size, runner.device,
                                     capacity=bucket(cfg.max_num_seqs), pad_to_bucket=runner.device.type == "cuda")

    def _gpu_blocks(self, per_block: int) -> int:
        """What gpu_memory_utilization leaves for KV after the weights, a profiled prefill step of
        max_num_batched_tokens tokens and the sampler's buffers at max_num_seqs rows (as vLLM does)."""
        runner, cfg, dev = self.runner, self.config, self.runner.device
        tokens = cfg.max_num_batched_tokens
        torch.cuda.synchronize(dev)
        gc.collect()  # a Generator dropped without close() (a reference cycle) still holds its KV pool
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        # The costliest step: chunks of `tokens` new tokens at the end of full-context sequences (attention
        # over the whole context); every sequence reads the same scratch blocks, whose contents do not matter.
        context = runner.config.max_position_embeddings
        nb = blocks_for(context, runner.block_size)
        chunks = [min(context, tokens - start) for start in range(0, tokens, context)]
        runner.cache = KVCache(runner.config, nb, runner.block_size, dev, runner.dtype)
        graphs, runner.cuda_graphs = runner.cuda_graphs, False  # eager: no graph captured over this scratch cache
        try:
            runner.step(StepInput([list(range(nb))] * len(chunks), [context] * len(chunks), [0] * tokens, chunks))
        finally:
            runner.cuda_graphs = graphs
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before - nb * per_block
        runner.cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        # fp32 logits, their gathered copy, the graphed sampler's input and scratch, log-softmax; counts + seen
        sampler = bucket(cfg.max_num_seqs) * runner.config.vocab_size * (5 * 4 + 5)
        budget = total * cfg.gpu_memory_utilization - (total - free) - peak - sampler
        if budget < per_block:
            raise CacheExhausted(
                f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x gpu_memory_utilization "
                f"{cfg.gpu_memory_utilization} minus {(total - free) / 2**30:.1f} GiB in use, {peak / 2**30:.2f} GiB "
                f"for a {tokens}-token step and {sampler / 2**30:.2f} GiB for the sampler; close other "
                f"Generators of this process, or pass num_kv_blocks or a higher gpu_memory_utilization")
        return int(budget // per_block)

    # ------------------------------------------------------------------ the engine thread
    def _pending(self) -> bool:  # with self._cond held
        return bool(self._inbox or self._cancels or self._jobs or self._closed or self.scheduler.has_work
                    or self._drawn is not None)

    def _take_pending(self) -> tuple:  # with self._cond held
        taken = (self._inbox, self._cancels, self._jobs, self._closed)
        self._inbox, self._cancels, self._jobs = [], [], []
        return taken

    def _work(self, inbox: list[Request], cancels: list[Request], jobs: list, closed: bool) -> bool:
        """One turn of the loop: new requests, cancellations, jobs, then one step. True: the thread ends."""
        try:
            with torch.inference_mode():
                for req in inbox:
                    self._live[req.id] = req
                    self.scheduler.add(req.seqs[0])
                for req in cancels:
                    self._abort(req, "cancelled")
                if jobs:
                    self._read_drawn()  # jobs see every sequence with all its tokens
                for fn, fut in jobs:
                    self._run_job(fn, fut)
                if closed:
                    self._drawn = None
                    for req in list(self._live.values()):
                        self._abort(req, "cancelled")
                    with self._cond:
                        self._thread = None
                        for fn, fut in self._jobs:
                            fut.set_exception(DecodingError("this Generator is closed"))
                        self._jobs = []
                    return True
                if self.scheduler.has_work:
                    self._step()
                else:
                    self._read_drawn()
        except Exception as e:  # a bug or a device error: fail what is live, keep serving
            self._drawn = None
            with torch.inference_mode():  # the sampler's tables are inference tensors
                for req in list(self._live.values()):
                    try:
                        self._abort(req, "error", e)
                    except Exception:  # the request must still end, whatever state the engine is in
                        req.error = req.error or e
                        req.finished = True
                        self._live.pop(req.id, None)
                        req.post(("done", None))
        return False

    def _run_job(self, fn: Callable, fut: Future) -> None:
        try:
            fut.set_result(fn(self))
        except Exception as e:
            fut.set_exception(e)

    def make_room(self, num_blocks: int) -> None:
        """Preempt running sequences (newest first) until num_blocks blocks are free (for jobs)."""
        pool = self.scheduler.pool
        if num_blocks > pool.num_blocks:
            raise CacheExhausted(f"needs {num_blocks} KV blocks, the whole cache has {pool.num_blocks}")
        out = SchedulerOutput()
        while pool.num_free < num_blocks and self.scheduler.running:
            self.scheduler.preempt(self.scheduler.running[-1], out)
        self._drop_rows(out.preempted)

    def _step(self) -> None:
        sched, state, log = self.scheduler, self.sampler, self.step_log
        t_schedule = time.perf_counter() if log is not None else 0.0
        out = sched.schedule()
        self._drop_rows(out.preempted)
        items = out.scheduled
        if not items:
            if self._drawn is not None:  # the sequences left wait for the tokens drawn last step
                self._read_drawn()
            elif not out.preempted:  # would spin: a scheduler bug, failed loudly by the loop rather than hung
                raise RuntimeError("the scheduler made no progress")
            return
        try:
            inp = self._step_input(items)
            rec = None
            if log is not None:
                prefill = [it.num_tokens for it in items if not it.seq.decoding]
                context = sum(it.seq.num_computed + 1 for it in items if it.seq.decoding)
                rec = log.begin(t_schedule, len(items) - len(prefill), sum(prefill), len(prefill), context,
                                self.runner.uses_graph(inp))
            logits = self.runner.step(inp)
        except Exception as e:
            self._read_drawn()
            for req in {id(it.seq.request): it.seq.request for it in items}.values():
                self._abort(req, "error", e)
            return
        row_of = {id(it.seq): i for i, it in enumerate(items)}
        copies = []
        for i, it in enumerate(items):
            for fork, dst in it.forks:
                row_of[id(fork)] = i
                if dst is not None:
                    copies.append((it.seq.blocks[it.seq.num_tokens // self.runner.block_size], dst))
        if copies:
            self.runner.copy_blocks(copies)
        joined = sched.step_done(out)
        state.add_rows([(s.params, s.temperature, s.seed, s.prompt_ids, s.output_ids, s, len(s.request.seqs) > 1)
                        for s in joined])
        drawn = None
        if state.num_rows:
            # A row whose sequence is not in this step (its last token is drawn and pending) draws from
            # another row's logits; it is left out of `owners`, so that token is ignored, and its sampler
            # state does not matter: the sequence finishes when its pending token is read.
            rows = [row_of.get(id(s), -1) for s in state.owners]
            owners = [s if r >= 0 else None for s, r in zip(state.owners, rows)]
            fill = next((r for r in rows if r >= 0), None)
            if fill is not None:
                rows = [r if r >= 0 else fill for r in rows]
                if state.width == len(rows) == logits.shape[0] and rows == list(range(len(rows))):
                    selected = logits
                else:
                    rows += [rows[0]] * (state.width - len(rows))  # padding rows: sampled, then ignored
                    selected = logits.index_select(0, to_device(rows, torch.int64, logits.device))
                result = sample(selected, state)
                if self.overlap:
                    self.runner.record_tokens(result.tokens)
                drawn = _Drawn(owners, result, self.runner.device)
                for seq in owners:
                    if seq is not None:
                        seq.pending += 1
        if rec is not None:
            log.end(rec)
        self._read_drawn(rec)  # the previous step's tokens: read while the GPU runs this step
        self._drawn = drawn
        if not self.overlap:
            self._read_drawn()

    def _step_input(self, items: list) -> StepInput:
        """The step's StepInput; a pending token (drawn last step, not read yet) comes from the device."""
        ids, prev_rows = [], None
        for it in items:
            seq = it.seq
            ids.extend(seq.token_slice(seq.num_computed, seq.num_computed + it.num_tokens))
            if ids[-1] < 0:  # only a decoding sequence's last token can be pending
                if prev_rows is None:
                    prev_rows = [-1] * (len(ids) - 1)
                    row_of = {id(s): i for i, s in enumerate(self._drawn.owners) if s is not None}
                prev_rows.append(row_of[id(seq)])
                ids[-1] = 0
            elif prev_rows is not None:
                prev_rows.extend([-1] * it.num_tokens)
        return StepInput([it.seq.blocks for it in items], [it.seq.num_computed + it.num_tokens for it in items],
                         ids, [it.num_tokens for it in items], prev_rows,
                         self.config.max_num_batched_tokens)  # full steps get a graph of their size

    def _read_drawn(self, rec=None) -> None:
        """Read the last step's tokens (waits for their copy) and hand them to their sequences; `rec`, the
        step log's record of the step just issued, gets the times of the wait's and the hand-over's ends."""
        drawn, self._drawn = self._drawn, None
        if drawn is not None:
            drawn.wait()
            if rec is not None:
                rec.t_waited = time.perf_counter()
            self._accept(drawn)
            if rec is not None:
                rec.t_accepted = time.perf_counter()

    def _accept(self, drawn: _Drawn) -> None:
        """Hand each sequence its token, retire finished ones. Rows of sequences that have finished (or
        were preempted: their token is drawn again after the recompute) since the draw are skipped."""
        state = self.sampler
        owners = drawn.owners
        n = len(owners)
        tokens = drawn.tokens.tolist()
        chosen = drawn.logprobs.tolist() if drawn.logprobs is not None else [None] * n
        tops = [None] * n
        if drawn.top_ids is not None:
            tops = [list(zip(i, lp)) for i, lp in zip(drawn.top_ids.tolist(), drawn.top_logprobs.tolist())]
        now = time.perf_counter()
        done = []
        live = 0
        for seq, token, lp, top in zip(owners, tokens, chosen, tops):
            if seq is None or seq.pending == 0 or seq.finish_reason is not None:
                continue
            seq.pending -= 1
            live += 1
            if token < 0:
                seq.fail(f"the model produced NaN or infinite logits at generated token {len(seq.output_ids)}")
            else:
                seq.append(token, self.eos, lp, top[: seq.params.logprobs or 0] if top else None)
            req = seq.request
            if not req.t_first:
                req.t_first = now
                self.metrics.ttft.observe(now - req.t_arrival)
            elif len(seq.token_times) > 1:
                self.metrics.itl.observe(seq.token_times[-1] - seq.token_times[-2])
            if req.stream:
                delta = seq.take_delta()
                if delta:
                    req.post(("delta", delta))
            if seq.finish_reason is not None:
                done.append(seq)
        self.metrics.record_step(now, live)
        if done:
            gone = {id(s) for s in done}
            state.remove([i for i, o in enumerate(state.owners) if id(o) in gone])
            self.scheduler.finish(done)
            for seq in done:
                seq.request.unfinished -= 1
                if seq.request.unfinished == 0:
                    self._complete(seq.request)

    def _drop_rows(self, seqs: list[Sequence]) -> None:
        if seqs:
            gone = {id(s) for s in seqs}
            self.sampler.remove([i for i, o in enumerate(self.sampler.owners) if id(o) in gone])

    def _abort(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request now (cancelled, or failed): its unfinished candidates stop and free their blocks."""
        if req.finished:
            return
        live = [s for s in req.seqs if s.finish_reason is None]
        for seq in live:
            seq.finish_reason = reason
            if error is not None:
                seq.error = f"{type(error).__name__}: {error}"
        if error is not None:
            req.error = error
        self._drop_rows(live)
        self.scheduler.finish(live)
        self._complete(req, reason)

    def _complete(self, req: Request, reason: str | None = None) -> None:
        req.finished = True
        self._live.pop(req.id, None)
        m = self.metrics
        if reason == "cancelled":
            m.requests_cancelled += 1
        elif reason == "error":
            m.requests_failed += 1
        else:
            m.requests_finished += 1
        for seq in req.seqs:
            if req.stream:
                delta = seq.take_delta()
                if delta:
                    req.post(("delta", delta))
        req.post(("done", None))


def _engine_thread(ref: weakref.ref, cond: threading.Condition) -> None:
    """The engine loop. It holds its Engine only while there is work, so a Generator its owner dropped is
    freed (model and KV cache) at once, and the thread then ends; it also ends after _IDLE_EXIT_S idle."""
    while True:
        with cond:
            engine = ref()
            if engine is None:
                return
            if not engine._pending():
                del engine
                notified = cond.wait(_IDLE_EXIT_S)
                engine = ref()
                if engine is None:
                    return
                if not engine._pending():
                    if not notified:
                        engine._thread = None
                        return
                    continue
            taken = engine._take_pending()
        if engine._work(*taken):
            return
        del engine


@atexit.register
def _close_all() -> None:
    for engine in list(_ENGINES):
        engine.close(timeout=2.0)
