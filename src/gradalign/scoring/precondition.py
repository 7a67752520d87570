"""LESS preconditioning (Xia et al. 2024): score g~_p = g_p / (sqrt(v) + eps), with v the
trainer's Adam second moment (``select.precondition=adam``).

The batched scorer applies `adam_scale` to each formed g_p (`fastscore.batched_alignment`
with ``exp_avg_sq``); `exact_preconditioned_alignment` is its one-backward-per-group reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gradalign.core import alignment
from gradalign.core.alignment import GroupAlignment
from gradalign.core.grpo import SequenceBatch
from gradalign.scoring.pieces import Direction, Pieces, as_pieces, flatten_pieces


def adam_exp_avg_sq(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """{param: exp_avg_sq} from an Adam(W) optimizer's state."""
    return {p: optimizer.state[p]["exp_avg_sq"] for p in params}


def adam_scale(params: Sequence[Tensor], exp_avg_sq: Mapping, eps: float = 1e-8) -> Pieces:
    """The preconditioner 1 / (sqrt(v) + eps) of each scored parameter."""
    if any(p not in exp_avg_sq for p in params):
        raise ValueError("exp_avg_sq lacks some scored parameters")
    return [1.0 / (exp_avg_sq[p].detach().to(p.device).float().sqrt() + eps) for p in params]


def exact_preconditioned_alignment(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: SequenceBatch,
    val_direction: Direction,
    exp_avg_sq: Mapping,
    adam_eps: float = 1e-8,
) -> GroupAlignment:
    """Reference for preconditioned scoring, one backward per group: g~_p = g_p /
    (sqrt(v) + eps); dot_val = <g~_p, g^_V>, dot_chunk = <g~_p, unit(sum_q g~_q)>, norm ||g~_p||."""
    scale = flatten_pieces(adam_scale(params, exp_avg_sq, adam_eps))  # [D]
    val = flatten_pieces(as_pieces(val_direction, params)).to(scale.device)
    chunk = alignment.unit(scale * alignment.summed_gradient(model, params, batch).to(scale.device))
    grads = (
        g.to(scale.device) * scale for g in alignment.iter_group_gradients(model, params, batch)
    )
    stats = np.array([(float(g @ val), float(g @ chunk), float(g.norm())) for g in grads])
    return GroupAlignment(stats[:, 0], stats[:, 1], stats[:, 2], alignment.direction_norm(val))
