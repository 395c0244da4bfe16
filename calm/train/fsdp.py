"""FSDP2 sharding for ``--strategy fsdp``: ``fully_shard`` per block, then the root (torchtitan's layout).

The repeated blocks of a model (Transformer ``Block``s, the autoencoder's ``AELayer``s, the energy
head's ``MLPBlock``s) each become one FSDP unit, so only one block's full weights are gathered at a
time; the root unit holds the rest (embeddings, input compression, final norms, heads). Frozen
parameters, i.e. the autoencoder inside CALM, are handed to ``fully_shard`` as ``ignored_params``:
they are never sharded or all-gathered and every rank keeps the whole frozen autoencoder, loaded
from the same checkpoint.

Checkpoints stay in the single-directory format of ``calm.checkpoint``: ``full_state_dict`` and
``full_optimizer_state`` gather the sharded tensors (a collective: every rank calls them), rank 0
writes them, and ``load_optimizer_state`` shards a full optimizer state back onto the parameters.
Because ``fully_shard`` keeps the parameter order, optimizer state indices are the same with and
without FSDP, so a checkpoint can be resumed under either strategy and any world size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from calm.models.autoencoder import AELayer
from calm.models.heads import MLPBlock
from calm.models.layers import Block

_BLOCK_TYPES: tuple[type[nn.Module], ...] = (Block, AELayer, MLPBlock)
"""The repeated blocks, each one FSDP unit."""


def _trainable(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it; frozen parameters stay whole on every rank.

    Trainable weights are first broadcast from rank 0 (like DDP's start-up sync), so ranks that
    initialised differently still train one model.
    """
    frozen = {p for p in model.parameters() if not p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            tdist.broadcast(p.data, src=0)
    blocks = [m for m in model.modules() if isinstance(m, _BLOCK_TYPES) and _trainable(m)]
    for block in blocks:
        fully_shard(block)
    fully_shard(model, ignored_params=frozen or None)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the reduce-scatter on accumulation micro-steps (FSDP2's counterpart of DDP ``no_sync``)."""
    if enabled or not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Keep the root's parameters gathered, so code that calls submodules directly (evaluation,
    generation: ``model.head.sample``, ``model.hidden_states``) sees ordinary tensors. Blocks still
    gather themselves in their own forward. Every rank must enter it (the gather is a collective).
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered from the shards (call on every rank)."""
    return {k: _full(v) for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded moments gathered to whole CPU tensors (every rank)."""
    sd = optimizer.state_dict()
    state = {idx: {k: _full(v) if torch.is_tensor(v) else v for k, v in s.items()} for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Load a full (gathered) optimizer state, sharding each moment like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for idx, s in state_dict["state"].items():
        param = params[int(idx)]
        out = {}
        for k, v in s.items():
            if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape:
                v = distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            out[k] = v
        state[int(idx)] = out
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A gathered tensor from a DTensor (e.g. the total norm of sharded gradients); others unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t
