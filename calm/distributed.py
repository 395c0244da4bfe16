"""torchrun detection, process-group set-up, DDP / FSDP2 wrapping and rank-0 helpers.

A process started by ``torchrun`` sees RANK / WORLD_SIZE / LOCAL_RANK in its environment; then
``context()`` initialises the default process group (NCCL on CUDA, gloo on CPU) once. A plain
``python -m calm ...`` is a world of one, and every helper here degrades to a no-op.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


_STRATEGY = {"name": "ddp"}


def set_strategy(name: str) -> None:
    if name not in ("ddp", "fsdp"):
        raise ValueError(f"unknown strategy {name!r}; choose ddp or fsdp")
    _STRATEGY["name"] = name


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def context() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, default_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, device)


def is_main() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_mean(value: float) -> float:
    if not tdist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    return float(t.item()) / tdist.get_world_size()


def wrap_model(model: nn.Module, ctx: DistContext, params: list[nn.Parameter]) -> nn.Module:
    """DDP (default) or FSDP2 for a world larger than one; the model itself otherwise."""
    if ctx.world_size <= 1:
        return model
    if _STRATEGY["name"] == "fsdp":
        from calm.fsdp import shard_model

        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def no_sync(model: nn.Module):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP only)."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
