"""Gradients and directions as pieces: one tensor per scored parameter, shaped like it.

The scorers read and write gradients per parameter (never as one flat [D] vector);
`alignment` returns flat [D] directions, and both forms are accepted where a direction is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradalign.core.common import EPS

Pieces = list[Tensor]
Direction = Tensor | Sequence[Tensor]  # flat [D] (as `alignment` returns) or Pieces


def as_pieces(direction: Direction, params: Sequence[Tensor]) -> Pieces:
    """Split a flat [D] direction into per-parameter pieces (Pieces pass through, checked)."""
    if isinstance(direction, Tensor):
        sizes = [p.numel() for p in params]
        if direction.dim() != 1 or direction.numel() != sum(sizes):
            raise ValueError(
                f"direction of shape {tuple(direction.shape)}: expected [{sum(sizes)}]"
            )
        return [d.reshape(p.shape) for d, p in zip(direction.split(sizes), params)]
    if [d.shape for d in direction] != [p.shape for p in params]:
        raise ValueError("direction pieces: expected the scored parameters' shapes")
    return list(direction)


def flatten_pieces(pieces: Sequence[Tensor]) -> Tensor:
    """Pieces -> one flat float64 vector. # [D]"""
    return torch.cat([d.reshape(-1).double() for d in pieces])


def unit_pieces(pieces: Sequence[Tensor]) -> Pieces:
    """g / (||g|| + 1e-5), the norm over all pieces together."""
    norm = float(flatten_pieces(pieces).norm())
    return [d / (norm + EPS) for d in pieces]


def zero_pieces(params: Sequence[Tensor]) -> Pieces:
    """Zeros shaped like each parameter (fp32). # Pieces"""
    return [torch.zeros_like(p, dtype=torch.float32) for p in params]
