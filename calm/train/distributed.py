"""torchrun detection, process-group set-up, DDP / FSDP2 wrapping and rank-0 helpers.

A process started by ``torchrun`` sees RANK / WORLD_SIZE / LOCAL_RANK in its environment; then
``context()`` initialises the default process group (NCCL on CUDA, gloo on CPU) once. A plain
``python -m calm ...`` is a world of one, and every helper here degrades to a no-op.

Strategies (``set_strategy``): ``ddp`` (default) replicates the model and all-reduces gradients;
``fsdp`` shards it with FSDP2 (``calm.train.fsdp``). Either way, parameters that do not train (the frozen
autoencoder inside CALM) stay outside the wrapper: DDP is told to ignore them (no broadcast, no
gradient buckets) and FSDP2 gets them as ``ignored_params`` (never sharded). Every rank loads the
same frozen weights from the autoencoder checkpoint, so there is nothing to synchronise.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from calm.hardware import default_device


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


def strategy() -> str:
    return _STRATEGY["name"]


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


def _reduce(values: list[float], op: Any) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_mean(value: float) -> float:
    if not tdist.is_initialized():
        return float(value)
    return _reduce([float(value)], tdist.ReduceOp.SUM)[0] / tdist.get_world_size()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Whether each flag is set on any rank, so that every rank takes the same branch (stop, save)."""
    if not tdist.is_initialized():
        return tuple(bool(f) for f in flags)
    return tuple(v > 0 for v in _reduce([float(bool(f)) for f in flags], tdist.ReduceOp.MAX))


def wrap_model(model: nn.Module, ctx: DistContext, params: list[nn.Parameter]) -> nn.Module:
    """DDP (default) or FSDP2 for a world larger than one; the model itself otherwise.

    ``params`` are the trainable parameters; every other parameter is left out of the wrapper.
    FSDP2 shards ``model`` in place (its parameters become DTensors), so read the trainable
    parameters again after wrapping and build the optimizer from those.
    """
    if ctx.world_size <= 1:
        return model
    if strategy() == "fsdp":
        return _fsdp().shard_model(model)
    trainable = {id(p) for p in params}
    frozen = [name for name, p in model.named_parameters() if id(p) not in trainable]
    if frozen:
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def no_sync(model: nn.Module) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if _is_sharded(model):
        return _fsdp().gradient_sync(model, enabled=False)
    return nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile wrappers (FSDP2 shards in place: the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _fsdp() -> ModuleType:
    """``calm.train.fsdp``, imported on first use: it loads torch's FSDP2 and DTensor packages (a second
    or two), which a single-process run never needs."""
    from calm.train import fsdp

    return fsdp


def _is_sharded(model: nn.Module) -> bool:
    if not tdist.is_initialized():
        return False
    return _fsdp().is_sharded(unwrap(model))


def evaluation(model: nn.Module) -> AbstractContextManager[Any]:
    """Context for evaluating the unwrapped model: FSDP2 keeps the root gathered; a no-op otherwise."""
    if _is_sharded(model):
        return _fsdp().unsharded(unwrap(model))
    return nullcontext()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Gathered weights of a sharded model (every rank must call); None when not sharded."""
    if not _is_sharded(model):
        return None
    return _fsdp().full_state_dict(unwrap(model))


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any] | None:
    """Gathered optimizer state of a sharded model (every rank must call); None when not sharded."""
    if not _is_sharded(model):
        return None
    return _fsdp().full_optimizer_state(optimizer)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a full optimizer state, sharding it when the model is sharded."""
    if _is_sharded(model):
        _fsdp().load_optimizer_state(optimizer, state_dict)
    else:
        optimizer.load_state_dict(state_dict)


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """The total gradient norm as an ordinary tensor (FSDP2 returns a DTensor)."""
    if tdist.is_initialized():
        return _fsdp().full_value(norm)
    return norm
