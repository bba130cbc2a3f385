"""Tensor parallelism: what one rank holds and computes, and the collectives between ranks.

Megatron-style sharding over N ranks (one GPU each; CPU processes over gloo in tests):
- qkv and gate_up are column-parallel: rank r keeps its q heads, its k/v heads and its rows of gate
  and of up, in the same fused layout (q | k | v, gate | up) as one GPU has;
- o and down are row-parallel: rank r keeps the matching input columns, so each rank's output is a
  partial sum, and one all-reduce after each (in models/llama.py) completes it;
- KV heads are split across ranks, or replicated when there are fewer KV heads than ranks (rank r
  then uses KV head r // (N / num_kv_heads), which is the one its q heads read);
- the embedding and the LM head are vocabulary-parallel: rank r holds vocabulary rows
  [r * S, (r + 1) * S) with S = ceil(vocab / N) (zero-padded at the end); a lookup is masked to the
  rank's rows and all-reduced, and the LM head's local logits are gathered once for sampling.
Weights are sharded as they are loaded (loader.load_weights), before any quantization swaps a Linear,
and every all-reduce is outside the Linear modules.

Process start-up, the driver and the worker loop are in decoding/workers.py.

NVLink multicast is never used: disable_multicast() sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in every process before any process
group exists (on the shared GPU machines, multicast can put the host's GPUs out of service), and no
multimem operation is ever called.

All-reduce implementations (DECODING_TP_ALLREDUCE): "nccl" (default: the process group's own, NCCL on
GPU and gloo on CPU), or "symm_mem": torch symmetric memory's one-shot all-reduce (each rank reads its
peers' buffers over NVLink, no multicast), for messages up to DECODING_TP_SYMM_MEM_MAX_BYTES (default
512 KiB: a decode step's [batch, hidden] up to batch 64 on an 8B model); larger ones use NCCL. Both
can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from decoding.config import ModelConfig
from decoding.errors import DecodingError, InvalidRequest

if TYPE_CHECKING:
    from decoding.models.llama import LlamaModel
    from decoding.tokenizer import Tokenizer

NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ALL_REDUCE_ENV = "DECODING_TP_ALLREDUCE"
ALL_REDUCE_IMPLS = ("nccl", "symm_mem")
SYMM_MEM_MAX_BYTES_ENV = "DECODING_TP_SYMM_MEM_MAX_BYTES"

# torch >= 2.13 renames all_gather_into_tensor (and deprecates the old name); the GPU machine has 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def disable_multicast() -> None:
    """Set the variables that keep NCCL, symmetric memory and NVSHMEM off NVLink multicast (overriding)."""
    os.environ.update(NO_MULTICAST_ENV)


def check_multicast_disabled() -> None:
    wrong = {k: os.environ.get(k) for k, v in NO_MULTICAST_ENV.items() if os.environ.get(k) != v}
    if wrong:
        raise RuntimeError(f"NVLink multicast must be disabled in every tensor-parallel process; found {wrong}")


# ----------------------------------------------------------------------------- sharding (pure)
def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The per-rank config: heads, KV heads and MLP width divided by world_size (vocabulary kept whole).

    Raises InvalidRequest when the model cannot be split that way.
    """
    heads, kv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    n = world_size
    if heads % n:
        raise InvalidRequest(f"tensor_parallel_size={n} must divide num_attention_heads ({heads})")
    if (kv >= n and kv % n) or (kv < n and n % kv):
        raise InvalidRequest(f"tensor_parallel_size={n} and num_key_value_heads ({kv}) must divide one another "
                             "(KV heads are split across ranks, or replicated when fewer than ranks)")
    if inter % n:
        raise InvalidRequest(f"tensor_parallel_size={n} must divide intermediate_size ({inter})")
    return dataclasses.replace(config, num_attention_heads=heads // n, num_key_value_heads=max(1, kv // n),
                               intermediate_size=inter // n)


def vocab_shard_size(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size)


def kv_heads_of_rank(config: ModelConfig, rank: int, world_size: int) -> range:
    kv = config.num_key_value_heads
    if kv >= world_size:
        per = kv // world_size
        return range(rank * per, (rank + 1) * per)
    return range(rank // (world_size // kv), rank // (world_size // kv) + 1)


def shard_tensor(config: ModelConfig, name: str, part: int | None, tensor: torch.Tensor, rank: int,
                 world_size: int) -> torch.Tensor:
    """Rank `rank`'s piece of one whole checkpoint tensor, going to our parameter `name` (part: q/k/v or
    gate/up index for the fused ones). Shapes are those of the whole model's `config`."""
    module, kind = name.rsplit(".", 2)[-2:]
    d = config.head_dim
    if module == "qkv":
        heads = (range(rank * config.num_attention_heads // world_size,
                       (rank + 1) * config.num_attention_heads // world_size) if part == 0
                 else kv_heads_of_rank(config, rank, world_size))
        return tensor[heads.start * d: heads.stop * d]
    if module in ("gate_up", "down"):
        per = config.intermediate_size // world_size
        if module == "gate_up":
            return tensor[rank * per: (rank + 1) * per]
        if kind == "bias":  # added once, after the all-reduce sums the partial products
            return tensor if rank == 0 else torch.zeros_like(tensor)
        return tensor[:, rank * per: (rank + 1) * per]
    if module == "o":
        per = config.q_size // world_size
        return tensor[:, rank * per: (rank + 1) * per]
    if module in ("embed_tokens", "lm_head"):
        per = vocab_shard_size(config.vocab_size, world_size)
        piece = tensor[rank * per: (rank + 1) * per]
        if piece.shape[0] < per:  # the last rank's padding rows: never looked up, their logits cut off
            piece = torch.cat([piece, piece.new_zeros(per - piece.shape[0], *piece.shape[1:])])
        return piece
    return tensor  # norms: replicated


# ----------------------------------------------------------------------------- placement
def rank_devices(device: torch.device, world_size: int) -> list[torch.device]:
    """The device of each rank: cuda:i .. cuda:i+N-1 for device cuda:i (InvalidRequest if not all
    visible), or the CPU for every rank."""
    if device.type == "cpu":
        return [device] * world_size
    if device.type != "cuda":
        raise InvalidRequest(f"tensor parallelism runs on CUDA devices (or CPU processes), not {device}")
    base, count = device.index or 0, torch.cuda.device_count()
    if base + world_size > count:
        raise InvalidRequest(f"tensor_parallel_size={world_size} needs GPUs cuda:{base}..cuda:{base + world_size - 1}"
                             f", but {count} are visible")
    return [torch.device("cuda", base + r) for r in range(world_size)]


@dataclass(frozen=True)
class LoadSpec:
    """What every rank loads its shard from: a checkpoint (path; None is the embedded model), or random
    weights of `random_config` (drawn per tensor from `seed`, see loader.random_tensors)."""

    path: str | None = None
    random_config: ModelConfig | None = None
    seed: int = 0

    def config(self) -> ModelConfig | None:
        """The model's config when it is cheap to know before loading (to reject a bad split early)."""
        if self.random_config is not None:
            return self.random_config
        if self.path is not None and os.path.isfile(os.path.join(self.path, "config.json")):
            return ModelConfig.from_file(os.path.join(self.path, "config.json"))
        return None

    def load(self, device: torch.device, dtype: torch.dtype, tp: TensorParallel,
             progress: bool) -> tuple[LlamaModel, Tokenizer | None]:
        from decoding import loader

        if self.random_config is None:
            return loader.load(self.path, device, dtype, progress=progress, tp=tp)
        model = loader.build_model(self.random_config, device, dtype, tp)
        loader.load_weights(model, loader.random_tensors(self.random_config, device, dtype, self.seed))
        return model, None


# ----------------------------------------------------------------------------- collectives
def select_all_reduce(name: str | None, device: torch.device, world_size: int) -> str:
    """The all-reduce implementation to use: `name`, else $DECODING_TP_ALLREDUCE, else "nccl"."""
    name = name or os.environ.get(ALL_REDUCE_ENV) or "nccl"
    if name not in ALL_REDUCE_IMPLS:
        raise InvalidRequest(f"{ALL_REDUCE_ENV} must be one of {ALL_REDUCE_IMPLS}, got {name!r}")
    if name == "symm_mem":
        if device.type != "cuda":
            raise InvalidRequest(f"{ALL_REDUCE_ENV}=symm_mem needs CUDA devices, got {device}")
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
            raise InvalidRequest(f"{ALL_REDUCE_ENV}=symm_mem: this torch ({torch.__version__}) has no "
                                 "symm_mem.one_shot_all_reduce_copy")
        check_multicast_disabled()
    return name


def symm_mem_max_bytes() -> int:
    raw = os.environ.get(SYMM_MEM_MAX_BYTES_ENV, str(512 << 10))
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidRequest(f"{SYMM_MEM_MAX_BYTES_ENV} must be a positive number of bytes, got {raw!r}")
    return int(raw)


class SymmMemAllReduce:
    """One-shot all-reduce through torch symmetric memory: each rank copies its input into its own
    registered buffer, and every rank sums all buffers by reading its peers' over NVLink (P2P loads;
    the buffers are mapped with multicast disabled, and no multimem op is used). One kernel, no NCCL
    protocol setup: for the small, latency-bound messages of a decode step. CUDA-graph capturable."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        check_multicast_disabled()
        from torch.distributed import _symmetric_memory as symm_mem

        if hasattr(symm_mem, "set_backend") and symm_mem.get_backend(device) != "CUDA":
            symm_mem.set_backend("CUDA")  # not NVSHMEM: its own runtime, and nothing here needs it
        self.max_bytes = -(-max_bytes // 16) * 16  # viewable as any dtype
        self.group_name = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(self.max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= self.max_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        buf = self.buffer.view(x.dtype)[: flat.numel()]
        return torch.ops.symm_mem.one_shot_all_reduce_copy(buf, flat, "sum", self.group_name).view(x.shape)


class TensorParallel:
    """This process's place in the tensor-parallel group (the default torch.distributed group) and the
    collectives the model calls. `config` is the whole model's config (set by parallelize)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, all_reduce: str | None = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.config: ModelConfig | None = None
        self.all_reduce_impl = select_all_reduce(all_reduce, self.device, world_size)
        self._symm = SymmMemAllReduce(self.device, symm_mem_max_bytes()) if self.all_reduce_impl == "symm_mem" \
            else None

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def all_reduce_name(self) -> str:
        """What all_reduce runs: "nccl", "gloo" (the default on CPU) or "symm_mem"."""
        return self.backend if self.all_reduce_impl == "nccl" else self.all_reduce_impl

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place for NCCL/gloo; a new tensor from the one-shot path)."""
        if self._symm is not None and self._symm.fits(x):
            return self._symm(x)
        dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[num_seqs, S] local logits of each rank's vocabulary slice -> [num_seqs, vocab_size] on every rank."""
        n, shard = logits.shape
        out = logits.new_empty(self.world_size * n, shard)
        _all_gather_single(out, logits.contiguous())
        return out.view(self.world_size, n, shard).transpose(0, 1).reshape(n, self.world_size * shard)[:, :vocab_size]


class VocabParallelEmbedding(nn.Module):
    """This rank's rows [start, start + S) of the embedding; other tokens give zeros, the all-reduce fills them."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.shard = vocab_shard_size(vocab_size, tp.world_size)
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden_size))
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0))


def parallelize(model: nn.Module, tp: TensorParallel, config: ModelConfig) -> None:
    """Turn a LlamaModel built from shard_config(config) (on the meta device) into rank tp.rank's shard."""
    tp.config = config
    model.tp = tp
    for layer in model.layers:
        layer.attn.tp = tp
        layer.mlp.tp = tp
    model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(config.hidden_size, model.embed_tokens.shard, bias=False)


def init_process_group(rank: int, world_size: int, device: torch.device, store: dist.Store | None,
                       timeout_s: float) -> None:
    """The default group: NCCL on CUDA (initialised eagerly on `device`, as CUDA graphs need), gloo on CPU.
    With store None, torchrun's environment (env://) gives the rendezvous."""
    from datetime import timedelta

    check_multicast_disabled()
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if store is not None:
        kwargs["store"] = store
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def bench_all_reduce(tp: TensorParallel, numel: int, dtype: torch.dtype, iters: int = 200,
                     graph_calls: int = 64) -> dict[str, float | None]:
    """Time one all-reduce of `numel` elements, run by every rank at once (a collective).

    Returns eager_us (back-to-back calls from Python, synchronised at the end) and, on CUDA, graph_us
    (the same calls replayed from one CUDA graph, as a graph-captured decode step issues them), each
    per call.
    """
    x = torch.zeros(numel, dtype=dtype, device=tp.device)
    cuda = tp.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(10):
        tp.all_reduce(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        tp.all_reduce(x)
    sync()
    result: dict[str, float | None] = {"eager_us": (time.perf_counter() - t0) / iters * 1e6, "graph_us": None}
    if cuda:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                tp.all_reduce(x)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph_calls):
                tp.all_reduce(x)
        g.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            g.replay()
        sync()
        result["graph_us"] = (time.perf_counter() - t0) / (10 * graph_calls) * 1e6
    if not torch.all(x == 0):
        raise DecodingError("all-reduce benchmark: a sum of zeros was not zero")
    return result
