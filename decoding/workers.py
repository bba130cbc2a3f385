"""Tensor-parallel processes: start the workers, drive them from the caller's process, serve the driver.

The driver (rank 0, the caller's process) runs a TPDriverRunner: a ModelRunner whose public calls
(step, logits_at, copy_blocks, allocate_cache) first send the same call, a method name and plain
picklable arguments such as a StepInput, to every worker, then run it locally. Every rank runs the same
model step, so the collectives inside it pair up. Host-side decisions stay in the driver: the block
pool lives there, and workers get the block tables in each StepInput and the pool size through
allocate_cache. Sampling runs on the driver alone, from the gathered logits.

Start-up: Generator.from_pretrained(..., tensor_parallel_size=N) starts N-1 workers as fresh Python
processes (`python -c`, not multiprocessing, so the caller's __main__ is never re-imported), each
joined to the driver by a socket pair; they rendezvous through a TCPStore the driver serves on
127.0.0.1. Under torchrun, ranks > 0 connect to rank 0 over a Unix socket instead, and
from_pretrained serves rank 0 on them and then exits their process.

Failure: a worker that dies closes its socket. The driver's monitor thread sees that at once, records
why, and aborts the NCCL communicators so that no collective can hang; the current call, or the next,
raises DecodingError. Workers exit when the driver says so, when its socket closes, or when their
parent process is gone; they ignore SIGINT (Ctrl-C stops the driver, which stops them).
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener, wait

import torch
import torch.distributed as dist

from decoding.errors import DecodingError, InvalidRequest
from decoding.models.llama import LlamaModel
from decoding.parallel import (
    NO_MULTICAST_ENV,
    LoadSpec,
    TensorParallel,
    bench_all_reduce,
    check_multicast_disabled,
    disable_multicast,
    init_process_group,
    rank_devices,
    shard_config,
)
from decoding.runner import ModelRunner
from decoding.tokenizer import Tokenizer

TIMEOUT_ENV = "DECODING_TP_TIMEOUT_S"
"""Seconds a collective (or the rendezvous) may wait for the other ranks; default 600."""
COMMANDS = ("step", "logits_at", "copy_blocks", "allocate_cache", "bench_all_reduce", "capture_mixed_graphs")
_SHUTDOWN_WAIT_S = 30.0
_FAILURE_WAIT_S = 2.0


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when this process was started by torchrun (or another launcher setting LOCAL_RANK)."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        return float(raw)
    except ValueError as e:
        raise InvalidRequest(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from e


@dataclass
class _Worker:
    rank: int
    conn: Connection
    proc: subprocess.Popen | None  # None under torchrun: not our child
    state: str = "spawned"

    def describe_exit(self) -> str:
        if self.proc is None:
            return "closed its connection (its process died)"
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "closed its connection"
        if code < 0:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        return f"exited with code {code}"


class _Group:
    """The driver's view of its workers. Holds no reference to the runner, so that garbage collection of
    the Generator can run its finalizer (shutdown)."""

    def __init__(self, owns_process_group: bool, backend: str, store: dist.Store | None = None) -> None:
        self.workers: list[_Worker] = []
        self.owns_process_group = owns_process_group
        self.backend = backend
        self.store = store  # the TCPStore server lives as long as this object
        self.failure: str | None = None
        self.closed = False
        self._cond = threading.Condition()
        self._monitor: threading.Thread | None = None

    # ---- monitoring
    def start_monitor(self) -> None:
        self._monitor = threading.Thread(target=self._watch, name="decoding-tp-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        pending = {w.conn: w for w in self.workers}
        while pending:
            for conn in wait(list(pending)):
                w = pending[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None and msg[0] != "error":
                    with self._cond:
                        w.state = msg[0]
                        self._cond.notify_all()
                    continue
                del pending[conn]
                if self.closed:
                    continue
                if msg is None:
                    self.fail(f"tensor-parallel worker rank {w.rank} {w.describe_exit()}")
                else:
                    self.fail(f"tensor-parallel worker rank {w.rank} failed:\n{msg[1]}")

    def fail(self, message: str) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = message
            self._cond.notify_all()
        if self.backend == "nccl" and dist.is_initialized():
            # Frees any rank-0 kernel waiting for the dead peer: otherwise the next sync would hang forever.
            dist.distributed_c10d._abort_process_group()

    def wait_for(self, state: str) -> None:
        """Block until every worker reports `state`; DecodingError if one fails or dies first."""
        with self._cond:
            while self.failure is None and any(w.state != state for w in self.workers):
                self._cond.wait(1.0)
            if self.failure is not None:
                raise DecodingError(self.failure)

    def check(self) -> None:
        if self.failure is not None:
            raise DecodingError(self.failure)
        if self.closed:
            raise DecodingError("this tensor-parallel Generator was closed")

    def broken(self, what: str, error: Exception) -> DecodingError:
        """A call failed on rank 0: the ranks are out of step for good. Stop them; say why (a dead worker
        is the usual cause, so wait a moment for the monitor to report one)."""
        with self._cond:
            self._cond.wait_for(lambda: self.failure is not None, timeout=_FAILURE_WAIT_S)
            if self.failure is None:
                self.failure = f"tensor-parallel {what} failed on rank 0: {type(error).__name__}: {error}"
            message = self.failure
        self.shutdown()
        return DecodingError(f"{message}\n(the tensor-parallel workers are stopped: make a new Generator)")

    # ---- commands
    def broadcast(self, name: str, args: tuple) -> None:
        data = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.workers:
            try:
                w.conn.send_bytes(data)
            except OSError as e:
                self.fail(f"tensor-parallel worker rank {w.rank} {w.describe_exit()} ({e})")
                raise DecodingError(self.failure) from e

    def shutdown(self) -> None:
        """Stop every worker (idempotent): ask, wait, then kill what is left; release the process group."""
        with self._cond:
            if self.closed:
                return
            self.closed = True
        for w in self.workers:
            try:
                w.conn.send(("shutdown", ()))
            except OSError:  # that worker is already gone: nothing to tell it
                continue
        if self.owns_process_group and dist.is_initialized():
            if self.failure is not None and self.backend == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        wait_s = _SHUTDOWN_WAIT_S if self.failure is None else _FAILURE_WAIT_S
        for w in self.workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=wait_s)
        for w in self.workers:
            w.conn.close()


class TPDriverRunner(ModelRunner):
    """Rank 0's ModelRunner: each public call is sent to every worker, then run here."""

    takes_device_tokens = False  # the workers' steps get their token ids from the driver's host lists

    def __init__(self, model: LlamaModel, block_size: int, group: _Group) -> None:
        super().__init__(model, block_size)
        self.tp: TensorParallel = model.tp
        self._group = group
        self._finalizer = weakref.finalize(self, group.shutdown)

    def close(self) -> None:
        self._finalizer()

    def _collective(self, name: str, local, *args):
        self._group.check()
        self._group.broadcast(name, args)
        try:
            out = local(*args)
            if self.device.type == "cuda":
                # Wait for this step here: if a worker died mid-step, the monitor has aborted the collectives
                # and the check below raises before anyone samples from the step's garbage logits.
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as e:
            raise self._group.broken(name, e) from e
        except BaseException:  # e.g. Ctrl-C mid-step: the workers are now a collective ahead, for good
            self._group.fail(f"a tensor-parallel {name} was interrupted on rank 0")
            self._group.shutdown()
            raise
        self._group.check()
        return out

    def step(self, inp):
        return self._collective("step", super().step, inp)

    def logits_at(self, inp, rows):
        return self._collective("logits_at", super().logits_at, inp, rows)

    def copy_blocks(self, pairs):
        return self._collective("copy_blocks", super().copy_blocks, pairs)

    def allocate_cache(self, num_blocks):
        return self._collective("allocate_cache", super().allocate_cache, num_blocks)

    def capture_mixed_graphs(self, max_tokens, max_seqs):  # every rank captures (the all-reduces in them)
        return self._collective("capture_mixed_graphs", super().capture_mixed_graphs, max_tokens, max_seqs)

    def bench_all_reduce(self, numel: int, dtype: torch.dtype) -> dict[str, float | None]:
        """Time the all-reduce at this message size on every rank (see parallel.bench_all_reduce)."""
        return self._collective("bench_all_reduce", functools.partial(bench_all_reduce, self.tp), numel, dtype)


# ----------------------------------------------------------------------------- launch (driver side)
def launch(load: LoadSpec, world_size: int, device: torch.device, dtype: torch.dtype, block_size: int = 16,
           progress: bool = True, all_reduce: str | None = None) -> tuple[TPDriverRunner, Tokenizer | None]:
    """Start a tensor-parallel model over `world_size` ranks; returns rank 0's runner and the tokenizer.

    Spawns world_size - 1 workers, or, under torchrun, joins torchrun's ranks (on ranks > 0 this serves
    rank 0 and then raises SystemExit). Raises InvalidRequest for a split the model or the machine
    cannot take, DecodingError when a worker fails to start.
    """
    disable_multicast()
    # On a failed collective (a worker died, a timeout) NCCL's watchdog aborts the communicators and the
    # call raises; its default would also kill this process, which is the caller's.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    config = load.config()
    if config is not None:
        shard_config(config, world_size)
    timeout_s = _timeout_s()
    run_size = torchrun_world_size()
    if run_size is not None and run_size > 1:
        if run_size != world_size:
            raise InvalidRequest(f"tensor_parallel_size={world_size} under torchrun with {run_size} processes: "
                                 "they must be equal")
        return _launch_torchrun(load, world_size, device, dtype, block_size, progress, all_reduce, timeout_s)
    if dist.is_initialized():
        raise InvalidRequest("torch.distributed already has a default process group in this process (another "
                             "tensor-parallel Generator, or your own): close it before starting workers")
    devices = rank_devices(device, world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    group = _Group(owns_process_group=True, backend="nccl" if device.type == "cuda" else "gloo", store=store)
    try:
        for rank in range(1, world_size):
            spec = {"rank": rank, "world_size": world_size, "device": str(devices[rank]), "dtype": dtype,
                    "load": load, "block_size": block_size, "all_reduce": all_reduce, "store_port": store.port,
                    "timeout_s": timeout_s, "parent_pid": os.getpid(),
                    "num_threads": max(1, (os.cpu_count() or 1) // world_size)}
            group.workers.append(_spawn(rank, spec))
        group.start_monitor()
        group.wait_for("started")
        if device.type == "cuda":
            torch.cuda.set_device(devices[0])
        init_process_group(0, world_size, devices[0], store, timeout_s)
        return _start_driver(group, load, world_size, devices[0], dtype, block_size, progress, all_reduce)
    except BaseException:
        group.shutdown()
        raise


def _spawn(rank: int, spec: dict) -> _Worker:
    import socket

    parent, child = socket.socketpair()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **NO_MULTICAST_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-c", "from decoding.workers import _worker_entry; _worker_entry()",
                             str(child.fileno())], pass_fds=[child.fileno()], env=env)
    child.close()
    conn = Connection(parent.detach())
    conn.send(spec)
    return _Worker(rank, conn, proc)


def _start_driver(group: _Group, load: LoadSpec, world_size: int, device: torch.device, dtype: torch.dtype,
                  block_size: int, progress: bool, all_reduce: str | None) -> tuple[TPDriverRunner, Tokenizer | None]:
    tp = TensorParallel(0, world_size, device, all_reduce)
    model, tokenizer = load.load(device, dtype, tp, progress)
    group.wait_for("ready")
    return TPDriverRunner(model, block_size, group), tokenizer


def _launch_torchrun(load: LoadSpec, world_size: int, device: torch.device, dtype: torch.dtype, block_size: int,
                     progress: bool, all_reduce: str | None, timeout_s: float) -> tuple[TPDriverRunner, Tokenizer | None]:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    rank_devices(device, 1)  # CUDA or CPU only
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidRequest(f"torchrun local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        init_process_group(rank, world_size, device, None, timeout_s)
    address = [None, None]
    listener = None
    if rank == 0:
        authkey = os.urandom(32)
        listener = Listener(family="AF_UNIX", authkey=authkey)
        address = [listener.address, authkey]
    dist.broadcast_object_list(address, src=0)
    if rank != 0:
        conn = Client(address[0], family="AF_UNIX", authkey=address[1])
        conn.send(rank)
        raise SystemExit(_run_worker(conn, rank, world_size, device, dtype, load, block_size, all_reduce, owns))
    group = _Group(owns_process_group=owns, backend="nccl" if device.type == "cuda" else "gloo")
    try:
        conns = {}
        for _ in range(world_size - 1):
            conn = listener.accept()
            conns[conn.recv()] = conn
        listener.close()
        group.workers.extend(_Worker(r, conns[r], None, state="started") for r in sorted(conns))
        group.start_monitor()
        return _start_driver(group, load, world_size, device, dtype, block_size, progress, all_reduce)
    except BaseException:
        group.shutdown()
        raise


# ----------------------------------------------------------------------------- worker side
def _worker_entry() -> None:
    """Entry point of a spawned worker: its end of the socket pair is the fd in argv[1]."""
    conn = Connection(int(sys.argv[1]))
    spec = conn.recv()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver, which then stops us
    threading.Thread(target=_exit_with_parent, args=(spec["parent_pid"],), daemon=True).start()
    try:
        check_multicast_disabled()
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(spec["num_threads"])
        conn.send(("started",))
        store = dist.TCPStore("127.0.0.1", spec["store_port"], spec["world_size"], is_master=False,
                              timeout=timedelta(seconds=spec["timeout_s"]))
        init_process_group(spec["rank"], spec["world_size"], device, store, spec["timeout_s"])
    except Exception:  # noqa: BLE001 - whatever it is, the driver must hear of it
        _report(conn)
        sys.exit(1)
    sys.exit(_run_worker(conn, spec["rank"], spec["world_size"], device, spec["dtype"], spec["load"],
                         spec["block_size"], spec["all_reduce"], owns_process_group=True))


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # the driver is gone without telling us: nothing left to serve


def _report(conn: Connection) -> None:
    try:
        conn.send(("error", traceback.format_exc()))
    except OSError:  # the driver is gone: there is no one to tell
        return


def _run_worker(conn: Connection, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                load: LoadSpec, block_size: int, all_reduce: str | None, owns_process_group: bool) -> int:
    """Load this rank's shard, then run the driver's calls until it says shutdown; the exit code."""
    try:
        tp = TensorParallel(rank, world_size, device, all_reduce)
        model, _ = load.load(device, dtype, tp, progress=False)
        runner = ModelRunner(model, block_size)
        handlers = {name: getattr(runner, name) for name in COMMANDS if name != "bench_all_reduce"}
        handlers["bench_all_reduce"] = functools.partial(bench_all_reduce, tp)
        conn.send(("ready",))
        while True:
            try:
                name, args = conn.recv()
            except EOFError:  # the driver died: skip the process-group teardown, which could wait on it
                os._exit(1)
            if name == "shutdown":
                break
            handlers[name](*args)
    except Exception:  # noqa: BLE001 - whatever it is, the driver must hear of it
        _report(conn)
        return 1
    if owns_process_group:
        dist.destroy_process_group()
    return 0
