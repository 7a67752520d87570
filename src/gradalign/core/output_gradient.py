"""The LM head's gradient of a group's scoring loss, read off the forward pass alone.

Notation: N rows · T next-token positions · M tokens · V vocabulary · d hidden size ·
a, b the two projection dimensions.

With z_t = W h_t (+ b) the head's logits at token t (h_t the last hidden state, the head's
input) and the group loss of `grpo` (GradAlign, arXiv 2602.21492),

    L_p = -(1/T_p) sum_{i in p} sum_t A_i log softmax(z_t)[y_t]
    dL_p/dW = sum_t w_t r_t h_t^T        [V, d]     w_t = A_i / T_p on completion tokens
    dL_p/db = sum_t w_t r_t              [V]        r_t = softmax(z_t) - e_{y_t}

(the output-layer gradient feature, as in LESS's and its successors' last-layer variants):
no backward is needed. Projected on both sides by seeded Gaussian matrices R_1 [V, a] and
R_2 [d, b] with entries of variance 1/a and 1/b, so that E <R_1^T X R_2, R_1^T Y R_2> = <X, Y>,

    Phi_p = R_1^T (dL_p/dW) R_2 = sum_t w_t (R_1^T r_t)(R_2^T h_t)^T      [a, b]
    R_1^T r_t = R_1^T softmax(z_t) - R_1[y_t]                              [a]

and the V x d matrix is never formed (a * b numbers per group).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def token_weights(
    completion_mask: Tensor, advantages: Tensor, group: Tensor, num_groups: int
) -> Tensor:
    """w_{i,t} = A_i / T_p on completion tokens, 0 elsewhere, so that L_p = -sum w log pi.
    # [N, T]"""
    mask = completion_mask.float()
    tokens = torch.zeros(num_groups, device=mask.device).index_add_(0, group, mask.sum(1))  # T_p
    return mask * (advantages.float() / tokens.clamp(min=1)[group])[:, None]


def residual(z: Tensor, y: Tensor) -> Tensor:
    """r_t = softmax(z_t) - e_{y_t}. # [M, V], [M] -> [M, V] fp32"""
    r = torch.softmax(z.float(), dim=-1)
    return r.scatter_add_(1, y[:, None], r.new_full((len(y), 1), -1.0))


def head_gradient(r: Tensor, h: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_t w_t r_t h_t^T, sum_t w_t r_t) of M tokens. # -> [V, d], [V]"""
    rw = r * w[:, None]  # [M, V]
    return rw.T @ h.float(), rw.sum(0)


def projections(vocab: int, hidden: int, dims: tuple[int, int], seed: int) -> tuple[Tensor, Tensor]:
    """R_1 [V, a] ~ N(0, 1/a) and R_2 [d, b] ~ N(0, 1/b), drawn on the CPU from a generator
    seeded by (seed, V, d, a, b): the same on every rank and machine. # -> [V, a], [d, b]"""
    a, b = dims
    state = np.random.SeedSequence([seed, vocab, hidden, a, b]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    r1 = torch.randn(vocab, a, generator=gen) / a**0.5
    r2 = torch.randn(hidden, b, generator=gen) / b**0.5
    return r1, r2


def projected_head_gradient(
    probs: Tensor, y: Tensor, h: Tensor, w: Tensor, r1: Tensor, r2: Tensor
) -> tuple[Tensor, Tensor]:
    """(Phi = R_1^T (sum_t w_t r_t h_t^T) R_2, R_1^T sum_t w_t r_t) of M tokens from their
    softmax(z_t) (never forming V x d). # [M, V], [M], [M, d], [M] -> [a, b], [a]"""
    u = (probs @ r1 - r1[y]) * w[:, None]  # w_t R_1^T r_t  [M, a]
    return u.T @ (h.float() @ r2), u.sum(0)
