"""Fast alignment scoring: every group's <g_p, g^> and ||g_p|| from one batched backward.

Notation: P groups · N rows (rollouts) · T_p real tokens of group p · K directions.
Gradients are `pieces.Pieces`: one tensor per scored parameter, shaped like it (never a flat [D]).

`alignment.exact_alignment` runs one backward per group. Here one backward of sum_p L_p over a
micro-batch of whole groups gives, for each call of a module owning a scored parameter, its input
a_t and output gradient b_t at every token t (`capture`). Rows never interact, so the b_t of
group p's tokens are those of L_p alone, and the parameter's group gradient is exactly
(per-example gradients, Goodfellow 2015; ghost norm, Li et al. 2022):

    linear      G_p = sum_{t in p} b_t a_t^T            [o, i]   (its bias: a_t = 1)
    embedding   G_p = sum_{t in p} onehot(x_t) b_t^T    [V, H]   (a tied lm_head adds its term)
    any other   G_p = sum_{rows in p} autograd of that module alone, row by row (RMSNorm, ...)

Per parameter either G_p is formed or <G_p, G^> and ||G_p||^2 are read through Gram identities,
whichever costs fewer flops (`uses`). The backward itself never computes weight gradients.

Zero-variance groups (all A_i = 0) have g_p = 0 exactly and get no pass. g^_C (mode `align`)
comes from the same pass while all g_p fit in MAX_KEEP_BYTES, else from one plain backward
first. Each scan starts with a one-group micro-batch that also runs autograd's weight gradient
and checks sum_p G_p against it (`verify`): a parameter used outside its module's forward
raises, it is never silently mis-scored. Options: seeded sketches S g_p (`projected_gradients`,
`sketch`) and LESS preconditioning g_p / (sqrt(v) + eps) with Adam's second moment
(``exp_avg_sq``, `precondition`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gradalign.core import alignment
from gradalign.core.alignment import GroupAlignment, Progress
from gradalign.core.common import EPS, ValAggregate, check_val_aggregate
from gradalign.core.grpo import SequenceBatch, group_losses, token_logprobs
from gradalign.core.logprobs import uses_head
from gradalign.scoring.capture import Capture, collect
from gradalign.scoring.pieces import Direction, Pieces, as_pieces, unit_pieces, zero_pieces
from gradalign.scoring.precondition import adam_scale
from gradalign.scoring.sketch import CountSketch
from gradalign.scoring.uses import Method, choose, gram_stats, materialise, shape2d, verify

MAX_KEEP_BYTES = 1 << 30  # all g_p of a chunk (P x D fp32) kept for g^_C in the same pass


@dataclass
class _Job:
    """What a scan reads off each group's gradient g_p."""

    model: nn.Module
    params: Sequence[Tensor]
    dirs: list[Pieces]  # K directions: <g_p, dir_k>
    method: Method = "auto"
    scale: Pieces | None = None  # LESS preconditioner: g_p -> scale * g_p
    sketch: CountSketch | None = None  # S g_p
    keep: bool = False  # keep each G_p: kept = [(group ids [P'], per parameter [P', o*i] | None)]
    verify: bool = True  # check sum_p G_p against autograd on a first, one-group micro-batch
    kept: list = field(default_factory=list)
    backward: Callable | None = None  # (cap, job, sub) -> as `_backward`; FSDP2: `sharded`


@contextmanager
def grad_only_for(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Every other parameter frozen for the block: autograd then records no graph, and keeps
    no activations, below the first scored layer (``select.params=last:N``)."""
    keep = {id(q) for q in params}
    frozen = [q for q in model.parameters() if q.requires_grad and id(q) not in keep]
    for q in frozen:
        q.requires_grad_(False)
    try:
        yield
    finally:
        for q in frozen:
            q.requires_grad_(True)


def _backward(cap: Capture, job: _Job, sub: SequenceBatch):
    """One forward and backward of a micro-batch: each parameter's uses and local group
    gradients, and (while `job.verify`) the self-check against autograd."""
    with grad_only_for(job.model, job.params):
        return _backward_scored(cap, job, sub)


def _backward_scored(cap: Capture, job: _Job, sub: SequenceBatch):
    p = sub.num_groups
    cap.calls, cap.active = [], True
    try:
        head = uses_head(job.model, job.params)  # its hooks must see the head module run
        logp = token_logprobs(job.model, sub.input_ids, sub.attention_mask, head)  # [N, T]
    finally:
        cap.active = False
    losses = group_losses(logp, sub.completion_mask, sub.advantages, sub.group, p)  # [P]
    outs = [out for _, _, out in cap.calls]
    wrt = outs + (list(job.params) if job.verify else [])
    grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)  # each call's b_t
    uses, local, tm = collect(cap, grads[: len(outs)], sub, len(job.params))
    cap.calls = []
    if job.verify:
        ones = -torch.ones(sub.completion_mask.shape, device=losses.device)  # logp := -1
        weight = float(
            group_losses(ones, sub.completion_mask, sub.advantages.abs(), sub.group, p).sum()
        )
        job.verify = not verify(uses, local, grads[len(outs) :], job.params, weight)
    return uses, local, tm, losses.device


def _micro(cap: Capture, job: _Job, sub: SequenceBatch):
    """<g_p, dir_k>, ||g_p||^2, S g_p and the kept g_p of a micro-batch's groups.
    # -> [K, P], [P], [P, project_dim] | None, per parameter [P, o*i] | None"""
    uses, local, tm, dev = (job.backward or _backward)(cap, job, sub)
    p, num_dirs, scale, sketch = sub.num_groups, len(job.dirs), job.scale, job.sketch
    dots, sq = torch.zeros(num_dirs, p, device=dev), torch.zeros(p, device=dev)
    z = torch.zeros(p, sketch.project_dim, device=dev) if sketch is not None else None
    kept: list[Tensor | None] = []
    for j, prm in enumerate(job.params):
        (o, i), dj = shape2d(prm), [d[j] for d in job.dirs]
        if not uses[j] and local[j] is None:  # unused in this forward: G_p = 0
            kept.append(None)
            continue
        forced = local[j] is not None or scale is not None or sketch is not None or job.keep
        if not forced and choose(job.method, uses[j], p, tm, o, i, num_dirs) == "gram":
            dots_j, sq_j = gram_stats(uses[j], dj, o, i)
        else:
            g = materialise(uses[j], local[j], p, o, i)  # [P, o*i]
            g = g * scale[j].reshape(-1) if scale is not None else g  # LESS: g_p / (sqrt(v)+eps)
            dots_j = torch.stack([g @ d.reshape(-1) for d in dj]) if dj else dots[:0]
            sq_j = torch.linalg.vector_norm(g, dim=1).square()
            if z is not None and sketch is not None:
                z += sketch.apply(j, g)
            kept.append(g if job.keep else None)
        dots += dots_j
        sq += sq_j
    return dots, sq, z, kept


def _micro_batches(
    batch: SequenceBatch, per_micro: int, first: int = 0
) -> Iterator[tuple[Tensor, SequenceBatch]]:
    """Micro-batches of whole groups with a nonzero advantage (the others have g_p = 0 exactly),
    the first of `first` groups if given. Yields (group ids [P'], sub-batch of those groups)."""
    dev = batch.group.device
    nonzero = (batch.advantages != 0).float()
    live = torch.zeros(batch.num_groups, device=dev).index_add_(0, batch.group, nonzero) > 0
    rows_of = batch.group_rows()
    ids = live.nonzero().squeeze(1)
    starts = [0, *range(first, len(ids), per_micro)] if first else range(0, len(ids), per_micro)
    for start, end in zip(starts, [*starts[1:], len(ids)]):
        if end <= start:
            continue
        chosen = ids[start:end]
        yield chosen, batch.take_groups(chosen.tolist(), rows_of)


def _scan(job: _Job, batch: SequenceBatch, per_micro: int, progress: Progress | None = None):
    """Every group's <g_p, dir_k>, ||g_p||^2 and S g_p.
    # -> [K, P], [P], [P, project_dim] | None, float64"""
    p, sketch = batch.num_groups, job.sketch
    job.dirs = [[d.to(q.device, torch.float32) for d, q in zip(ds, job.params)] for ds in job.dirs]
    dots, sq = np.zeros((len(job.dirs), p)), np.zeros(p)
    z = np.zeros((p, sketch.project_dim)) if sketch is not None else None
    done = 0
    with Capture(job.model, job.params) as cap:
        for ids, sub in _micro_batches(batch, per_micro, first=1 if job.verify else 0):
            d, s, zz, kept = _micro(cap, job, sub)
            idx = ids.cpu().numpy()
            dots[:, idx], sq[idx] = d.double().cpu().numpy(), s.double().cpu().numpy()
            if z is not None and zz is not None:
                z[idx] = zz.double().cpu().numpy()
            if job.keep:
                job.kept.append((idx, kept))
            done += len(idx)
            if progress is not None:
                progress(len(idx))
    if progress is not None and done < p:
        progress(p - done)  # the zero-variance groups, scored without a pass
    return dots, sq, z


def batched_summed_gradient(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    groups_per_micro: int = 16,
    weights: np.ndarray | None = None,
) -> Pieces:
    """sum_p w_p g_p (w = 1 by default, w [P]): a plain backward of the summed loss over
    micro-batches of whole groups -- the floor any per-group scorer is measured against."""
    total = zero_pieces(params)
    for ids, sub in _micro_batches(batch, groups_per_micro):
        with grad_only_for(model, params):
            logp = token_logprobs(model, sub.input_ids, sub.attention_mask)
            losses = group_losses(
                logp, sub.completion_mask, sub.advantages, sub.group, sub.num_groups
            )
            if weights is not None:
                losses = losses * torch.as_tensor(weights[ids.cpu().numpy()]).to(losses)
            grads = torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g
    return total


def batched_validation_sum(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> Pieces:
    """g_V = sum_v g_v, or sum_v unit(g_v) for ``mean_of_unit`` (one norm pass, then a backward
    of sum_v L_v / (||g_v|| + 1e-5)), before normalising: a sum over groups, so sums over
    disjoint sets of groups add up (`gradalign.scoring.distributed`)."""
    check_val_aggregate(aggregate)
    weights = None
    if aggregate == "mean_of_unit":
        _, sq, _ = _scan(_Job(model, params, []), batch, groups_per_micro)
        weights = 1.0 / (np.sqrt(sq) + EPS)
    return batched_summed_gradient(model, params, batch, groups_per_micro, weights)


def batched_validation_direction(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    aggregate: ValAggregate = "sum",
    groups_per_micro: int = 16,
) -> Pieces:
    """g^_V = unit(g_V) (`batched_validation_sum`): `alignment.validation_direction` as Pieces."""
    return unit_pieces(batched_validation_sum(model, params, batch, aggregate, groups_per_micro))


def batched_alignment(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    val_direction: Direction,
    groups_per_micro: int = 16,
    progress: Progress | None = None,
    *,
    chunk: bool = True,
    chunk_direction: Direction | None = None,
    exp_avg_sq: Mapping | None = None,
    adam_eps: float = 1e-8,
    method: Method = "auto",
    reduce_chunk: Callable[[Pieces], Pieces] | None = None,
) -> GroupAlignment:
    """dot_val, dot_chunk and norm of every group, as `alignment.exact_alignment`, from one
    batched backward.

    ``chunk``: whether to compute dot_chunk = <g_p, g^_C> (only mode `align` reads it; NaN
    when False). g^_C = unit(sum_p g_p), unless ``chunk_direction`` gives the direction to use:
    each g_p is kept while P * D * 4 bytes <= MAX_KEEP_BYTES, else one more, plain, backward
    comes first. With ``exp_avg_sq`` every g_p becomes g_p / (sqrt(v) + eps) (LESS), g^_C =
    unit(sum_p of them) and g^_V is used as given. ``reduce_chunk`` maps this batch's sum_p g_p
    to the chunk's before it is normalised (called once; `gradalign.scoring.distributed` sums
    it over ranks)."""
    if chunk_direction is not None and not chunk:
        raise ValueError("chunk_direction is given but chunk=False: pass chunk=True to use it")
    scale = adam_scale(params, exp_avg_sq, adam_eps) if exp_avg_sq is not None else None
    reduce = reduce_chunk if reduce_chunk is not None else list
    dirs = [as_pieces(val_direction, params)]
    own_chunk = chunk and chunk_direction is None  # g^_C from this batch's g_p
    keep = own_chunk and batch.num_groups * sum(q.numel() for q in params) * 4 <= MAX_KEEP_BYTES
    if own_chunk and not keep:
        summed = reduce(batched_summed_gradient(model, params, batch, groups_per_micro))
        dirs.append(unit_pieces([g * c for g, c in zip(summed, scale)] if scale else summed))
    elif chunk_direction is not None:
        dirs.append(as_pieces(chunk_direction, params))
    job = _Job(model, params, dirs, method, scale, keep=keep)
    dots, sq, _ = _scan(job, batch, groups_per_micro, progress)
    dot_chunk = dots[1] if len(dirs) > 1 else np.full(batch.num_groups, np.nan)
    if keep:  # LearnAlign-style g^_C = unit(sum_p g_p) from the kept g_p: no second pass
        dot_chunk = _dots_with_kept_sum(job, reduce, batch.num_groups)
    return GroupAlignment(dots[0], dot_chunk, np.sqrt(sq), alignment.direction_norm(dirs[0]))


def _dots_with_kept_sum(job: _Job, reduce: Callable[[Pieces], Pieces], p: int) -> np.ndarray:
    """<g_p, g^_C> for g^_C = unit(reduce(sum_p g_p)) over the g_p a scan kept. # -> [P]"""
    params = job.params
    zero = [torch.zeros(q.numel(), dtype=torch.float64, device=q.device) for q in params]
    summed = [
        sum((g[j].sum(0).double() for _, g in job.kept if g[j] is not None), zero[j])
        for j in range(len(params))
    ]
    g_c = unit_pieces(reduce(summed))
    dot_chunk = np.zeros(p)
    for idx, g in job.kept:
        d = [(gj @ c.float()).double() for gj, c in zip(g, g_c) if gj is not None]
        dot_chunk[idx] = torch.stack(d).sum(0).cpu().numpy()
    return dot_chunk


def projected_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    project_dim: int = 512,
    seed: int = 0,
    groups_per_micro: int = 16,
    exp_avg_sq: Mapping | None = None,
    adam_eps: float = 1e-8,
) -> np.ndarray:
    """Seeded random-projection features S g_p of every group (`sketch.CountSketch`;
    zero-variance groups get 0), for analysis. # -> [P, project_dim] float64"""
    scale = adam_scale(params, exp_avg_sq, adam_eps) if exp_avg_sq is not None else None
    job = _Job(model, params, [], "materialise", scale, CountSketch(params, project_dim, seed))
    _, _, z = _scan(job, batch, groups_per_micro)
    assert z is not None
    return z
