"""Group gradients and their alignment with a reference direction (exact reference path).

Notation: P groups · D scored parameters (flattened). g_p = grad_theta L_p (see `grpo`).

- validation direction: g_V = sum_v g_v (or sum_v g_v / (||g_v|| + 1e-5) with
  ``mean_of_unit``), then g^_V = g_V / (||g_V|| + 1e-5)   (GradAlign, arXiv 2602.21492)
- chunk direction (LearnAlign-style `align` mode): g^_C from g_C = sum_{p in chunk} g_p
- per candidate: dot_val = <g_p, g^_V>, dot_chunk = <g_p, g^_C>, norm = ||g_p||

The exact path runs one backward per group and reads each g_p as a flat vector; it is the
reference that faster scorers are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gradalign.core.common import EPS, ValAggregate, check_val_aggregate
from gradalign.core.grpo import SequenceBatch, scoring_loss

Progress = Callable[[int], None]


@dataclass(frozen=True)
class GroupAlignment:
    """Alignment statistics of P candidate groups (all float64 [P])."""

    dot_val: np.ndarray  # <g_p, g^_V>
    dot_chunk: np.ndarray  # <g_p, g^_C>
    norm: np.ndarray  # ||g_p||
    val_norm: float | None = None  # ||g^_V||: ~1, 0 when g_V = 0 (`selection.select` falls back)

    @property
    def cos_val(self) -> np.ndarray:
        return self.dot_val / (self.norm + EPS)

    @property
    def cos_chunk(self) -> np.ndarray:
        return self.dot_chunk / (self.norm + EPS)


def flat_grad(loss: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
    """grad of `loss` over `params`, flattened and concatenated. # [D]"""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
            for g, p in zip(grads, params)
        ]
    )


def iter_group_gradients(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: SequenceBatch
) -> Iterator[Tensor]:
    """g_p for p = 0..P-1, one backward per group. Yields [D] (float64).

    A group whose advantages are all zero (zero reward variance) has g_p = 0 exactly, so
    its backward is skipped."""
    size = sum(p.numel() for p in params)
    rows_of = batch.group_rows()
    for p, rows in enumerate(rows_of):
        if not bool(batch.advantages[rows].any()):
            yield torch.zeros(size, dtype=torch.float64, device=batch.advantages.device)
            continue
        yield flat_grad(scoring_loss(model, batch.take_groups([p], rows_of)), params)


def summed_gradient(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: SequenceBatch,
    groups_per_micro: int = 8,
) -> Tensor:
    """sum_p g_p, computed over micro-batches of whole groups. # [D]"""
    rows_of = batch.group_rows()
    total = None
    for start in range(0, batch.num_groups, groups_per_micro):
        groups = range(start, min(start + groups_per_micro, batch.num_groups))
        g = flat_grad(scoring_loss(model, batch.take_groups(groups, rows_of)), params)
        total = g if total is None else total + g
    assert total is not None
    return total


def direction_norm(direction: Tensor | Sequence[Tensor]) -> float:
    """||d|| in float64 of a flat [D] direction or of per-parameter pieces (NaN if any entry
    is NaN); 0.0 when g_V = 0, i.e. every validation advantage was 0."""
    pieces = [direction] if isinstance(direction, Tensor) else direction
    return math.sqrt(
        sum(float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in pieces)
    )


def unit(v: Tensor) -> Tensor:
    return v / (v.norm() + EPS)


def validation_direction(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: SequenceBatch,
    aggregate: ValAggregate = "sum",
) -> Tensor:
    """g^_V = g_V / (||g_V|| + 1e-5), g_V = sum_v g_v (or sum_v unit(g_v)). # [D]"""
    return unit(validation_sum(model, params, batch, aggregate))


def validation_sum(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: SequenceBatch,
    aggregate: ValAggregate = "sum",
) -> Tensor:
    """g_V before normalising: sum_v g_v (or sum_v unit(g_v)), a sum over groups, so sums
    over disjoint sets of validation groups add up to it. # [D]"""
    check_val_aggregate(aggregate)
    if aggregate == "sum":
        return summed_gradient(model, params, batch)
    total = None
    for g in iter_group_gradients(model, params, batch):
        total = unit(g) if total is None else total + unit(g)
    assert total is not None
    return total


def exact_alignment(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch: SequenceBatch,
    val_direction: Tensor,
    progress: Progress | None = None,
    chunk: bool = True,
) -> GroupAlignment:
    """dot_val, dot_chunk and norm of every candidate group, one backward per group.
    ``chunk=False`` skips g^_C (dot_chunk is then NaN; only the `align` mode reads it)."""
    chunk_direction = unit(summed_gradient(model, params, batch)) if chunk else None
    dot_val, dot_chunk, norm = [], [], []
    for g in iter_group_gradients(model, params, batch):
        dot_val.append(float(g @ val_direction))
        dot_chunk.append(float(g @ chunk_direction) if chunk_direction is not None else np.nan)
        norm.append(float(g.norm()))
        if progress is not None:
            progress(1)
    return GroupAlignment(
        np.array(dot_val), np.array(dot_chunk), np.array(norm), direction_norm(val_direction)
    )
