"""Fast alignment scoring: every group's <g_p, g^> and ||g_p|| from one batched backward.

Notation: P groups · N rows (rollouts) · L positions · T_p real tokens of group p, Tm = max_p T_p
(per-group token layout, zero-padded) · o, i = the two sides of a parameter use · K directions ·
k sketch dimension. Pieces: one tensor per scored parameter, shaped like it (never a flat [D]).

`alignment.exact_alignment` runs one backward per group. Here one backward of sum_p L_p over a
micro-batch of whole groups gives, for each call of a module owning a scored parameter, its input
a_t and output gradient b_t at every token t. Rows never interact, so the b_t of group p's tokens
are those of L_p alone, and the parameter's group gradient is exactly (per-example gradients,
Goodfellow 2015; ghost norm, Li et al. 2022):

    linear      G_p = sum_{t in p} b_t a_t^T            [o, i]   (its bias: a_t = 1)
    embedding   G_p = sum_{t in p} onehot(x_t) b_t^T    [V, H]   (a tied lm_head adds its term)
    any other   G_p = sum_{rows in p} autograd of that module alone, row by row (RMSNorm, ...)

Per parameter either G_p is formed ("materialise": one bmm, the cost of a weight gradient) or
||G_p||^2 = sum_{t,s} (b_t.b_s)(a_t.a_s) and <G_p, G^> = sum_t b_t^T G^ a_t ("gram"), whichever
costs fewer flops. The backward itself never computes weight gradients.

Zero-variance groups (all A_i = 0) have g_p = 0 exactly and get no pass. g^_C (mode `align`)
comes from the same pass while all g_p fit in MAX_KEEP_BYTES, else from one plain backward
first. Each scan starts with a one-group micro-batch that also runs autograd's weight gradient
and checks sum_p G_p against it: a parameter used outside its module's forward raises, it is
never silently mis-scored. Options: seeded sketches S g_p (`projected_gradients`) and LESS
preconditioning g_p / (sqrt(v) + eps) with Adam's second moment (``exp_avg_sq``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradalign.core import alignment
from gradalign.core.alignment import EPS, GroupAlignment, Progress
from gradalign.core.grpo import SequenceBatch, group_losses, token_logprobs

Pieces = list[Tensor]
Direction = Tensor | Sequence[Tensor]  # flat [D] (as `alignment` returns) or Pieces
Method = Literal["auto", "materialise", "gram"]
# a use of a parameter: left [P, Tm, o] float (b_t) or [P, Tm] long (row ids), right [P, Tm, i]
Use = tuple[Tensor, Tensor]
MAX_MATERIALISE_BYTES = 1 << 30  # per parameter and micro-batch; above it "auto" picks gram
MAX_KEEP_BYTES = 1 << 30  # all g_p of a chunk (P x D fp32) kept for g^_C in the same pass
ROUNDOFF_FLOOR = 100  # round-off bound in units of eps x term scale (see _verify)


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


def adam_exp_avg_sq(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """{param: exp_avg_sq} from an Adam(W) optimizer's state."""
    return {p: optimizer.state[p]["exp_avg_sq"] for p in params}


def adam_scale(params: Sequence[Tensor], exp_avg_sq: Mapping, eps: float = 1e-8) -> Pieces:
    """LESS (Xia et al. 2024) preconditioner 1 / (sqrt(v) + eps) of each scored parameter."""
    if any(p not in exp_avg_sq for p in params):
        raise ValueError("exp_avg_sq lacks some scored parameters")
    return [1.0 / (exp_avg_sq[p].detach().to(p.device).float().sqrt() + eps) for p in params]


class _Capture:
    """Forward hooks on every module owning a scored parameter (both sides of a tie)."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor]) -> None:
        index = {id(p): j for j, p in enumerate(params)}
        self.owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for m in model.modules():
            own = [(n, index[id(p)]) for n, p in m._parameters.items() if id(p) in index]
            if own:
                self.owners[m] = own
        if len({j for own in self.owners.values() for _, j in own}) != len(params):
            raise ValueError("some scored parameters belong to no module of the model")
        for m in self.owners:
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
                raise NotImplementedError("embeddings with max_norm / scale_grad_by_freq")
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, output)
        self.active = False

    def hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self.active:
            return
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise NotImplementedError(f"{type(module).__name__}: needs a tensor input and output")
        self.calls.append((module, args[0].detach(), output))

    def __enter__(self) -> _Capture:
        self.handles = [m.register_forward_hook(self.hook) for m in self.owners]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


class _Layout:
    """A micro-batch's real tokens regrouped per group (rows sorted by group).
    # [N, L, ...] -> [P, Tm, ...]"""

    def __init__(self, sub: SequenceBatch) -> None:
        valid = sub.attention_mask.bool()  # [N, L]
        (self.n, self.length), self.p, dev = valid.shape, sub.num_groups, valid.device
        flat = valid.reshape(-1).nonzero().squeeze(1)  # [T]
        tok_group = sub.group.repeat_interleave(valid.sum(1))  # [T]
        counts = torch.bincount(tok_group, minlength=self.p)  # [P] T_p
        self.tm = int(counts.max())
        rank = torch.arange(len(flat), device=dev) - (counts.cumsum(0) - counts)[tok_group]
        slot = tok_group * self.tm + rank  # [T]
        self.src = torch.zeros(self.p * self.tm, dtype=torch.long, device=dev)
        self.src[slot] = flat  # [P*Tm] where each slot reads from
        hole = torch.ones(self.p * self.tm, dtype=torch.bool, device=dev)
        hole[slot] = False
        self.holes = hole.nonzero().squeeze(1)  # slots past a group's last token
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if id(x) in self.cache:  # q/k/v (gate/up) share one input
            return self.cache[id(x)][1]
        if tuple(x.shape[:2]) != (self.n, self.length):
            raise NotImplementedError(
                f"a scored module saw shape {tuple(x.shape)}: need [N, L, ...]"
            )
        rest = x.shape[2:]
        out = x.reshape(self.n * self.length, *rest).index_select(0, self.src)  # [P*Tm, ...]
        out = out.index_fill_(0, self.holes, 0).view(self.p, self.tm, *rest)
        out = out.float() if out.is_floating_point() else out
        self.cache[id(x)] = (x, out)  # holding x keeps its id unique
        return out


def _row_grads(module: nn.Module, names: list[str], x: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Per-row gradients of `module`'s own parameters by autograd of the module alone.
    # x [N, ...], b [N, ...] -> {name: [N, *shape]}"""
    own = {n: module._parameters[n].detach() for n in names}  # type: ignore[union-attr]

    def inner(p: dict[str, Tensor], xr: Tensor, br: Tensor) -> Tensor:
        return (functional_call(module, p, (xr[None],)) * br[None]).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(own, x, b)


def _collect(cap: _Capture, grads: Sequence[Tensor | None], sub: SequenceBatch, n_params: int):
    """Each parameter's uses (factor pairs) and 'local' group gradients [P, *shape]."""
    lay, p = _Layout(sub), sub.num_groups
    uses: list[list[Use]] = [[] for _ in range(n_params)]
    local: list[Tensor | None] = [None] * n_params
    for (m, x, _), b in zip(cap.calls, grads):
        if b is None:
            continue
        if isinstance(m, nn.Linear):
            bp, ap = lay(b), lay(x)
            for name, j in cap.owners[m]:
                uses[j].append((bp, ap if name == "weight" else bp.new_ones(p, lay.tm, 1)))
        elif isinstance(m, nn.Embedding):
            ids, bp = lay(x), lay(b)
            if m.padding_idx is not None:  # that row gets no gradient
                bp = bp * (ids != m.padding_idx).unsqueeze(-1)
            uses[cap.owners[m][0][1]].append((ids, bp))
        else:
            rows = _row_grads(m, [n for n, _ in cap.owners[m]], x, b)
            for name, j in cap.owners[m]:
                r = rows[name].float()
                g = r.new_zeros((p, *r.shape[1:])).index_add_(0, sub.group, r)  # [P, *shape]
                local[j] = g if local[j] is None else local[j] + g  # type: ignore[operator]
    return uses, local, lay.tm


def _choose(method: Method, uses: list[Use], p: int, tm: int, o: int, i: int, k: int) -> str:
    """Fewer flops wins: forming G_p costs U P Tm o i + (K+1) P o i; gram U^2 P Tm^2 (o+i) +
    K U P Tm o i (a direction needs every token's b_t^T G^ a_t either way)."""
    if method != "auto":
        return method
    if p * o * i * 4 > MAX_MATERIALISE_BYTES:
        return "gram"
    u = len(uses)
    mat = u * p * tm * o * i + (k + 1) * p * o * i
    gram = u * u * p * tm * tm * (o + i) + k * u * p * tm * o * i
    return "materialise" if mat <= gram else "gram"


def _materialise(uses: list[Use], local: Tensor | None, p: int, o: int, i: int) -> Tensor:
    """G_p of every group. # -> [P, o*i]"""
    g = local.reshape(p, o, i) if local is not None else None
    for left, right in sorted(uses, key=lambda u: u[0].dtype == torch.long):
        if left.dtype == torch.long:  # embedding: row x_t of G_p gets b_t
            g = right.new_zeros(p, o, i) if g is None else g
            rows = left + torch.arange(p, device=left.device)[:, None] * o  # [P, Tm]
            g.view(p * o, i).index_add_(0, rows.reshape(-1), right.reshape(-1, i))
        elif g is None:
            g = torch.bmm(left.transpose(1, 2), right)  # [P, o, Tm] @ [P, Tm, i]
        else:
            g = g.baddbmm_(left.transpose(1, 2), right)
    assert g is not None
    return g.reshape(p, o * i)


def _left_gram(x: Tensor, y: Tensor) -> Tensor:
    """<left_t, left_s> of dense output grads or one-hot row ids. # -> [P, Tm, Tm]"""
    if x.dtype == torch.long and y.dtype == torch.long:
        return (x[:, :, None] == y[:, None, :]).float()
    if y.dtype == torch.long:
        return x.gather(2, y[:, None, :].expand(-1, x.shape[1], -1))
    if x.dtype == torch.long:
        return _left_gram(y, x).transpose(1, 2)
    return torch.bmm(x, y.transpose(1, 2))


def _gram_stats(uses: list[Use], dirs: list[Tensor], o: int, i: int) -> tuple[Tensor, Tensor]:
    """<G_p, G^_k> and ||G_p||^2 without forming G_p. # -> [K, P], [P]"""
    sq = sum(
        (_left_gram(lu, lv) * torch.bmm(ru, rv.transpose(1, 2))).sum((1, 2))
        for lu, ru in uses
        for lv, rv in uses
    )

    def dot(d: Tensor, left: Tensor, right: Tensor) -> Tensor:  # sum_t b_t^T G^ a_t
        d = d.reshape(o, i)
        return ((d[left] if left.dtype == torch.long else left @ d) * right).sum((1, 2))

    dots = [sum(dot(d, left, right) for left, right in uses) for d in dirs]
    return torch.stack(dots) if dots else sq.new_zeros(0, len(sq)), sq  # type: ignore[union-attr]


class _Sketch:
    """Seeded CountSketch (sparse sign random projection, Clarkson & Woodruff 2013) into k dims:
    coordinate d of parameter j goes to bucket h_j(d) with sign s_j(d), drawn from a generator
    seeded by (seed, j), so E[<Sx, Sy>] = <x, y>; no D x k matrix is ever built."""

    def __init__(self, params: Sequence[Tensor], dim: int, seed: int) -> None:
        self.dim, self.seed, self.params = dim, seed, params
        self.maps: dict[int, tuple[Tensor, Tensor]] = {}

    def apply(self, j: int, g: Tensor) -> Tensor:
        """# [P, D_j] -> [P, k]"""
        if j not in self.maps:
            seed_j = int(np.random.SeedSequence([self.seed, j]).generate_state(1)[0])
            gen = torch.Generator().manual_seed(seed_j)
            n, dev = self.params[j].numel(), self.params[j].device
            bucket = torch.randint(self.dim, (n,), generator=gen)
            sign = torch.randint(2, (n,), generator=gen).float() * 2 - 1
            self.maps[j] = (bucket.to(dev), sign.to(dev))
        bucket, sign = self.maps[j]
        return g.new_zeros(g.shape[0], self.dim).index_add_(1, bucket, g * sign)


@dataclass
class _Job:
    """What a scan reads off each group's gradient g_p."""

    model: nn.Module
    params: Sequence[Tensor]
    dirs: list[Pieces]  # K directions: <g_p, dir_k>
    method: Method = "auto"
    scale: Pieces | None = None  # LESS preconditioner: g_p -> scale * g_p
    sketch: _Sketch | None = None  # S g_p
    keep: bool = False  # keep each G_p: kept = [(group ids [P'], per parameter [P', o*i] | None)]
    verify: bool = True  # check sum_p G_p against autograd on a first, one-group micro-batch
    kept: list = field(default_factory=list)


def _shape2d(prm: Tensor) -> tuple[int, int]:
    o = prm.shape[0] if prm.dim() else 1
    return o, prm.numel() // o


def _verify(
    uses: list[list[Use]], local: list, autograd: Sequence, params: Sequence, weight: float
) -> bool:
    """sum_p G_p must be autograd's gradient; it is not when a scored parameter is used
    outside its module's forward (a functional use, an in-place change): hooks cannot see it.

    Both sides are sums of many per-token terms, so their round-off scales with the size of
    those terms (`scale`, an upper bound on the norm of their sum of absolute values), not
    with the size of the result: a group whose rollouts' advantages cancel has a true
    gradient near 0 and a relative error of 100%. The same holds upstream of the hooks, so
    `weight` (the loss's total token weight, sum |A_i| n_i / T_p) bounds it too. A mismatch
    within round-off of either proves nothing; it returns False (inconclusive) and the caller checks the
    next micro-batch. A mismatch beyond it raises; True when every parameter agreed."""
    conclusive = True
    for j, (prm, want) in enumerate(zip(params, autograd)):
        o, i = _shape2d(prm)
        got = prm.new_zeros(o, i, dtype=torch.float32)
        scale = 0.0
        if local[j] is not None:
            got = got + local[j].sum(0).reshape(o, i)
            scale += float(local[j].reshape(len(local[j]), -1).norm(dim=1).sum())
        for left, right in uses[j]:
            if left.dtype == torch.long:
                got = got.index_add(0, left.reshape(-1), right.reshape(-1, i))
                scale += float(right.reshape(-1, i).float().norm(dim=1).sum())
            else:
                got = got + left.reshape(-1, o).T @ right.reshape(-1, i)
                scale += float(left.float().norm()) * float(right.float().norm())
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


def _micro(cap: _Capture, job: _Job, sub: SequenceBatch):
    """<g_p, dir_k>, ||g_p||^2, S g_p and the kept g_p of a micro-batch's groups.
    # -> [K, P], [P], [P, k] | None, [P, D] | None"""
    p, k, scale, sketch = sub.num_groups, len(job.dirs), job.scale, job.sketch
    cap.calls, cap.active = [], True
    try:
        logp = token_logprobs(job.model, sub.input_ids, sub.attention_mask)  # [N, T]
    finally:
        cap.active = False
    losses = group_losses(logp, sub.completion_mask, sub.advantages, sub.group, p)  # [P]
    outs = [out for _, _, out in cap.calls]
    wrt = outs + (list(job.params) if job.verify else [])
    grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)  # each call's b_t
    uses, local, tm = _collect(cap, grads[: len(outs)], sub, len(job.params))
    cap.calls = []
    if job.verify:
        ones = -torch.ones(sub.completion_mask.shape, device=losses.device)  # logp := -1
        weight = float(
            group_losses(ones, sub.completion_mask, sub.advantages.abs(), sub.group, p).sum()
        )
        job.verify = not _verify(uses, local, grads[len(outs) :], job.params, weight)
    dots, sq = torch.zeros(k, p, device=losses.device), torch.zeros(p, device=losses.device)
    z = torch.zeros(p, sketch.dim, device=losses.device) if sketch is not None else None
    kept: list[Tensor | None] = []
    for j, prm in enumerate(job.params):
        (o, i), dj = _shape2d(prm), [d[j] for d in job.dirs]
        if not uses[j] and local[j] is None:  # unused in this forward: G_p = 0
            kept.append(None)
            continue
        forced = local[j] is not None or scale is not None or sketch is not None or job.keep
        if not forced and _choose(job.method, uses[j], p, tm, o, i, k) == "gram":
            dots_j, sq_j = _gram_stats(uses[j], dj, o, i)
        else:
            g = _materialise(uses[j], local[j], p, o, i)  # [P, o*i]
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
    the first of `first` groups if given. Yields (group ids [P'], sub-batch, rows by group)."""
    dev = batch.group.device
    nonzero = (batch.advantages != 0).float()
    live = torch.zeros(batch.num_groups, device=dev).index_add_(0, batch.group, nonzero) > 0
    counts = torch.bincount(batch.group, minlength=batch.num_groups)
    rows_of = torch.split(torch.argsort(batch.group, stable=True), counts.tolist())
    ids = live.nonzero().squeeze(1)
    starts = [0, *range(first, len(ids), per_micro)] if first else range(0, len(ids), per_micro)
    for start, end in zip(starts, [*starts[1:], len(ids)]):
        if end <= start:
            continue
        chosen = ids[start:end]
        rows = torch.cat([rows_of[g] for g in chosen.tolist()])
        group = torch.arange(len(chosen), device=dev).repeat_interleave(counts[chosen])
        yield chosen, batch.select(rows, len(chosen), group)


def _scan(job: _Job, batch: SequenceBatch, per_micro: int, progress: Progress | None = None):
    """Every group's <g_p, dir_k>, ||g_p||^2 and S g_p. # -> [K, P], [P], [P, k] float64"""
    p, sketch = batch.num_groups, job.sketch
    job.dirs = [[d.to(q.device, torch.float32) for d, q in zip(ds, job.params)] for ds in job.dirs]
    dots, sq = np.zeros((len(job.dirs), p)), np.zeros(p)
    z = np.zeros((p, sketch.dim)) if sketch is not None else None
    done = 0
    with _Capture(job.model, job.params) as cap:
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
    total = [torch.zeros_like(prm, dtype=torch.float32) for prm in params]
    for ids, sub in _micro_batches(batch, groups_per_micro):
        logp = token_logprobs(model, sub.input_ids, sub.attention_mask)
        losses = group_losses(logp, sub.completion_mask, sub.advantages, sub.group, sub.num_groups)
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
    aggregate: Literal["sum", "mean_of_unit"] = "sum",
    groups_per_micro: int = 16,
) -> Pieces:
    """g_V = sum_v g_v, or sum_v unit(g_v) for ``mean_of_unit`` (one norm pass, then a backward
    of sum_v L_v / (||g_v|| + 1e-5)), before normalising: a sum over groups, so sums over
    disjoint sets of groups add up (`gradalign.scoring.distributed`)."""
    weights = None
    if aggregate == "mean_of_unit":
        _, sq, _ = _scan(_Job(model, params, []), batch, groups_per_micro)
        weights = 1.0 / (np.sqrt(sq) + EPS)
    elif aggregate != "sum":
        raise ValueError(f"val_aggregate='{aggregate}': expected 'sum' or 'mean_of_unit'")
    return batched_summed_gradient(model, params, batch, groups_per_micro, weights)


def batched_validation_direction(
    model: nn.Module,
    params: Sequence[Tensor],
    batch: SequenceBatch,
    aggregate: Literal["sum", "mean_of_unit"] = "sum",
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
    chunk: bool | Direction = True,
    exp_avg_sq: Mapping | None = None,
    adam_eps: float = 1e-8,
    method: Method = "auto",
    reduce_chunk: Callable[[Pieces], Pieces] | None = None,
) -> GroupAlignment:
    """dot_val, dot_chunk and norm of every group, as `alignment.exact_alignment`, from one
    batched backward. For g^_C = unit(sum_p g_p) (``chunk=True``) each g_p is kept while
    P * D * 4 bytes <= MAX_KEEP_BYTES, else one more, plain, backward comes first; pass a
    direction to use instead, or False to skip it (dot_chunk is then NaN: only `align` reads it).
    With ``exp_avg_sq`` every g_p becomes g_p / (sqrt(v) + eps) (LESS), g^_C = unit(sum_p of them)
    and g^_V is used as given. ``reduce_chunk`` maps this batch's sum_p g_p to the chunk's before
    it is normalised (called once; `gradalign.scoring.distributed` sums it over ranks)."""
    scale = adam_scale(params, exp_avg_sq, adam_eps) if exp_avg_sq is not None else None
    reduce = reduce_chunk if reduce_chunk is not None else list
    dirs = [as_pieces(val_direction, params)]
    keep = chunk is True and batch.num_groups * sum(q.numel() for q in params) * 4 <= MAX_KEEP_BYTES
    if chunk is True and not keep:
        summed = reduce(batched_summed_gradient(model, params, batch, groups_per_micro))
        dirs.append(unit_pieces([g * c for g, c in zip(summed, scale)] if scale else summed))
    elif chunk is not True and chunk is not False:
        dirs.append(as_pieces(chunk, params))
    job = _Job(model, params, dirs, method, scale, keep=keep)
    dots, sq, _ = _scan(job, batch, groups_per_micro, progress)
    dot_chunk = dots[1] if len(dirs) > 1 else np.full(batch.num_groups, np.nan)
    if keep:  # LearnAlign-style g^_C = unit(sum_p g_p) from the kept g_p: no second pass
        zero = [torch.zeros(q.numel(), dtype=torch.float64, device=q.device) for q in params]
        g_c = unit_pieces(
            reduce(
                [
                    sum((g[j].sum(0).double() for _, g in job.kept if g[j] is not None), zero[j])
                    for j in range(len(params))
                ]
            )
        )
        dot_chunk = np.zeros(batch.num_groups)
        for idx, g in job.kept:
            d = [(gj @ c.float()).double() for gj, c in zip(g, g_c) if gj is not None]
            dot_chunk[idx] = torch.stack(d).sum(0).cpu().numpy()
    return GroupAlignment(dots[0], dot_chunk, np.sqrt(sq), alignment.direction_norm(dirs[0]))


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
    """Seeded random-projection features S g_p of every group (a CountSketch per parameter,
    see `_Sketch`; zero-variance groups get 0), for analysis. # -> [P, k] float64"""
    scale = adam_scale(params, exp_avg_sq, adam_eps) if exp_avg_sq is not None else None
    job = _Job(model, params, [], "materialise", scale, _Sketch(params, project_dim, seed))
    _, _, z = _scan(job, batch, groups_per_micro)
    assert z is not None
    return z


def project_direction(
    direction: Direction, params: Sequence[Tensor], project_dim: int = 512, seed: int = 0
) -> np.ndarray:
    """The same seeded projection S of one direction (e.g. g^_V). # -> [k] float64"""
    sketch, pieces = _Sketch(params, project_dim, seed), as_pieces(direction, params)
    z = [
        sketch.apply(j, d.reshape(1, -1).to(params[j].device, torch.float32))
        for j, d in enumerate(pieces)
    ]
    return torch.cat(z).sum(0).double().cpu().numpy()


def exact_preconditioned_alignment(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: SequenceBatch,
    val_direction: Direction,
    exp_avg_sq: Mapping,
    adam_eps: float = 1e-8,
) -> GroupAlignment:
    """Reference for LESS-preconditioned scoring, one backward per group: g~_p = g_p /
    (sqrt(v) + eps); dot_val = <g~_p, g^_V>, dot_chunk = <g~_p, unit(sum_q g~_q)>, norm ||g~_p||."""
    scale = flatten_pieces(adam_scale(params, exp_avg_sq, adam_eps))  # [D]
    val = flatten_pieces(as_pieces(val_direction, params)).to(scale.device)
    chunk = alignment.unit(scale * alignment.summed_gradient(model, params, batch).to(scale.device))
    grads = (
        g.to(scale.device) * scale for g in alignment.iter_group_gradients(model, params, batch)
    )
    stats = np.array([(float(g @ val), float(g @ chunk), float(g.norm())) for g in grads])
    return GroupAlignment(stats[:, 0], stats[:, 1], stats[:, 2], alignment.direction_norm(val))
