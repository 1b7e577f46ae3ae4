"""Many processes: the torchrun process group, DDP / FSDP2 wrapping, rank helpers, and the
deterministic gradient reduction.

Design:
- PyTorch's own engine, nothing home-made: torchrun starts the processes and sets RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (single node, or multi-node through its
  rendezvous); `init()` reads them and opens the default process group (gloo on CPU, nccl on GPU).
  Without torchrun (no WORLD_SIZE) nothing is initialised and `Dist` describes one process, so
  every helper below is a no-op and the single-process trainer is unchanged.
- `train.parallel` picks the wrapper: `ddp` (DistributedDataParallel: replicated weights, gradients
  averaged by all-reduce) or `fsdp` (FSDP2 `fully_shard` per decoder block and at the root: sharded
  parameters, gradients and optimizer state; optional bf16 mixed precision from `train.dtype` and
  activation checkpointing from `train.activation_checkpointing`).
- `train.deterministic_reduce` replaces DDP's all-reduce by something slower that does not depend
  on the number of processes: each rank keeps the gradient of each of its micro batches separately,
  all ranks all-gather them, and every rank sums all micro-batch gradients of the global batch in
  the canonical order (micro batch 0, 1, 2 ... of the global batch, which is rank-major because a
  rank reads a contiguous slice of it). One process accumulating with autograd computes exactly the
  same left-to-right sum, so 1, 2 or 4 processes give bit-identical gradients, losses and weights.
  Cost: every rank holds (global_batch / micro_batch / world) gradient copies and receives all
  global_batch / micro_batch of them each step, instead of one all-reduced copy (see
  docs/distributed.md for the figures).
- Agreement: everything a decision depends on (the loss and gradient norm the guard judges, a stop
  signal, a rollback plan) is made identical on every rank by a collective (`broadcast_object`,
  `any_flags`), so ranks never take different branches and never deadlock on a collective.

Trade-off: validation runs on every rank over the same batches (FSDP needs every rank in each
forward anyway); the redundancy costs eval time, not correctness.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..errors import ConfigError
from ..util import console


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, local rank, and whether it leads (rank 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is open (under torchrun with more than one process)."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled by torch over the process group: our own values only)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_flags(self, flags: list[bool]) -> list[bool]:
        """Each flag true on every rank when it is true on any rank (e.g. a stop signal that reached
        one rank), in one small all-reduce."""
        if not self.active:
            return flags
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Rank 0's floats on every rank, bit for bit (float64 on the wire)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=comm_device())
        dist.broadcast(t, src=0)
        return t.tolist()

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world}" if self.world > 1 else "1 process"


SINGLE = Dist()


def comm_device() -> torch.device:
    """Device of tensors handed to collectives: nccl needs CUDA tensors, gloo takes CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LaunchError(ConfigError):
    """The process environment does not describe a job this process can join (torchrun's
    variables missing or malformed, a rendezvous that failed, a launcher inside a launcher)."""


TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
_LAUNCH_HINT = ("launch many processes with `torchrun --nproc-per-node N -m lmforge train ...` or "
                "`lmforge train ... --nproc-per-node N`, or unset these variables to run one process")
_joined: Dist | None = None  # the group this process joined, kept after shutdown (see joined())


def torchrun_vars() -> dict[str, str]:
    """The torchrun worker variables set in this process's environment (empty: not a worker)."""
    return {k: os.environ[k] for k in TORCHRUN_VARS if k in os.environ}


def read_env() -> Dist:
    """This process's place in the job, from torchrun's variables; SINGLE when none is set.

    Refuses, naming each bad variable, an environment torchrun would not have made: a variable
    that is not a whole number, RANK without WORLD_SIZE (or the reverse, for more than one process),
    a rank outside 0..WORLD_SIZE-1, and, for more than one process, a missing MASTER_ADDR or
    MASTER_PORT (the rendezvous address)."""
    found = torchrun_vars()
    if not found:
        return SINGLE
    shown = " ".join(f"{k}={v!r}" for k, v in found.items())
    problems, values = [], {}
    for k, v in found.items():
        try:
            values[k] = int(v)
        except ValueError:
            problems.append(f"{k}={v!r} is not a whole number")
    world, rank, local = values.get("WORLD_SIZE"), values.get("RANK"), values.get("LOCAL_RANK", 0)
    if not problems:
        if "WORLD_SIZE" not in found:
            problems.append("WORLD_SIZE is not set")
        elif world < 1:
            problems.append(f"WORLD_SIZE={world} is not a number of processes (>= 1)")
        if "RANK" not in found and (world is None or world > 1):
            problems.append("RANK is not set")
        elif rank is not None and world is not None and world >= 1 and not 0 <= rank < world:
            problems.append(f"RANK={rank} is not in 0..{world - 1} (WORLD_SIZE={world})")
        if local < 0:
            problems.append(f"LOCAL_RANK={local} is negative")
    if world is not None and world > 1:
        problems += [f"{k} is not set" for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        port = os.environ.get("MASTER_PORT")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            problems.append(f"MASTER_PORT={port!r} is not a port number")
    if problems:
        raise LaunchError(f"torchrun environment ({shown}) is incomplete or malformed: {'; '.join(problems)}; {_LAUNCH_HINT}")
    if world <= 1:
        return SINGLE
    return Dist(rank=rank or 0, world=world, local_rank=local)


def init() -> Dist:
    """Open the process group torchrun describes in the environment; one process without it.
    A malformed environment or a failed rendezvous is a `LaunchError` (read_env)."""
    global _joined
    d = read_env()
    if d.world <= 1:
        return SINGLE
    if not dist.is_initialized():
        from ..util import default_device

        backend = "nccl" if default_device().type == "cuda" else "gloo"  # LMFORGE_DEVICE=cpu: gloo on a GPU machine
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank)  # "cuda" below means this process's GPU
        try:
            # a generous timeout: rank 0 may hash a large checkpoint while the others wait at a barrier
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError (a RuntimeError): port taken, peer unreachable
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise LaunchError(
                f"{d.describe()}: could not join the process group at MASTER_ADDR:MASTER_PORT = {where} "
                f"({str(e).splitlines()[0][:300] if str(e) else type(e).__name__}); check that the port is free "
                f"on rank 0's host and reachable from every rank, or {_LAUNCH_HINT}"
            ) from None
    _joined = d
    if not d.is_main:
        console.quiet = True  # one voice: rank 0 prints; the others speak only on their own errors
    return d


def joined() -> Dist | None:
    """The process group this process joined in `init()` (still after `shutdown()`), or None.
    The CLI asks it: `train_command` already printed a non-zero rank's error with its rank."""
    return _joined


def check_not_nested(*, nproc_per_node: int | None, supervise: bool) -> None:
    """`--nproc-per-node` / `--supervise` start processes; inside a torchrun worker each rank
    would start its own job on the same run directory. Refuse, naming the way out."""
    found = torchrun_vars()
    if not found or (nproc_per_node is None and not supervise):
        return
    shown = " ".join(f"{k}={v}" for k, v in found.items())
    if nproc_per_node is not None:
        raise LaunchError(
            f"--nproc-per-node {nproc_per_node}: this process is already a torchrun worker ({shown}), so every rank "
            f"would launch its own torchrun job on the same run directory. Use one or the other: "
            f"`torchrun --nproc-per-node N -m lmforge train ...` without --nproc-per-node, or "
            f"`lmforge train ... --nproc-per-node N` without torchrun"
        )
    raise LaunchError(
        f"--supervise: this process is already a torchrun worker ({shown}), so every rank would run its own supervisor "
        "and restart its own training process apart from the others. Use one or the other: "
        "`lmforge train ... --supervise --nproc-per-node N` without torchrun, or torchrun's own --max-restarts "
        "without --supervise"
    )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def lost_peer(e: BaseException) -> bool:
    """Whether an exception is a collective that failed because a peer went away (gloo reports
    it as a plain RuntimeError naming its transport; nccl as a DistError)."""
    text = str(e)
    return isinstance(e, dist.DistError) or "gloo" in text.lower() or "Connection closed by peer" in text


def micro_batches_per_rank(global_batch: int, micro_batch: int, world: int) -> int:
    """global_batch / (world * micro_batch), or an error naming the numbers."""
    if global_batch % (world * micro_batch):
        fits = [m for m in range(1, micro_batch + 1) if global_batch % (world * m) == 0]
        hint = f"set train.micro_batch to {fits[-1]}" if fits else f"make train.global_batch a multiple of {world}"
        raise ConfigError(
            f"train.global_batch ({global_batch}) is not divisible by world size ({world}) x train.micro_batch "
            f"({micro_batch}) = {world * micro_batch}; {hint}, or run on a number of processes that divides it"
        )
    return global_batch // (world * micro_batch)


def check_parallel(t: TrainConfig, d: Dist) -> None:
    """Refuse a world size the config cannot run on, before any weight is touched (config.py
    already refuses deterministic_reduce with fsdp)."""
    if d.world > 1 and t.parallel == "none" and not t.deterministic_reduce:
        raise ConfigError(
            f"running as {d.world} processes under torchrun, but train.parallel is 'none'; "
            "set --set train.parallel=ddp (or fsdp), or run one process"
        )


def wrap(model: torch.nn.Module, t: TrainConfig, d: Dist) -> torch.nn.Module:
    """The model to run forward/backward through: DDP, FSDP2 (in place) or the model itself.

    With deterministic_reduce the model is not wrapped: `deterministic_step` reduces gradients."""
    if t.activation_checkpointing:
        _checkpoint_blocks(model)
    if t.parallel == "fsdp" and d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 gradient reduction and fp32 master weights when train.dtype=bf16
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if t.dtype == "bf16" else MixedPrecisionPolicy()
        for block in model.model.layers:  # one FSDP unit per decoder block: all-gather one block at a time
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # the rest (embeddings, final norm, tied head) at the root
        return model
    if t.parallel == "ddp" and d.world > 1 and not t.deterministic_reduce:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.local_rank] if next(model.parameters()).is_cuda else None
        # an embedding objective never reads an untied lm_head: DDP must be told, or it waits for its gradient
        unused = t.objective == "contrastive" and not getattr(getattr(model, "cfg", None), "tie_embeddings", True)
        return DDP(model, device_ids=ids, find_unused_parameters=unused)
    return model


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each decoder block's activations in backward instead of storing them (less
    memory, about one more forward of compute). Non-reentrant checkpointing, so FSDP and DDP hooks
    behave as without it."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        if getattr(block, "_lmforge_checkpointed", False):
            continue
        inner = block.forward
        block.forward = partial(checkpoint, inner, use_reentrant=False)  # type: ignore[method-assign]
        block._lmforge_checkpointed = True


def no_sync(model: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro batch of a step."""
    from contextlib import nullcontext

    from torch.nn.parallel import DistributedDataParallel as DDP

    model = getattr(model, "_orig_mod", model)  # under torch.compile, the wrapped module
    if isinstance(model, DDP):
        return nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(last)
    return nullcontext()


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float; under FSDP it is a DTensor of partial sums."""
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def deterministic_step(
    model: torch.nn.Module,
    micro_batches: list[Any],
    *,
    d: Dist,
    forward: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Backward each micro batch on its own, gather every rank's micro-batch gradients, and sum all
    of them in canonical order on every rank; leaves the summed gradients in `p.grad` and returns
    the canonical sum of the micro batches' values. `forward(micro_batch)` returns (the tensor to
    backward, already scaled by train_step; the value its loss adds).

    Bit-identical to one process accumulating `forward(mb)[0].backward()` in order: each
    micro-batch gradient is computed by the same kernels on the same weights, and both sides add
    them left to right (autograd's accumulation is `grad += new`)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    rows = torch.empty(len(micro_batches), n + 1, dtype=torch.float32, device=params[0].device)  # (local micro, grads + loss)
    for j, mb in enumerate(micro_batches):
        for p in params:
            p.grad = None
        back, value = forward(mb)
        back.backward()
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
        rows[j, :n] = torch.cat(flat).float()
        rows[j, n] = value.float()
    if d.active:
        parts = [torch.empty_like(rows) for _ in range(d.world)]
        dist.all_gather(parts, rows)
        rows = torch.cat(parts)  # (n_micro_total, n + 1), rank-major = canonical micro-batch order
    total = rows[0].clone()
    for i in range(1, rows.shape[0]):  # a fixed left-to-right sum: the same on every world size
        total += rows[i]
    offset = 0
    for p, size in zip(params, sizes):
        p.grad = total[offset:offset + size].view_as(p).to(p.dtype).clone()
        offset += size
    # the loss sum starts from 0 like train_step's, then adds in the same order
    return float(total[n])
