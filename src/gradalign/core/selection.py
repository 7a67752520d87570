"""Selection modes: which n problems of a chunk to train on (DESIGN §3).

Pure functions on arrays. Notation: P candidates in the chunk, n selected.
a_p is the pass rate of p's rollouts; dot_val = <g_p, g^_V>, dot_chunk = <g_p, g^_C>,
norm = ||g_p|| (see `gradalign.core.alignment`).

Ranked modes take the top-n (bottom-n for `negsim`) by score; ties break by ascending
problem id. Zero-variance groups (all rewards equal, so g_p = 0) follow `zero_variance`:
``zero`` (default, the reference behaviour) scores them by the mode's formula with g_p = 0,
i.e. 0.0 for the gradient modes — above every negative score, below every positive one;
``last`` ranks them after every other candidate; ``exclude`` removes them, so fewer than n
may be selected. Sampled modes (`acc`, `rand`) draw with the given seeded generator and
ignore the option (`acc` never draws a zero-variance group: its a_p is 0 or 1).

Hostile numbers never turn into scores (see `select`): a candidate whose inputs are NaN or Inf
is skipped and counted; a zero or non-finite validation direction falls back to `rand`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

EPS = 1e-5
Mode = Literal[
    "sim", "dot", "norm", "align", "negsim", "simacc", "accgreedy", "acc", "rand", "none"
]
ZeroVariance = Literal["zero", "last", "exclude"]
MODES: tuple[str, ...] = Mode.__args__  # type: ignore[attr-defined]


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


@dataclass(frozen=True)
class Selection:
    ids: np.ndarray  # int [n], chosen problem ids in rank (or draw) order
    scores: np.ndarray  # float [P], each candidate's score (NaN for sampled modes and skipped)
    excluded: int = 0  # candidates removed by zero_variance="exclude"
    skipped_nonfinite: int = 0  # candidates skipped for a NaN / Inf input
    fallback: str | None = None  # "zero_validation_gradient" when the mode fell back to rand


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


# mode -> (score function, take the top (True) or the bottom (False), uses gradients)
RANKED: dict[str, tuple[Callable[[Candidates], np.ndarray], bool, bool]] = {
    "sim": (score_sim, True, True),
    "dot": (score_dot, True, True),
    "norm": (score_norm, True, True),
    "align": (score_align, True, True),
    "negsim": (score_sim, False, True),
    "simacc": (score_simacc, True, True),
    "accgreedy": (score_accgreedy, True, False),
}


# mode -> the Candidates fields it reads; a candidate with a non-finite one is skipped
INPUTS: dict[str, tuple[str, ...]] = {
    "sim": ("dot_val", "norm"),
    "dot": ("dot_val",),
    "norm": ("norm",),
    "align": ("dot_chunk", "norm"),
    "negsim": ("dot_val", "norm"),
    "simacc": ("dot_val", "norm", "pass_rate"),
    "accgreedy": ("pass_rate",),
    "acc": ("pass_rate",),
}


def finite_inputs(mode: str, c: Candidates) -> np.ndarray:
    """True where every input `mode` reads is finite (absent inputs are not checked). # [P]"""
    ok = np.ones(len(c.ids), dtype=bool)
    for name in INPUTS.get(mode, ()):
        values = getattr(c, name)
        if values is not None:
            ok &= np.isfinite(values)
    return ok


def needs(mode: str) -> set[str]:
    """What a mode needs computed: 'rollouts' (pass rates) and/or 'gradients'."""
    if mode in ("rand", "none"):
        return set()
    if mode in ("acc", "accgreedy"):
        return {"rollouts"}
    return {"rollouts", "gradients"}


def rank_top(scores: np.ndarray, ids: np.ndarray, top: bool = True) -> np.ndarray:
    """Positions sorted best first; ties by ascending id. # [P] -> [P]"""
    key = -scores if top else scores
    return np.lexsort((ids, key))


def select_ranked(mode: str, c: Candidates, n: int, zero_variance: ZeroVariance) -> Selection:
    score_fn, top, uses_grads = RANKED[mode]
    with np.errstate(all="ignore"):  # non-finite inputs are masked below
        scores = score_fn(c).astype(np.float64)
    ok = finite_inputs(mode, c)
    zv = c.zero_variance if c.zero_variance is not None else np.zeros(len(c.ids), bool)
    if uses_grads:
        scores[zv] = 0.0  # g_p = 0 exactly; guard against round-off
    scores[~ok] = np.nan  # no score: never ranked, never selected
    order = rank_top(scores, c.ids, top)
    order = order[ok[order]]
    excluded = 0
    if zero_variance != "zero":
        keep, drop = order[~zv[order]], order[zv[order]]
        order = keep if zero_variance == "exclude" else np.concatenate([keep, drop])
        excluded = len(drop) if zero_variance == "exclude" else 0
    return Selection(c.ids[order[:n]], scores, excluded, int((~ok).sum()))


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


def uses_validation(mode: str) -> bool:
    """Whether `mode` scores with the validation direction g^_V (reads dot_val)."""
    return "dot_val" in INPUTS.get(mode, ())


def select(
    mode: str,
    c: Candidates,
    n: int,
    rng: np.random.Generator,
    zero_variance: ZeroVariance = "zero",
) -> Selection:
    """Choose n of the chunk's problems under `mode`.

    Non-finite inputs: a candidate with a NaN or Inf among the inputs its mode reads
    (`INPUTS`: dot_val, dot_chunk, norm, pass_rate) is skipped -- score NaN, never ranked or
    drawn, so fewer than n may be chosen -- and counted in `Selection.skipped_nonfinite`; the
    other candidates' scores are unaffected. A `SelectionWarning` names the first ids.

    Zero validation gradient (documented fallback): the modes that read dot_val (`sim`, `dot`,
    `negsim`, `simacc`) need a validation direction. When `c.val_norm` = ||g^_V|| is 0 (g_V = 0,
    e.g. every validation group had equal rewards, so every advantage is 0) or not finite, their
    scores carry no information: n candidates are then drawn uniformly with `rng`, as `rand`
    does, `Selection.fallback` is "zero_validation_gradient" and a `SelectionWarning` says so.
    """
    if n < 1:
        raise ValueError(f"selection size n must be >= 1, got {n}")
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if (
        uses_validation(mode)
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
    if mode in RANKED:
        sel = select_ranked(mode, c, n, zero_variance)
    elif mode == "acc":
        sel = select_acc(c, n, rng)
    elif mode == "rand":
        return select_rand(c, n, rng)
    else:  # none
        return Selection(c.ids.copy(), np.full(len(c.ids), np.nan))
    if sel.skipped_nonfinite:
        bad = c.ids[~finite_inputs(mode, c)]
        warnings.warn(
            f"selection mode '{mode}': skipped {len(bad)} of {len(c.ids)} candidates with a "
            f"NaN or Inf in {', '.join(INPUTS[mode])} (problem ids "
            f"{', '.join(map(str, bad[:5].tolist()))}{', ...' if len(bad) > 5 else ''})",
            SelectionWarning,
            stacklevel=2,
        )
    return sel
