"""Capture hooks: each scored parameter's uses in one forward, regrouped per group.

Notation: N rows (rollouts) · L positions · P groups · Tm = max_p T_p token slots per group.

`Capture` puts a forward hook on every module that owns a scored parameter (both sides of a
tied weight) and records each call's input and output. After one backward of sum_p L_p gives
each output's gradient b_t, `collect` turns the calls into `uses.DenseUse` (linear layers and
their biases) and `uses.EmbeddingUse` (embeddings), laid out per group by `Layout`; any other
owner (RMSNorm, ...) gets its per-group gradient by autograd of that module alone, row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradalign.core.grpo import SequenceBatch
from gradalign.scoring.uses import DenseUse, EmbeddingUse, Use


class Capture:
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
        # the weights each other owner (RMSNorm, ...) ran with, noted at its forward; copied
        # with `copy_weights` (FSDP2: a sharded module holds them whole only while it runs)
        self.weights: dict[nn.Module, dict[str, Tensor]] = {}
        self.copy_weights = False
        self.active = False

    def hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self.active:
            return
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise NotImplementedError(f"{type(module).__name__}: needs a tensor input and output")
        self.calls.append((module, args[0].detach(), output))
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            own = module._parameters
            names = [n for n, _ in self.owners[module]]
            held = {n: own[n].detach() for n in names}  # type: ignore[union-attr]
            self.weights[module] = (
                {n: w.clone() for n, w in held.items()} if self.copy_weights else held
            )

    def __enter__(self) -> Capture:
        self.handles = [m.register_forward_hook(self.hook) for m in self.owners]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


class Layout:
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


def _row_grads(
    module: nn.Module, own: dict[str, Tensor], x: Tensor, b: Tensor
) -> dict[str, Tensor]:
    """Per-row gradients of `module`'s own parameters (`own`, the weights it ran with) by
    autograd of the module alone. # x [N, ...], b [N, ...] -> {name: [N, *shape]}"""

    def inner(p: dict[str, Tensor], xr: Tensor, br: Tensor) -> Tensor:
        return (functional_call(module, p, (xr[None],)) * br[None]).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(own, x, b)


def collect(
    cap: Capture, grads: Sequence[Tensor | None], sub: SequenceBatch, n_params: int
) -> tuple[list[list[Use]], list[Tensor | None], int]:
    """Each parameter's uses and 'local' group gradients [P, *shape] (the owners autograd
    handles row by row), from the captured calls and their output gradients `grads`.
    # -> uses per parameter, local per parameter, Tm"""
    lay, p = Layout(sub), sub.num_groups
    uses: list[list[Use]] = [[] for _ in range(n_params)]
    local: list[Tensor | None] = [None] * n_params
    for (m, x, _), b in zip(cap.calls, grads):
        if b is None:
            continue
        if isinstance(m, nn.Linear):
            bp, ap = lay(b), lay(x)
            for name, j in cap.owners[m]:
                right = ap if name == "weight" else bp.new_ones(p, lay.tm, 1)
                uses[j].append(DenseUse(bp, right))
        elif isinstance(m, nn.Embedding):
            ids, bp = lay(x), lay(b)
            if m.padding_idx is not None:  # that row gets no gradient
                bp = bp * (ids != m.padding_idx).unsqueeze(-1)
            uses[cap.owners[m][0][1]].append(EmbeddingUse(ids, bp))
        else:
            rows = _row_grads(m, cap.weights[m], x, b)
            for name, j in cap.owners[m]:
                r = rows[name].float()
                g = r.new_zeros((p, *r.shape[1:])).index_add_(0, sub.group, r)  # [P, *shape]
                prev = local[j]
                local[j] = g if prev is None else prev + g
    return uses, local, lay.tm
