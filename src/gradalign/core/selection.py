"""Selection modes: which n problems of a chunk to train on (docs/method.md).

Pure functions on arrays. Notation: P candidates in the chunk, n selected.
a_p is the pass rate of p's rollouts; dot_val = <g_p, g^_V>, dot_chunk = <g_p, g^_C>,
norm = ||g_p|| (see `gradalign.core.alignment`).

Ranked modes take the top-n (bottom-n for `negsim`) by score; ties break by ascending
problem id. Zero-variance groups (all rewards equal, so g_p = 0) follow `zero_variance`:
``zero`` (default, the reference behaviour) scores them by the mode's formula with g_p = 0,
i.e. 0.0 for the gradient modes — above every negative score, below every positive one;
``last`` ranks them after every other candidate; ``exclude`` removes them, so fewer than n
may be selected. Sampled modes (`acc`, `rand`) draw with the given seeded generator and
ignore the option: `acc` draws first among 0.2 <= a_p <= 0.8, where no zero-variance group is
(a zero-variance group has a_p = 0 or 1), but its fill step, when fewer than n qualify, draws
from the other candidates and so can take one.

Each mode is one `ModeRule` in `RULES`: the inputs it reads, and either its score function
(ranked modes) or its draw (sampled modes); what a mode needs computed (`needs`) and whether it
reads the validation direction (`uses_validation`) follow from its inputs.

Hostile numbers never turn into scores (see `select`): a candidate whose inputs are NaN or Inf
is skipped and counted; a zero or non-finite validation direction falls back to `rand`.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from gradalign.core.common import EPS

Mode = Literal[
    "sim", "dot", "norm", "align", "negsim", "simacc", "accgreedy", "acc", "rand", "none"
]
ZeroVariance = Literal["zero", "last", "exclude"]
MODES: tuple[str, ...] = typing.get_args(Mode)


@dataclass(frozen=True)
class Candidates:
    """What a mode may look at for the P problems of a chunk."""

    ids: np.ndarray  # int [P]
    pass_rate: np.ndarray | None = None  # float [P], a_p
    zero_variance: np.ndarray | None = None  # bool [P]
    dot_val: np.ndarray | None = None  # float [P]
    dot_chunk: np.ndarray | None = None  # float [P]
    norm: np.ndarray | None = None  # float [P]
    val_norm: float | None = None  # ||g^_V||: ~1, 0 when g_V = 0; None: not checked


# The per-candidate statistics of `Candidates`, under these names wherever they are written
# (a run's rounds/NNNN/scores.jsonl, `gradalign score`'s scores.jsonl).
STATS = ("pass_rate", "zero_variance", "dot_val", "dot_chunk", "norm")


@dataclass(frozen=True)
class Selection:
    ids: np.ndarray  # int [n], chosen problem ids in rank (or draw) order
    scores: np.ndarray  # float [P], each candidate's score (NaN for sampled modes and skipped)
    excluded: int = 0  # candidates removed by zero_variance="exclude"
    skipped_nonfinite: int = 0  # candidates skipped for a NaN / Inf input
    fallback: str | None = None  # "zero_validation_gradient": fell back to rand; "empty_selection"


class SelectionWarning(UserWarning):
    """Candidates were skipped for non-finite inputs, or a mode fell back to `rand`."""


def _req(x: np.ndarray | None, what: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"this mode needs {what}")
    return x


def score_sim(c: Candidates) -> np.ndarray:
    # GradAlign: cosine of g_p with the normalised validation gradient
    return _req(c.dot_val, "gradients") / (_req(c.norm, "gradients") + EPS)


def score_dot(c: Candidates) -> np.ndarray:
    return _req(c.dot_val, "gradients").copy()


def score_norm(c: Candidates) -> np.ndarray:
    return _req(c.norm, "gradients").copy()


def score_align(c: Candidates) -> np.ndarray:
    # LearnAlign-style: cosine with the chunk's own summed gradient
    return _req(c.dot_chunk, "gradients") / (_req(c.norm, "gradients") + EPS)


def score_simacc(c: Candidates) -> np.ndarray:
    a = _req(c.pass_rate, "pass rates")
    return score_sim(c) * 4.0 * a * (1.0 - a)


def score_accgreedy(c: Candidates) -> np.ndarray:
    return -np.abs(_req(c.pass_rate, "pass rates") - 0.5)


def select_acc(c: Candidates, n: int, rng: np.random.Generator) -> Selection:
    """Uniform sample from {p : 0.2 <= a_p <= 0.8}; if fewer than n qualify, all of them
    and the rest drawn uniformly from the others (so every mode trains on n problems)."""
    a = _req(c.pass_rate, "pass rates")
    finite = finite_inputs("acc", c)
    mid = (a >= 0.2) & (a <= 0.8)
    first = rng.permutation(np.flatnonzero(mid & finite))[:n]
    fill = rng.permutation(np.flatnonzero(~mid & finite))[: n - len(first)]
    chosen = np.concatenate([first, fill]).astype(int)
    nan = np.full(len(c.ids), np.nan)
    return Selection(c.ids[chosen], nan, skipped_nonfinite=int((~finite).sum()))


def select_rand(c: Candidates, n: int, rng: np.random.Generator) -> Selection:
    chosen = rng.permutation(len(c.ids))[:n]
    return Selection(c.ids[chosen], np.full(len(c.ids), np.nan))


def select_none(c: Candidates, n: int, rng: np.random.Generator) -> Selection:
    """No selection: the whole chunk, in chunk order (the loop trains on the whole pool)."""
    return Selection(c.ids.copy(), np.full(len(c.ids), np.nan))


GRADIENT_INPUTS = ("dot_val", "dot_chunk", "norm")


@dataclass(frozen=True)
class ModeRule:
    """One selection mode: what it reads and how it chooses. A mode either ranks (``score``:
    top-n, or bottom-n when not ``top``) or draws (``draw``, with the seeded generator)."""

    inputs: tuple[str, ...]  # the Candidates fields it reads; a non-finite one skips a candidate
    score: Callable[[Candidates], np.ndarray] | None = None
    top: bool = True
    draw: Callable[[Candidates, int, np.random.Generator], Selection] | None = None

    @property
    def uses_gradients(self) -> bool:
        return any(name in GRADIENT_INPUTS for name in self.inputs)

    @property
    def uses_validation(self) -> bool:
        """Whether it scores with the validation direction g^_V (reads dot_val)."""
        return "dot_val" in self.inputs

    @property
    def needs(self) -> set[str]:
        """What must be computed for it: 'rollouts' (pass rates) and/or 'gradients'."""
        if self.uses_gradients:
            return {"rollouts", "gradients"}
        return {"rollouts"} if "pass_rate" in self.inputs else set()


RULES: dict[str, ModeRule] = {
    "sim": ModeRule(("dot_val", "norm"), score_sim),
    "dot": ModeRule(("dot_val",), score_dot),
    "norm": ModeRule(("norm",), score_norm),
    "align": ModeRule(("dot_chunk", "norm"), score_align),
    "negsim": ModeRule(("dot_val", "norm"), score_sim, top=False),  # ablation: bottom-n
    "simacc": ModeRule(("dot_val", "norm", "pass_rate"), score_simacc),
    "accgreedy": ModeRule(("pass_rate",), score_accgreedy),
    "acc": ModeRule(("pass_rate",), draw=select_acc),
    "rand": ModeRule((), draw=select_rand),
    "none": ModeRule((), draw=select_none),
}
assert tuple(RULES) == MODES


def rule(mode: str) -> ModeRule:
    if mode not in RULES:
        raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    return RULES[mode]


def finite_inputs(mode: str, c: Candidates) -> np.ndarray:
    """True where every input `mode` reads is finite (absent inputs are not checked). # [P]"""
    ok = np.ones(len(c.ids), dtype=bool)
    for name in RULES[mode].inputs:
        values = getattr(c, name)
        if values is not None:
            ok &= np.isfinite(values)
    return ok


def needs(mode: str) -> set[str]:
    """What a mode needs computed: 'rollouts' (pass rates) and/or 'gradients'."""
    return rule(mode).needs


def uses_validation(mode: str) -> bool:
    """Whether `mode` scores with the validation direction g^_V (reads dot_val)."""
    return rule(mode).uses_validation


def rank_top(scores: np.ndarray, ids: np.ndarray, top: bool = True) -> np.ndarray:
    """Positions sorted best first; ties by ascending id. # [P] -> [P]"""
    key = -scores if top else scores
    return np.lexsort((ids, key))


def select_ranked(mode: str, c: Candidates, n: int, zero_variance: ZeroVariance) -> Selection:
    mode_rule = RULES[mode]
    assert mode_rule.score is not None, f"mode '{mode}' draws, it does not rank"
    with np.errstate(all="ignore"):  # non-finite inputs are masked below
        scores = mode_rule.score(c).astype(np.float64)
    ok = finite_inputs(mode, c)
    zv = c.zero_variance if c.zero_variance is not None else np.zeros(len(c.ids), bool)
    if mode_rule.uses_gradients:
        scores[zv] = 0.0  # g_p = 0 exactly; guard against round-off
    scores[~ok] = np.nan  # no score: never ranked, never selected
    order = rank_top(scores, c.ids, mode_rule.top)
    order = order[ok[order]]
    excluded = 0
    if zero_variance != "zero":
        keep, drop = order[~zv[order]], order[zv[order]]
        order = keep if zero_variance == "exclude" else np.concatenate([keep, drop])
        excluded = len(drop) if zero_variance == "exclude" else 0
    return Selection(c.ids[order[:n]], scores, excluded, int((~ok).sum()))


def select(
    mode: str,
    c: Candidates,
    n: int,
    rng: np.random.Generator,
    zero_variance: ZeroVariance = "zero",
) -> Selection:
    """Choose n of the chunk's problems under `mode`.

    Non-finite inputs: a candidate with a NaN or Inf among the inputs its mode reads
    (`ModeRule.inputs`: dot_val, dot_chunk, norm, pass_rate) is skipped -- score NaN, never ranked
    or drawn, so fewer than n may be chosen -- and counted in `Selection.skipped_nonfinite`; the
    other candidates' scores are unaffected. A `SelectionWarning` names the first ids.

    Zero validation gradient (documented fallback): the modes that read dot_val (`sim`, `dot`,
    `negsim`, `simacc`) need a validation direction. When `c.val_norm` = ||g^_V|| is 0 (g_V = 0,
    e.g. every validation group had equal rewards, so every advantage is 0) or not finite, their
    scores carry no information: n candidates are then drawn uniformly with `rng`, as `rand`
    does, `Selection.fallback` is "zero_validation_gradient" and a `SelectionWarning` says so.
    """
    if n < 1:
        raise ValueError(f"selection size n must be >= 1, got {n}")
    mode_rule = rule(mode)
    if (
        mode_rule.uses_validation
        and c.val_norm is not None
        and not (np.isfinite(c.val_norm) and c.val_norm > 0)
    ):
        warnings.warn(
            f"selection mode '{mode}': the validation gradient direction has norm "
            f"{c.val_norm} (zero when every validation group has equal rewards), so its scores "
            f"carry no information; drawing {min(n, len(c.ids))} of {len(c.ids)} candidates "
            "uniformly at random instead",
            SelectionWarning,
            stacklevel=2,
        )
        return replace(select_rand(c, n, rng), fallback="zero_validation_gradient")
    if mode_rule.draw is not None:
        sel = mode_rule.draw(c, n, rng)
    else:
        sel = select_ranked(mode, c, n, zero_variance)
    if sel.skipped_nonfinite:
        bad = c.ids[~finite_inputs(mode, c)]
        warnings.warn(
            f"selection mode '{mode}': skipped {len(bad)} of {len(c.ids)} candidates with a "
            f"NaN or Inf in {', '.join(mode_rule.inputs)} (problem ids "
            f"{', '.join(map(str, bad[:5].tolist()))}{', ...' if len(bad) > 5 else ''})",
            SelectionWarning,
            stacklevel=2,
        )
    return sel
