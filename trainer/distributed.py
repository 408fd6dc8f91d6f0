"""Training in several processes under torchrun (DDP): the process group and the few collectives
the loop needs. With one process every function here is a no-op, so the loop has one code path.

Invariants:
- Every rank calls these collectives at the same points of the same deterministic control flow.
  A decision that changes control flow (stop now? a non-finite loss?) is taken from values agreed
  here, never from what one rank saw alone: a collective that one rank skips hangs the others.
- Rank 0 alone writes (checkpoints, heartbeat, metrics, results); the others only read.
- ``close`` calls ``barrier`` before ``destroy_process_group``: without it about a third of gloo
  runs abort at exit (SIGABRT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes in the environment (one process when it is absent)."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def init(world: World, device: str) -> str:
    """Join the process group; returns this rank's device (``cuda:<local rank>`` on GPUs)."""
    if not world.distributed:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device


def wrap(world: World, model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The module to train with: DDP over the trainable parameters (the frozen backbone is left
    out of DDP's broadcasts and buckets), or the model itself in one process."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(world: World, model: torch.nn.Module, last: bool):
    """Around a micro-batch's backward pass: gradients are averaged across ranks only with the
    last micro-batch of a step (DDP's ``no_sync`` before it)."""
    import contextlib

    return model.no_sync() if world.distributed and not last else contextlib.nullcontext()


def _tensor(values: list[float], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")


def any_true(world: World, flag: bool, device: str) -> bool:
    if not world.distributed:
        return flag
    t = _tensor([1.0 if flag else 0.0], device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sums(world: World, values: list[float], device: str) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not world.distributed:
        return values
    t = _tensor(values, device)
    dist.all_reduce(t)
    return t.tolist()


def mean(world: World, value: float, device: str) -> float:
    return value if not world.distributed else sums(world, [value], device)[0] / world.size


def gather(world: World, obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
