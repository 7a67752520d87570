"""The process group: rank, world size, and the collectives the loop, `gradalign score`, the
trainer and the sharded scorer share (torch.distributed; gloo on CPU, NCCL on CUDA).

With one process (torch.distributed not initialised) every function is the identity it
should be: rank 0 of a world of 1, `broadcast_object` returns its argument, the gathers a
one-element list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes, and whose selection
    every rank trains on."""
    return world()[0] == 0


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (WORLD_SIZE > 1, RANK, MASTER_ADDR/PORT): gloo on CPU, NCCL on CUDA, where
    each rank's current CUDA device becomes LOCAL_RANK (so "cuda" means its own GPU).
    Idempotent; without a launcher nothing happens. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def shutdown() -> None:
    """Leave the process group (after a barrier) if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of n items: sizes differ by at most one, the first
    n % world_size ranks take one more, and the shards in rank order cover 0..n-1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def all_reduce_sum(pieces: Sequence[Tensor]) -> list[Tensor]:
    """Sum each piece over ranks (fp32 on the wire, one all_reduce per piece); dtype kept."""
    out = []
    for piece in pieces:
        buf = piece.float().contiguous()
        if world()[1] > 1:
            dist.all_reduce(buf)
        out.append(buf.to(piece.dtype))
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """`src`'s object on every rank (a pickle); the object itself in a single process."""
    if world()[1] == 1:
        return obj
    box: list[Any] = [obj if world()[0] == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # src's obj


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if world()[1] == 1:
        return [obj]
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, obj)
    return parts


def gather_groups(local: Sequence[np.ndarray], total: int) -> list[np.ndarray]:
    """Per-group arrays of each rank's contiguous shard, concatenated in rank order: the
    arrays of all `total` groups, on every rank."""
    if world()[1] == 1:
        return list(local)
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, [np.asarray(a) for a in local])
    out = [np.concatenate([p[j] for p in parts]) for j in range(len(local))]
    if any(len(a) != total for a in out):
        raise RuntimeError(f"gathered {[len(a) for a in out]} groups, expected {total}")
    return out
