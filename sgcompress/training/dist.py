"""torchrun support: process group, rank-0-only I/O, metric reduction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import ConfigError, TrainingError


@dataclass(frozen=True)
class DistContext:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from e


def setup(device: torch.device | None = None) -> DistContext:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) unless one exists already."""
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK", rank % max(1, torch.cuda.device_count()) if cuda else 0)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        if world > 1:
            if not dist.is_available():
                raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
            if cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            world, rank = dist.get_world_size(), dist.get_rank()
    if device is None:
        device = torch.device("cuda", local) if cuda and world > 1 else torch.device("cuda" if cuda else "cpu")
    return DistContext(world, rank, local, device)


def current(device: torch.device) -> DistContext:
    """The context of an existing process group (or a single process), without creating one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistContext(dist.get_world_size(), dist.get_rank(), _env_int("LOCAL_RANK", 0), device)
    return DistContext(1, 0, 0, device)


def reduce_device(ctx: DistContext) -> torch.device:
    """Where collective tensors must live (nccl needs CUDA tensors)."""
    if ctx.distributed and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over ranks (identity on one process)."""
    if not ctx.distributed:
        return values
    t = values.to(reduce_device(ctx), torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def sync_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart between DDP forwards)."""
    if ctx.distributed:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def on_main(ctx: DistContext, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 only; every rank raises if it failed there (no rank is left waiting)."""
    error: BaseException | None = None
    if ctx.is_main:
        try:
            fn()
        except BaseException as e:  # re-raised below, after telling the other ranks
            error = e
    if ctx.distributed:
        flag = torch.tensor([1.0 if error is not None else 0.0], device=reduce_device(ctx))
        dist.broadcast(flag, src=0)
        if not ctx.is_main and flag.item() != 0.0:
            raise TrainingError("rank 0 failed to write the run's files; see rank 0's error")
    if error is not None:
        raise error
