"""Checkpoints and the final model of an FSDP2-sharded run (``train.fsdp``), consolidated.

A sharded run writes the same run directory as an unsharded one: ``policy.pt`` holds each
trainable parameter whole (so `gradalign export` and a resume without FSDP read it as they
read any), ``trainer.pt`` the whole Adam state keyed by parameter name (torch.distributed.
checkpoint's full optimizer state dict: a sharded run resumes from it), and ``final/`` is a
``save_pretrained`` model. Every rank takes part in gathering (each parameter is
all_gathered in turn, to CPU on rank 0 only); rank 0 alone writes. On resume every rank
holds the checkpoint and keeps its own shard of it.
"""

from __future__ import annotations

import copy
import os
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gradalign.config import ConfigError
from gradalign.scoring import sharded

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True)
SCATTER_WEIGHTS = StateDictOptions(full_state_dict=True, strict=False)  # a tied weight once
LAUNCH = "accelerate launch --num_processes R -m gradalign.cli run CONFIG"


def check_training(device: str) -> None:
    """``train.fsdp`` in `gradalign run`: training needs GPUs (accelerate runs FSDP only
    there); `gradalign score` shards on CPU too (gloo)."""
    if device == "cpu":
        raise ConfigError(
            "train.fsdp: accelerate runs FSDP only on GPUs and model.device is cpu; set "
            "model.device: cuda, or drop train.fsdp (torchrun on CPU shares the scoring out "
            "as data parallelism)"
        )


def shard_policy(model: nn.Module, device: str) -> nn.Module:
    """``train.fsdp``: FSDP2-shard the policy before the trainer is built (accelerate takes an
    already sharded model as it is, and the first round's scoring is sharded too), or before
    `gradalign score` scores."""
    if not dist.is_initialized() and {"RANK", "MASTER_ADDR"} <= set(os.environ):
        cuda = device.startswith("cuda")  # a launcher of 1 rank: FSDP still needs a group
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        raise ConfigError(f"train.fsdp: needs a launcher with a process group: {LAUNCH}")
    return model if sharded.is_sharded(model) else sharded.shard_model(model)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on CPU, on rank 0 ({} elsewhere); call on every rank.
    Named as `named_parameters` names them (a tied weight once), as `checkpoint.trainable_state`."""
    full = get_model_state_dict(model, options=GATHER)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {n: cast(torch.Tensor, full[n]) for n in names} if full else {}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """(whole trainable weights, whole optimizer state) on rank 0 for a sharded model; None
    for an unsharded one (its own state dicts are whole). Call on every rank."""
    if not sharded.is_sharded(model):
        return None
    optim = get_optimizer_state_dict(model, optimizer, options=GATHER)
    return full_weights(model), optim


def load_full_state(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optim: dict[str, Any] | None = None,
) -> None:
    """Each rank keeps its shard of whole `weights` (and of the whole optimizer state `optim`),
    every rank holding them (copies are passed on: torch.distributed.checkpoint edits them)."""
    set_model_state_dict(model, dict(weights), options=SCATTER_WEIGHTS)
    if optimizer is not None and optim is not None:
        set_optimizer_state_dict(model, optimizer, copy.deepcopy(optim), options=SCATTER)
