"""Distributed scoring: a chunk's groups sharded over ranks (torch.distributed).

Notation: R ranks, P candidate groups, V validation groups, D scored parameters.

Every rank holds the same model and the same candidate and validation batches. Rank r
scores only the contiguous groups `shard(P, r, R)`; the directions are sums over groups, so
each rank sums over its own groups and one all_reduce per scored parameter adds the parts:

    g_V = sum_r sum_{v in shard r} g_v    (or of unit(g_v): ``mean_of_unit``)   -> g^_V = unit(g_V)
    g_C = sum_r sum_{p in shard r} g_p    (mode `align` only)                    -> g^_C = unit(g_C)

Each rank then reads dot_val, dot_chunk and norm of its groups off one batched backward
(`gradalign.scoring.fastscore`), and an all_gather puts the 3 floats per group back in group
order on every rank. Every rank then holds the same scores and makes the same selection; the
loop broadcasts rank 0's (`gradalign.ranks.broadcast_object`), so all ranks train on one
selection even if their floating-point results ever differed.
With one process (torch.distributed not initialised) this is exactly the fastscore path.
The process group itself (rank, world size, collectives): `gradalign.ranks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor, nn

from gradalign.core.alignment import GroupAlignment, Progress, direction_norm
from gradalign.core.common import ValAggregate
from gradalign.core.grpo import SequenceBatch
from gradalign.ranks import all_reduce_sum, gather_groups, shard, world
from gradalign.scoring import fastscore
from gradalign.scoring.pieces import Pieces, zero_pieces


def shard_batch(batch: SequenceBatch, groups: range) -> SequenceBatch | None:
    """The rows of groups `groups` (renumbered from 0), or None when there are none."""
    if len(groups) == 0:
        return None
    return batch.take_groups(groups)


def distributed_validation_halves(
    model: nn.Module,
    params: Sequence[Tensor],
    val_batch: SequenceBatch,
    halves: Sequence[range],
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> list[Pieces]:
    """g_V summed over each of `halves` (disjoint validation group ranges covering the set),
    each rank summing over its shard's groups in each half and one all_reduce per half adding
    the parts: the halves add up to g_V (`fastscore.batched_validation_sum` in one process)."""
    rank, size = world()
    mine = set(shard(val_batch.num_groups, rank, size))
    out = []
    for half in halves:
        groups = [g for g in half if g in mine]
        part = (
            fastscore.batched_validation_sum(
                model, params, val_batch.take_groups(groups), aggregate, groups_per_micro
            )
            if groups
            else zero_pieces(params)
        )
        out.append(all_reduce_sum(part))
    return out


def distributed_group_alignment(
    model: nn.Module,
    params: Sequence[Tensor],
    cand_batch: SequenceBatch,
    direction: Pieces,
    groups_per_micro: int = 16,
    chunk: bool = True,
    exp_avg_sq: Mapping | None = None,
    progress: Progress | None = None,
) -> GroupAlignment:
    """dot_val (against `direction`, the same on every rank), dot_chunk (``chunk``: mode
    `align`) and norm of every candidate group, each rank scoring its shard of the groups;
    `fastscore.batched_alignment` in one process. `progress` counts this rank's groups only."""
    rank, size = world()
    if size == 1:
        return fastscore.batched_alignment(
            model, params, cand_batch, direction, groups_per_micro, progress,
            chunk=chunk, exp_avg_sq=exp_avg_sq,
        )  # fmt: skip
    cand = shard_batch(cand_batch, shard(cand_batch.num_groups, rank, size))
    if cand is None:  # more ranks than groups: still take part in every collective
        if chunk:
            all_reduce_sum(zero_pieces(params))
        empty = np.zeros(0)
        local = GroupAlignment(empty, empty, empty)
    else:
        local = fastscore.batched_alignment(
            model, params, cand, direction, groups_per_micro, progress,
            chunk=chunk, exp_avg_sq=exp_avg_sq, reduce_chunk=all_reduce_sum,
        )  # fmt: skip
    dot_val, dot_chunk, norm = gather_groups(
        [local.dot_val, local.dot_chunk, local.norm], cand_batch.num_groups
    )
    return GroupAlignment(dot_val, dot_chunk, norm, val_norm=direction_norm(direction))


def distributed_projected_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    cand_batch: SequenceBatch,
    project_dim: int = 512,
    seed: int = 0,
    groups_per_micro: int = 16,
    exp_avg_sq: Mapping | None = None,
) -> np.ndarray:
    """`fastscore.projected_gradients` of every candidate group, each rank projecting its
    shard (the sketch is seeded, so it is the same on every rank). # -> [P, project_dim] float64"""
    rank, size = world()
    if size == 1:
        return fastscore.projected_gradients(
            model, params, cand_batch, project_dim, seed, groups_per_micro, exp_avg_sq
        )
    cand = shard_batch(cand_batch, shard(cand_batch.num_groups, rank, size))
    z = (
        fastscore.projected_gradients(
            model, params, cand, project_dim, seed, groups_per_micro, exp_avg_sq
        )
        if cand is not None
        else np.zeros((0, project_dim))
    )
    return gather_groups([z], cand_batch.num_groups)[0]
