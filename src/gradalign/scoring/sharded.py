"""Batched scoring of an FSDP2-sharded policy (`torch.distributed.fsdp.fully_shard`), the
directions held sharded like the weights.

Notation: R ranks · P candidate groups · V validation groups · D scored parameters ·
K directions (g^_V, and g^_C for mode `align`).

Under FSDP2 each weight is a DTensor of which a rank holds 1/R (rows, dim 0); a block's
forward and backward gather it whole only while they run. The batched scorer needs no weight
(`fastscore`): G_p comes from the inputs a_t and output gradients b_t the capture hooks see,
and under FSDP those are each rank's own, for its own groups, at full width. So every rank
scores its contiguous shard of the groups (`distributed.shard`) as under data parallelism;
what changes is where the directions live:

    g_V, g_C       a plain FSDP backward of sum_v L_v over each rank's groups: FSDP2
                   reduce-scatters every weight's gradient as it is produced, so the sum over
                   all ranks' groups lands sharded, 1/R per rank (DTensors shaped as the weights)
    g^ = unit(g)   one all_reduce of the R partial squared norms
    <G_p, g^_k>    per scored parameter, the K pieces are all_gathered just before that
                   parameter is read and dropped after it (`Gathered`), as FSDP gathers weights:
                   4 D K / R bytes held, plus K pieces of one parameter at a time

FSDP runs collectives in every forward, so every rank runs as many micro-batches as the
busiest (`_lockstep`): a rank out of groups runs one group again and drops the result.
`fastscore`'s self-check against autograd runs here too, differentiating the unsharded
weights each module ran with. The exact scorer (one backward per group over a flat [D]
gradient) does not work on sharded weights: `refuse_exact`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from gradalign import ranks
from gradalign.core.alignment import GroupAlignment, Progress
from gradalign.core.common import EPS, ValAggregate, check_val_aggregate
from gradalign.core.diagnostics import split_halves
from gradalign.core.grpo import SequenceBatch, group_losses, token_logprobs
from gradalign.scoring import distributed as dd
from gradalign.scoring import fastscore
from gradalign.scoring.capture import Capture, collect
from gradalign.scoring.pieces import Pieces
from gradalign.scoring.precondition import adam_scale
from gradalign.scoring.sketch import CountSketch
from gradalign.scoring.uses import verify

EXACT_REFUSED = (
    "select.scorer=exact cannot score an FSDP-sharded policy: it takes one backward per group "
    "into a flat [D] gradient of the whole weights, which no rank holds; use "
    "select.scorer=batched (the same scores, read from each rank's own activations)"
)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s weights are DTensors (FSDP2 `fully_shard`, directly or by accelerate)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def refuse_exact(model: nn.Module, scorer: str) -> None:
    """Raise `EXACT_REFUSED` for ``select.scorer=exact`` on a sharded model."""
    if scorer == "exact" and is_sharded(model):
        raise ValueError(EXACT_REFUSED)


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module's weights back into shards: the root keeps its own whole after
    a forward without backward (generation, an eval), and the scorer reads the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _require_shards(params: Sequence[Tensor]) -> None:
    """Every scored parameter a DTensor sharded over a 1-D mesh (FSDP2's FULL_SHARD): the
    partial norms and dots add each value once only then (not under HSDP's replicas)."""
    if not all(isinstance(p, DTensor) for p in params):
        raise ValueError(
            "some scored parameters are whole, not DTensor shards: call sharded.reshard(model) "
            "before taking them (the FSDP2 root keeps its weights whole after a no-grad forward)"
        )
    if any(p.device_mesh.ndim != 1 for p in params):  # type: ignore[attr-defined]
        raise ValueError("FSDP2 scoring supports a 1-D mesh (full sharding), not HSDP's 2-D one")


def shard_model(model: nn.Module, **options) -> nn.Module:
    """`fully_shard` each transformer block (the classes in ``model._no_split_modules``) and
    then the whole model, in place, as accelerate's FSDP2 TRANSFORMER_BASED_WRAP does."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    # transformers' generate then keeps the ranks' forwards in step (synced_gpus) as it does
    # for a model it shards itself
    model._is_fsdp_managed_module = True  # type: ignore[assignment]
    return model


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce(values: list, dtype: torch.dtype, op=dist.ReduceOp.SUM) -> list:
    """Numbers reduced over ranks, on the device the backend needs (CUDA under NCCL)."""
    if ranks.world()[1] == 1:
        return values
    cuda = dist.get_backend() == "nccl"
    buf = torch.tensor(values, dtype=dtype, device="cuda" if cuda else "cpu")
    dist.all_reduce(buf, op=op)
    return buf.tolist()


def _sum_over_ranks(values: list[float]) -> list[float]:
    return _all_reduce(values, torch.float64)


def _partial_dot(a: Tensor, b: Tensor) -> float:
    """This rank's part of <a, b>: its shard of a DTensor; all of a plain (replicated) tensor
    on rank 0 alone."""
    if not isinstance(a, DTensor) and ranks.world()[0] != 0:
        return 0.0
    return float((_local(a).double() * _local(b).double()).sum())


def dots(a: Sequence[Tensor], b: Sequence[Tensor], c: Sequence[Tensor] | None = None) -> list:
    """[<a, a>, <b, b>, <a, b>] (and <c, c> if given) of sharded pieces: one all_reduce."""
    parts = [(a, a), (b, b), (a, b)] + ([(c, c)] if c is not None else [])
    return _sum_over_ranks([sum(_partial_dot(x, y) for x, y in zip(*p)) for p in parts])


def norm(pieces: Sequence[Tensor]) -> float:
    """||d|| of sharded pieces (float64), one all_reduce."""
    return math.sqrt(_sum_over_ranks([sum(_partial_dot(d, d) for d in pieces)])[0])


def unit(pieces: Sequence[Tensor]) -> Pieces:
    """g / (||g|| + 1e-5) of sharded pieces; each stays sharded."""
    n = norm(pieces)
    return [d / (n + EPS) for d in pieces]


class Gathered:
    """Sharded pieces read one parameter at a time: ``[j]`` all_gathers piece j (fp32); the
    largest piece gathered is kept in `peak_bytes`."""

    def __init__(self, pieces: Sequence[Tensor]) -> None:
        self.pieces, self.peak_bytes = list(pieces), 0

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, j: int) -> Tensor:
        d = self.pieces[j]
        whole = (d.full_tensor() if isinstance(d, DTensor) else d).float()
        self.peak_bytes = max(self.peak_bytes, whole.nbytes)
        return whole

    def held_bytes(self) -> int:
        """Bytes of this rank's shards."""
        return sum(_local(d).nbytes for d in self.pieces)


def _lockstep(local: SequenceBatch | None, filler: SequenceBatch, per_micro: int, first: int):
    """This rank's micro-batches of whole groups (`fastscore._micro_batches`), then idle ones
    (ids None: `filler`'s first group, to be dropped) until it has run as many as the
    busiest rank. Yields (group ids [P'] | None, sub-batch)."""
    mine = list(fastscore._micro_batches(local, per_micro, first)) if local is not None else []
    (count,) = _all_reduce([len(mine)], torch.int64, dist.ReduceOp.MAX)
    idle = filler.take_groups([0])
    for k in range(count):
        yield mine[k] if k < len(mine) else (None, idle)


class _LiveCapture(Capture):
    """`Capture`, also noting the whole weight each owner ran with: FSDP2's unsharded
    parameter, which autograd can differentiate (the module holds the shard again after)."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor]) -> None:
        super().__init__(model, params)
        self.live: dict[int, Tensor] = {}  # parameter index -> the weight of this forward
        self.copy_weights = True  # FSDP frees a block's whole weights after its backward

    def hook(self, module: nn.Module, args: tuple, output: object) -> None:
        super().hook(module, args, output)
        if self.active:
            for name, j in self.owners[module]:
                self.live[j] = module._parameters[name]  # type: ignore[assignment]


def _backward(cap: _LiveCapture, job: fastscore._Job, sub: SequenceBatch):
    """`fastscore._backward` for sharded weights: the self-check differentiates the live,
    unsharded weights (this rank's groups only, nothing reduced)."""
    p = sub.num_groups
    cap.calls, cap.live, cap.active = [], {}, True
    try:
        logp = token_logprobs(job.model, sub.input_ids, sub.attention_mask)  # [N, T]
    finally:
        cap.active = False
    losses = group_losses(logp, sub.completion_mask, sub.advantages, sub.group, p)  # [P]
    outs = [out for _, _, out in cap.calls]
    seen = sorted(cap.live) if job.verify else []
    grads = torch.autograd.grad(
        losses.sum(), outs + [cap.live[j] for j in seen], allow_unused=True
    )  # each call's b_t, then autograd's weight gradient for the check
    uses, local, tm = collect(cap, grads[: len(outs)], sub, len(job.params))
    cap.calls = []
    if job.verify:
        want: list = [None] * len(job.params)
        for j, g in zip(seen, grads[len(outs) :]):
            want[j] = g
        shapes = [
            cap.live.get(j, torch.empty(tuple(q.shape), dtype=q.dtype))
            for j, q in enumerate(job.params)
        ]
        ones = -torch.ones(sub.completion_mask.shape, device=losses.device)  # logp := -1
        weight = float(
            group_losses(ones, sub.completion_mask, sub.advantages.abs(), sub.group, p).sum()
        )
        job.verify = not verify(uses, local, want, shapes, weight)
    return uses, local, tm, losses.device


def _scan(job: fastscore._Job, local: SequenceBatch | None, filler: SequenceBatch,
          per_micro: int, progress: Progress | None = None):  # fmt: skip
    """`fastscore._scan` over this rank's groups, in lockstep with the other ranks.
    # -> [K, P_r], [P_r], [P_r, project_dim] | None, float64"""
    p = local.num_groups if local is not None else 0
    out_dots, sq = np.zeros((len(job.dirs), p)), np.zeros(p)
    z = np.zeros((p, job.sketch.project_dim)) if job.sketch is not None else None
    job.backward, done = _backward, 0
    with _LiveCapture(job.model, job.params) as cap:
        for ids, sub in _lockstep(local, filler, per_micro, first=1 if job.verify else 0):
            d, s, zz, _ = fastscore._micro(cap, job, sub)
            if ids is None:  # an idle pass
                continue
            idx = ids.cpu().numpy()
            out_dots[:, idx], sq[idx] = d.double().cpu().numpy(), s.double().cpu().numpy()
            if z is not None and zz is not None:
                z[idx] = zz.double().cpu().numpy()
            done += len(idx)
            if progress is not None:
                progress(len(idx))
    if progress is not None and done < p:
        progress(p - done)  # the zero-variance groups, scored without a pass
    return out_dots, sq, z


def summed_gradient(
    model: nn.Module,
    params: Sequence[Tensor],
    local: SequenceBatch | None,
    filler: SequenceBatch,
    groups_per_micro: int = 16,
    weights: np.ndarray | None = None,
) -> Pieces:
    """sum_p w_p g_p over every rank's `local` groups (w [P_r], 1 by default), sharded like
    the weights: FSDP's own backward and reduce-scatter. The weights' .grad are set aside and
    put back. FSDP2 averages over ranks by default; the sum is rescaled by R (g^ = unit(g)
    does not depend on it)."""
    every = list(model.parameters())
    kept = [q.grad for q in every]
    for q in every:
        q.grad = None
    try:
        for ids, sub in _lockstep(local, filler, groups_per_micro, 0):
            logp = token_logprobs(model, sub.input_ids, sub.attention_mask)  # [N, T]
            losses = group_losses(
                logp, sub.completion_mask, sub.advantages, sub.group, sub.num_groups
            )  # [P']
            if ids is None:  # an idle pass: nothing of it counts
                losses = losses * 0
            elif weights is not None:
                losses = losses * torch.as_tensor(weights[ids.cpu().numpy()]).to(losses)
            losses.sum().backward()
        size = ranks.world()[1]
        return [
            q.grad.float() * size if q.grad is not None else torch.zeros_like(q).float()
            for q in params
        ]
    finally:
        for q, g in zip(every, kept):
            q.grad = g


def validation_sum(
    model: nn.Module,
    params: Sequence[Tensor],
    local: SequenceBatch | None,
    filler: SequenceBatch,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> Pieces:
    """g_V = sum_v g_v (or sum_v unit(g_v), ``mean_of_unit``: each rank's norms first) over
    every rank's `local` validation groups, sharded. `fastscore.batched_validation_sum`."""
    check_val_aggregate(aggregate)
    weights = None
    if aggregate == "mean_of_unit":
        _, sq, _ = _scan(fastscore._Job(model, params, []), local, filler, groups_per_micro)
        weights = 1.0 / (np.sqrt(sq) + EPS)
    return summed_gradient(model, params, local, filler, groups_per_micro, weights)


def validation_halves(
    model: nn.Module,
    params: Sequence[Tensor],
    val_batch: SequenceBatch,
    halves: Sequence[range],
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> list[Pieces]:
    """g_V of each of `halves` (disjoint validation group ranges), sharded; each rank sums
    the groups of its shard in each half. `distributed.distributed_validation_halves`."""
    _require_shards(params)
    rank, size = ranks.world()
    mine = set(ranks.shard(val_batch.num_groups, rank, size))
    out = []
    for half in halves:
        groups = [g for g in half if g in mine]
        local = val_batch.take_groups(groups) if groups else None
        out.append(validation_sum(model, params, local, val_batch, aggregate, groups_per_micro))
    return out


def group_alignment(
    model: nn.Module,
    params: Sequence[Tensor],
    cand_batch: SequenceBatch,
    direction: Sequence[Tensor],
    groups_per_micro: int = 16,
    chunk: bool = True,
    exp_avg_sq: Mapping | None = None,
    progress: Progress | None = None,
    meter: dict | None = None,
) -> GroupAlignment:
    """dot_val against `direction` (sharded g^_V), dot_chunk (``chunk``: against g^_C, from
    a sharded plain backward first) and norm of every candidate group, each rank scoring its
    shard; gathered on every rank. `distributed.distributed_group_alignment`. `meter` gets
    this rank's bytes: ``direction_held`` (its shards of the K directions) and
    ``direction_gathered`` (the largest K pieces of one parameter gathered at once)."""
    _require_shards(params)
    rank, size = ranks.world()
    local = dd.shard_batch(cand_batch, ranks.shard(cand_batch.num_groups, rank, size))
    scale = adam_scale(params, exp_avg_sq) if exp_avg_sq is not None else None
    dirs = [Gathered(direction)]
    if chunk:  # g^_C = unit(sum_p g~_p) over every rank's groups, sharded
        summed = summed_gradient(model, params, local, cand_batch, groups_per_micro)
        dirs.append(Gathered(unit([g * c for g, c in zip(summed, scale)] if scale else summed)))
    sc = Gathered(scale) if scale is not None else None
    job = fastscore._Job(model, params, dirs, "auto", sc)  # type: ignore[arg-type]
    found, sq, _ = _scan(job, local, cand_batch, groups_per_micro, progress)
    no_chunk = np.full(len(sq), np.nan)
    dot_val, dot_chunk, norms = ranks.gather_groups(
        [found[0], found[1] if chunk else no_chunk, np.sqrt(sq)], cand_batch.num_groups
    )
    if meter is not None:
        meter["direction_held"] = sum(d.held_bytes() for d in dirs)
        meter["direction_gathered"] = sum(d.peak_bytes for d in dirs)
    return GroupAlignment(dot_val, dot_chunk, norms, val_norm=norm(direction))


def round_alignment(
    model: nn.Module,
    params: Sequence[Tensor],
    cand_batch: SequenceBatch,
    val_batch: SequenceBatch,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
    chunk: bool = True,
    exp_avg_sq: Mapping | None = None,
    progress: Progress | None = None,
    meter: dict | None = None,
) -> tuple[GroupAlignment, float]:
    """A round's scores and its split-half validation cosine, as `round_scoring` computes
    them unsharded: g_V as the sum of its two halves (`diagnostics.split_halves`), the cosine
    NaN when a half has no gradient."""
    halves = split_halves(val_batch.num_groups)
    a, b = validation_halves(model, params, val_batch, halves, aggregate, groups_per_micro)
    g_v = [x + y for x, y in zip(a, b)]
    aa, bb, ab, vv = dots(a, b, g_v)
    direction = [d / (math.sqrt(vv) + EPS) for d in g_v]
    split = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else math.nan
    al = group_alignment(
        model, params, cand_batch, direction, groups_per_micro, chunk, exp_avg_sq, progress, meter
    )
    return al, split


def projected_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    cand_batch: SequenceBatch,
    project_dim: int = 512,
    seed: int = 0,
    groups_per_micro: int = 16,
    exp_avg_sq: Mapping | None = None,
) -> np.ndarray:
    """`fastscore.projected_gradients` of every candidate group, each rank projecting its
    shard (the sketch needs no direction). # -> [P, project_dim] float64"""
    _require_shards(params)
    rank, size = ranks.world()
    local = dd.shard_batch(cand_batch, ranks.shard(cand_batch.num_groups, rank, size))
    scale = Gathered(adam_scale(params, exp_avg_sq)) if exp_avg_sq is not None else None
    sketch = CountSketch(params, project_dim, seed)
    job = fastscore._Job(model, params, [], "materialise", scale, sketch)  # type: ignore[arg-type]
    _, _, z = _scan(job, local, cand_batch, groups_per_micro)
    assert z is not None
    return ranks.gather_groups([z], cand_batch.num_groups)[0]
