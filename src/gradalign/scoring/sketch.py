"""Seeded sketches S g of group gradients: features for analysis (`select.project_dim`).

A CountSketch (sparse sign random projection, Clarkson & Woodruff 2013) per parameter:
coordinate d of parameter j goes to bucket h_j(d) with sign s_j(d), both drawn from a generator
seeded by (seed, j), so E[<Sx, Sy>] = <x, y> and the same seed gives the same S on every rank;
no D x project_dim matrix is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gradalign.scoring.pieces import Direction, as_pieces


class CountSketch:
    """S into `project_dim` dimensions, applied parameter by parameter."""

    def __init__(self, params: Sequence[Tensor], project_dim: int, seed: int) -> None:
        self.project_dim, self.seed, self.params = project_dim, seed, params
        self.maps: dict[int, tuple[Tensor, Tensor]] = {}

    def apply(self, j: int, g: Tensor) -> Tensor:
        """S_j g of parameter j's part of each row. # [P, D_j] -> [P, project_dim]"""
        if j not in self.maps:
            seed_j = int(np.random.SeedSequence([self.seed, j]).generate_state(1)[0])
            gen = torch.Generator().manual_seed(seed_j)
            n, dev = self.params[j].numel(), self.params[j].device
            bucket = torch.randint(self.project_dim, (n,), generator=gen)
            sign = torch.randint(2, (n,), generator=gen).float() * 2 - 1
            self.maps[j] = (bucket.to(dev), sign.to(dev))
        bucket, sign = self.maps[j]
        return g.new_zeros(g.shape[0], self.project_dim).index_add_(1, bucket, g * sign)


def project_direction(
    direction: Direction, params: Sequence[Tensor], project_dim: int = 512, seed: int = 0
) -> np.ndarray:
    """The seeded projection S of one direction (e.g. g^_V), as `fastscore.projected_gradients`
    projects each g_p. # -> [project_dim] float64"""
    sketch, pieces = CountSketch(params, project_dim, seed), as_pieces(direction, params)
    z = [
        sketch.apply(j, d.reshape(1, -1).to(params[j].device, torch.float32))
        for j, d in enumerate(pieces)
    ]
    return torch.cat(z).sum(0).double().cpu().numpy()
