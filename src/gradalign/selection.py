"""Selection modes: which n problems of a chunk to train on (DESIGN §3).

Pure functions on arrays. Notation: P candidates in the chunk, n selected.
a_p is the pass rate of p's rollouts; dot_val = <g_p, g^_V>, dot_chunk = <g_p, g^_C>,
norm = ||g_p|| (see `gradalign.alignment`).

Ranked modes take the top-n (bottom-n for `negsim`) by score; ties break by ascending
problem id. Zero-variance groups (all rewards equal, so g_p = 0) follow `zero_variance`:
``zero`` (default, the reference behaviour) scores them by the mode's formula with g_p = 0,
i.e. 0.0 for the gradient modes — above every negative score, below every positive one;
``last`` ranks them after every other candidate; ``exclude`` removes them, so fewer than n
may be selected. Sampled modes (`acc`, `rand`) draw with the given seeded generator and
ignore the option (`acc` never draws a zero-variance group: its a_p is 0 or 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Selection:
    ids: np.ndarray  # int [n], chosen problem ids in rank (or draw) order
    scores: np.ndarray  # float [P], each candidate's score (NaN for sampled modes)
    excluded: int = 0  # candidates removed by zero_variance="exclude"


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
    scores = score_fn(c).astype(np.float64)
    zv = c.zero_variance if c.zero_variance is not None else np.zeros(len(c.ids), bool)
    if uses_grads:
        scores[zv] = 0.0  # g_p = 0 exactly; guard against round-off
    order = rank_top(scores, c.ids, top)
    excluded = 0
    if zero_variance != "zero":
        keep, drop = order[~zv[order]], order[zv[order]]
        order = keep if zero_variance == "exclude" else np.concatenate([keep, drop])
        excluded = len(drop) if zero_variance == "exclude" else 0
    return Selection(c.ids[order[:n]], scores, excluded)


def select_acc(c: Candidates, n: int, rng: np.random.Generator) -> Selection:
    """Uniform sample from {p : 0.2 <= a_p <= 0.8}; if fewer than n qualify, all of them
    and the rest drawn uniformly from the others (so every mode trains on n problems)."""
    a = _req(c.pass_rate, "pass rates")
    ok = np.flatnonzero((a >= 0.2) & (a <= 0.8))
    rest = np.flatnonzero(~((a >= 0.2) & (a <= 0.8)))
    first = rng.permutation(ok)[:n]
    fill = rng.permutation(rest)[: n - len(first)]
    chosen = np.concatenate([first, fill]).astype(int)
    return Selection(c.ids[chosen], np.full(len(c.ids), np.nan))


def select_rand(c: Candidates, n: int, rng: np.random.Generator) -> Selection:
    chosen = rng.permutation(len(c.ids))[:n]
    return Selection(c.ids[chosen], np.full(len(c.ids), np.nan))


def select(
    mode: str,
    c: Candidates,
    n: int,
    rng: np.random.Generator,
    zero_variance: ZeroVariance = "zero",
) -> Selection:
    """Choose n of the chunk's problems under `mode`."""
    if n < 1:
        raise ValueError(f"selection size n must be >= 1, got {n}")
    if mode in RANKED:
        return select_ranked(mode, c, n, zero_variance)
    if mode == "acc":
        return select_acc(c, n, rng)
    if mode == "rand":
        return select_rand(c, n, rng)
    if mode == "none":
        return Selection(c.ids.copy(), np.full(len(c.ids), np.nan))
    raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
