"""A scored parameter's uses in one forward, and the per-group gradients G_p they give.

Notation: P groups · Tm token slots per group (zero-padded) · o, i the two sides of a
parameter viewed as a matrix [o, i] (a vector [o] is [o, 1]) · K directions G^.

Each call of a module that owns a scored parameter is one *use* (`gradalign.scoring.capture`
records them), of one of two kinds:

    DenseUse(left, right)       a linear layer or its bias: G_p = sum_t left_t right_t^T
                                left_t = b_t [o] (output gradient), right_t = a_t [i] (input,
                                1 for a bias)
    EmbeddingUse(index, right)  an embedding lookup: row index_t of G_p gets right_t = b_t [i]

Per parameter, the group gradients are either formed (`materialise`: G_p of every group, one
bmm) or read without being formed (`gram_stats`: ||G_p||^2 = sum_{t,s} (l_t.l_s)(r_t.r_s) and
<G_p, G^> = sum_t l_t^T G^ r_t); `choose` picks the one with fewer flops. `verify` checks the
uses' sum against autograd's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

Method = Literal["auto", "materialise", "gram"]
MAX_MATERIALISE_BYTES = 1 << 30  # per parameter and micro-batch; above it "auto" picks gram
ROUNDOFF_FLOOR = 100  # round-off bound in units of eps x term scale (see `verify`)


@dataclass(frozen=True)
class DenseUse:
    """A linear use: G_p = sum_t left_t right_t^T."""

    left: Tensor  # float [P, Tm, o], the output gradients b_t
    right: Tensor  # float [P, Tm, i], the inputs a_t (ones [P, Tm, 1] for a bias)

    def dot(self, direction: Tensor) -> Tensor:
        """<G_p, G^> = sum_t left_t^T G^ right_t. # [o, i] -> [P]"""
        return ((self.left @ direction) * self.right).sum((1, 2))

    def add_sum(self, total: Tensor) -> Tensor:
        """total + sum_p G_p. # [o, i]"""
        o, i = self.left.shape[-1], self.right.shape[-1]
        return total + self.left.reshape(-1, o).T @ self.right.reshape(-1, i)

    def term_scale(self) -> float:
        """An upper bound on sum_t ||left_t right_t^T||, the size of the summed terms."""
        return float(self.left.float().norm()) * float(self.right.float().norm())


@dataclass(frozen=True)
class EmbeddingUse:
    """A lookup: row index_t of G_p gets right_t."""

    index: Tensor  # long [P, Tm], the looked-up rows x_t
    right: Tensor  # float [P, Tm, i], the output gradients b_t

    def dot(self, direction: Tensor) -> Tensor:
        """<G_p, G^> = sum_t G^[x_t] . b_t. # [o, i] -> [P]"""
        return (direction[self.index] * self.right).sum((1, 2))

    def add_sum(self, total: Tensor) -> Tensor:
        """total + sum_p G_p. # [o, i]"""
        i = self.right.shape[-1]
        return total.index_add(0, self.index.reshape(-1), self.right.reshape(-1, i))

    def term_scale(self) -> float:
        """sum_t ||b_t||, the size of the summed terms."""
        i = self.right.shape[-1]
        return float(self.right.reshape(-1, i).float().norm(dim=1).sum())


Use = DenseUse | EmbeddingUse


def shape2d(prm: Tensor) -> tuple[int, int]:
    """(o, i): a parameter viewed as a matrix (a vector [o] as [o, 1])."""
    o = prm.shape[0] if prm.dim() else 1
    return o, prm.numel() // o


def choose(method: Method, uses: list[Use], p: int, tm: int, o: int, i: int, num_dirs: int) -> str:
    """Fewer flops wins: forming G_p costs U P Tm o i + (K+1) P o i; gram U^2 P Tm^2 (o+i) +
    K U P Tm o i (a direction needs every token's l_t^T G^ r_t either way)."""
    if method != "auto":
        return method
    if p * o * i * 4 > MAX_MATERIALISE_BYTES:
        return "gram"
    u = len(uses)
    mat = u * p * tm * o * i + (num_dirs + 1) * p * o * i
    gram = u * u * p * tm * tm * (o + i) + num_dirs * u * p * tm * o * i
    return "materialise" if mat <= gram else "gram"


def materialise(uses: list[Use], local: Tensor | None, p: int, o: int, i: int) -> Tensor:
    """G_p of every group: `local` (autograd's per-group part, if any) plus every use.
    # -> [P, o*i]"""
    g = local.reshape(p, o, i) if local is not None else None
    for use in sorted(uses, key=lambda u: isinstance(u, EmbeddingUse)):  # dense uses first
        if isinstance(use, EmbeddingUse):  # row x_t of G_p gets b_t
            g = use.right.new_zeros(p, o, i) if g is None else g
            rows = use.index + torch.arange(p, device=use.index.device)[:, None] * o  # [P, Tm]
            g.view(p * o, i).index_add_(0, rows.reshape(-1), use.right.reshape(-1, i))
        elif g is None:
            g = torch.bmm(use.left.transpose(1, 2), use.right)  # [P, o, Tm] @ [P, Tm, i]
        else:
            g = g.baddbmm_(use.left.transpose(1, 2), use.right)
    assert g is not None
    return g.reshape(p, o * i)


def _left_gram(u: Use, v: Use) -> Tensor:
    """<l_t, l_s> of two uses' left sides: dense output gradients, or one-hot rows x_t.
    # -> [P, Tm, Tm]"""
    if isinstance(u, EmbeddingUse) and isinstance(v, EmbeddingUse):
        return (u.index[:, :, None] == v.index[:, None, :]).float()
    if isinstance(u, DenseUse) and isinstance(v, EmbeddingUse):
        return u.left.gather(2, v.index[:, None, :].expand(-1, u.left.shape[1], -1))
    if isinstance(u, EmbeddingUse) and isinstance(v, DenseUse):
        return _left_gram(v, u).transpose(1, 2)
    assert isinstance(u, DenseUse) and isinstance(v, DenseUse)
    return torch.bmm(u.left, v.left.transpose(1, 2))


def gram_stats(uses: list[Use], dirs: list[Tensor], o: int, i: int) -> tuple[Tensor, Tensor]:
    """<G_p, G^_k> and ||G_p||^2 without forming G_p. # -> [K, P], [P]"""
    sq = cast(
        Tensor,
        sum(
            (_left_gram(u, v) * torch.bmm(u.right, v.right.transpose(1, 2))).sum((1, 2))
            for u in uses
            for v in uses
        ),
    )  # [P]; `sum` of tensors: a tensor (uses is never empty)
    dots = [cast(Tensor, sum(use.dot(d.reshape(o, i)) for use in uses)) for d in dirs]
    return torch.stack(dots) if dots else sq.new_zeros(0, len(sq)), sq


def verify(
    uses: list[list[Use]], local: list, autograd: Sequence, params: Sequence, weight: float
) -> bool:
    """sum_p G_p must be autograd's gradient; it is not when a scored parameter is used
    outside its module's forward (a functional use, an in-place change): hooks cannot see it.

    Both sides are sums of many per-token terms, so their round-off scales with the size of
    those terms (`scale`, an upper bound on the norm of their sum of absolute values), not
    with the size of the result: a group whose rollouts' advantages cancel has a true
    gradient near 0 and a relative error of 100%. The same holds upstream of the hooks, so
    `weight` (the loss's total token weight, sum |A_i| n_i / T_p) bounds it too. A mismatch
    within round-off of either proves nothing: it returns False (inconclusive) and the caller
    checks the next micro-batch. A mismatch beyond it raises; True when every parameter agreed.
    """
    conclusive = True
    for j, (prm, want) in enumerate(zip(params, autograd)):
        o, i = shape2d(prm)
        got = prm.new_zeros(o, i, dtype=torch.float32)
        scale = 0.0
        if local[j] is not None:
            got = got + local[j].sum(0).reshape(o, i)
            scale += float(local[j].reshape(len(local[j]), -1).norm(dim=1).sum())
        for use in uses[j]:
            got = use.add_sum(got)
            scale += use.term_scale()
        want = want.reshape(o, i).float() if want is not None else torch.zeros_like(got)
        eps = torch.finfo(prm.dtype).eps
        tol = max(1e-3, 10 * eps)  # autograd's own round-off (bf16)
        err = float((got - want).norm())
        if err <= tol * max(float(want.norm()), float(got.norm())):
            continue
        eps = max(eps, torch.finfo(torch.float32).eps)
        if err <= ROUNDOFF_FLOOR * eps * max(scale, weight):
            conclusive = False  # both sides are round-off of cancelling terms
            continue
        raise RuntimeError(
            f"scored parameter {j} {tuple(prm.shape)}: the hooks' per-group gradients do not"
            " sum to autograd's (used outside its module's forward?); use exact_alignment"
        )
    return conclusive
