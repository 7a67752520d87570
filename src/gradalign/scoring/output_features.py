"""Output-layer feature scoring (``select.features=output``): each group's LM-head gradient
from one forward pass, exact or seeded-projected, and its alignment statistics.

Notation: P groups · N rows · M tokens with a nonzero weight · V vocabulary · d hidden size
· K directions · c tokens per chunk. The math is `core.output_gradient`.

Per micro-batch of whole groups, one forward of the model's body (no grad, no logits) gives
the head's input h_t; then each group's tokens, c at a time, give the head's logits, the
softmax residual and the group's feature (pieces, as `pieces.Pieces`):

    exact       [dL_p/dW [V, d], dL_p/db [V] (a head with a bias)]   one group's at a time
    projected   [Phi_p [a, b], R_1^T dL_p/db [a]]                    V x d never formed

With a tied head the weight is also the input embedding: the feature is the gradient of the
head's use only (the input lookup's share is left out), the LESS-style output-layer feature.
With LoRA the head is frozen and no adapter: the feature is the frozen head's gradient, a
proxy for the problem's effect on the policy, not the gradient of what is trained.
Zero-variance groups (all A_i = 0) have a zero feature and get no pass. Sharded over
torch.distributed ranks as `distributed` shards the full-gradient scorer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gradalign import ranks
from gradalign.core.alignment import GroupAlignment, Progress, direction_norm
from gradalign.core.common import EPS, ValAggregate, check_val_aggregate
from gradalign.core.grpo import SequenceBatch
from gradalign.core.logprobs import chunk_tokens, hidden_states, split_head
from gradalign.core.output_gradient import (
    head_gradient,
    projected_head_gradient,
    projections,
    residual,
    token_weights,
)
from gradalign.scoring import distributed as dd
from gradalign.scoring.pieces import Pieces, unit_pieces


@dataclass(frozen=True)
class HeadFeature:
    """What a group's feature is: the exact head gradient (dims None) or its seeded two-sided
    projection R_1^T G R_2 to dims = (a, b)."""

    dims: tuple[int, int] | None = None
    seed: int = 0
    chunk: int | None = None  # tokens per chunk (default: `logprobs.chunk_tokens`)


class _Head:
    """The model's body and head, and the projections of `feature` (built once)."""

    def __init__(self, model: nn.Module, feature: HeadFeature) -> None:
        split = split_head(model)
        if split is None:
            raise ValueError(
                "select.features=output: the model's logits are not a plain linear head on its "
                f"last hidden state ({type(model).__name__}, or a LoRA-wrapped head); use "
                "select.features=full"
            )
        self.body, head = split
        self.weight = head.weight.detach()
        self.bias: Tensor | None = head.bias.detach() if head.bias is not None else None
        vocab, hidden = self.weight.shape
        self.c = feature.chunk or chunk_tokens(vocab)
        self.proj = None
        if feature.dims is not None:
            r1, r2 = projections(vocab, hidden, feature.dims, feature.seed)
            self.proj = (r1.to(self.weight.device), r2.to(self.weight.device))

    def zeros(self) -> Pieces:
        """A zero feature. # Pieces"""
        dev = self.weight.device
        if self.proj is not None:
            a, b = self.proj[0].shape[1], self.proj[1].shape[1]
            out = [torch.zeros(a, b, device=dev)]
            return out + ([torch.zeros(a, device=dev)] if self.bias is not None else [])
        out = [torch.zeros(self.weight.shape, device=dev)]
        return out + ([torch.zeros(len(self.weight), device=dev)] if self.bias is not None else [])

    def feature(self, h: Tensor, y: Tensor, w: Tensor) -> Pieces:
        """One group's feature from its M tokens, c at a time. # [M, d], [M], [M] -> Pieces"""
        out = self.zeros()
        for s in range(0, len(h), self.c):
            hc, yc, wc = h[s : s + self.c], y[s : s + self.c], w[s : s + self.c]
            z = nn.functional.linear(hc, self.weight, self.bias)  # [c, V]
            if self.proj is not None:
                gw, gb = projected_head_gradient(
                    torch.softmax(z.float(), -1), yc, hc, wc, *self.proj
                )
            else:
                gw, gb = head_gradient(residual(z, yc), hc, wc)
            out[0] += gw
            if len(out) > 1:
                out[1] += gb
        return out


def iter_features(
    model: nn.Module, batch: SequenceBatch, feature: HeadFeature, groups_per_micro: int = 16
) -> Iterator[tuple[int, Pieces]]:
    """(group id, feature) of every group with a nonzero advantage, one forward of the body
    per micro-batch of whole groups (padding and prompt tokens have weight 0)."""
    head = _Head(model, feature)
    nonzero = (batch.advantages != 0).float()
    live = torch.zeros(batch.num_groups, device=nonzero.device).index_add_(0, batch.group, nonzero)
    ids = (live > 0).nonzero().squeeze(1).tolist()
    rows_of = batch.group_rows()
    for start in range(0, len(ids), groups_per_micro):
        chosen = ids[start : start + groups_per_micro]
        sub = batch.take_groups(chosen, rows_of)
        with torch.no_grad():
            h = hidden_states(head.body, sub.input_ids, sub.attention_mask)[:, :-1]  # [N, T, d]
            w = token_weights(sub.completion_mask, sub.advantages, sub.group, sub.num_groups)
            keep = w != 0  # [N, T]
            y, grp = sub.input_ids[:, 1:][keep], sub.group[:, None].expand_as(w)[keep]  # [M]
            h, w = h[keep], w[keep]  # [M, d], [M]
            for q, g in enumerate(chosen):
                mine = grp == q
                yield g, head.feature(h[mine], y[mine], w[mine])


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def feature_sum(
    model: nn.Module,
    batch: SequenceBatch,
    feature: HeadFeature,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> Pieces:
    """sum_v G_v (or sum_v unit(G_v), ``mean_of_unit``) of the batch's groups: a sum over
    groups, so sums over disjoint sets of groups add up."""
    check_val_aggregate(aggregate)
    total = _Head(model, feature).zeros()
    for _, g in iter_features(model, batch, feature, groups_per_micro):
        scale = 1.0 / (_dot(g, g) ** 0.5 + EPS) if aggregate == "mean_of_unit" else 1.0
        for acc, x in zip(total, g):
            acc += x * scale
    return total


def feature_alignment(
    model: nn.Module,
    batch: SequenceBatch,
    directions: Sequence[Sequence[Tensor]],
    feature: HeadFeature,
    groups_per_micro: int = 16,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """<G_p, dir_k> and ||G_p|| of every group (0 for zero-variance groups). # -> [K, P], [P]"""
    p = batch.num_groups
    dots, norm = np.zeros((len(directions), p)), np.zeros(p)
    done = 0
    for g, feat in iter_features(model, batch, feature, groups_per_micro):
        dots[:, g] = [_dot(feat, d) for d in directions]
        norm[g] = _dot(feat, feat) ** 0.5
        done += 1
        if progress is not None:
            progress(1)
    if progress is not None and done < p:
        progress(p - done)  # the zero-variance groups, scored without a pass
    return dots, norm


def distributed_feature_halves(
    model: nn.Module,
    val_batch: SequenceBatch,
    halves: Sequence[range],
    feature: HeadFeature,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> list[Pieces]:
    """sum_v G_v over each of `halves` (disjoint ranges of validation groups), each rank
    summing its shard's groups and one all_reduce per half adding the parts."""
    rank, size = ranks.world()
    mine = set(ranks.shard(val_batch.num_groups, rank, size))
    out = []
    for half in halves:
        groups = [g for g in half if g in mine]
        part = (
            feature_sum(model, val_batch.take_groups(groups), feature, aggregate, groups_per_micro)
            if groups
            else _Head(model, feature).zeros()
        )
        out.append(ranks.all_reduce_sum(part))
    return out


def distributed_feature_alignment(
    model: nn.Module,
    cand_batch: SequenceBatch,
    direction: Pieces,
    feature: HeadFeature,
    groups_per_micro: int = 16,
    chunk: bool = False,
    progress: Progress | None = None,
) -> GroupAlignment:
    """dot_val against `direction` (g^_V's feature), dot_chunk (``chunk``: mode `align`,
    against unit(sum of every candidate's feature), one more forward pass) and norm of every
    candidate group, each rank scoring its shard; every rank gets all groups' statistics."""
    rank, size = ranks.world()
    cand = dd.shard_batch(cand_batch, ranks.shard(cand_batch.num_groups, rank, size))
    dirs = [direction]
    if chunk:
        part = (
            feature_sum(model, cand, feature, "sum", groups_per_micro)
            if cand is not None
            else _Head(model, feature).zeros()
        )
        dirs.append(unit_pieces(ranks.all_reduce_sum(part)))
    if cand is None:  # more ranks than groups
        dots, norm = np.zeros((len(dirs), 0)), np.zeros(0)
    else:
        dots, norm = feature_alignment(model, cand, dirs, feature, groups_per_micro, progress)
    dot_chunk = dots[1] if chunk else np.full(len(norm), np.nan)
    dot_val, dot_chunk, norm = ranks.gather_groups(
        [dots[0], dot_chunk, norm], cand_batch.num_groups
    )
    return GroupAlignment(dot_val, dot_chunk, norm, val_norm=direction_norm(direction))
