"""Can gradient alignment work here? The measures a round already has the inputs for.

Notation: P candidates of a chunk; `scores` float [P] are a mode's scores, `clean` bool [P]
says which candidates are known to be clean (built-in regimes record corruption in `meta`;
selection never reads it), `eligible` bool [P] which ones count (groups with reward
variance: a zero-variance group has g_p = 0 and no score to rank by).

- selection AUC = P(score of a clean candidate > score of a corrupted one), ties count 1/2,
  over eligible candidates with a finite score; 0.5 is chance, 1.0 perfect separation;
- split-half cosine = cos(g_V(even positions of the validation set), g_V(odd ones)): when it is
  <= 0 the two halves want opposite things and g^_V is no direction at all this round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor


def selection_auc(
    scores: np.ndarray, clean: np.ndarray, eligible: np.ndarray | None = None
) -> float:
    """AUC of `scores` for clean above corrupted (Mann-Whitney U / (n_clean * n_corrupt)).
    NaN when either class has no eligible candidate with a finite score. # [P], [P], [P] -> ()"""
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores)
    if eligible is not None:
        keep &= np.asarray(eligible, dtype=bool)
    pos, neg = scores[keep & clean], scores[keep & ~np.asarray(clean, dtype=bool)]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]  # [n_clean, n_corrupt]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def cosine(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    """cos(a, b) of two gradients, each one tensor or a list of per-parameter pieces; 0.0
    when either is zero (no direction to compare)."""
    pa = [a] if isinstance(a, Tensor) else list(a)
    pb = [b] if isinstance(b, Tensor) else list(b)
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(pa, pb, strict=True))
    na = math.sqrt(sum(float(x.double().square().sum()) for x in pa))
    nb = math.sqrt(sum(float(y.double().square().sum()) for y in pb))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def split_halves(num_val: int) -> tuple[range, range]:
    """The two fixed halves of a validation set of `num_val` problems: even positions and odd
    positions. A set assembled source by source (the built-in families, several files) puts
    each source in both halves; halves by contiguous position would be the sources, and
    sources that want different directions would read as no direction at all."""
    return range(0, num_val, 2), range(1, num_val, 2)


def mean_by(values: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Mean of the finite `values` per label (e.g. per problem source). # [P], P -> {label}"""
    out: dict[str, float] = {}
    values = np.asarray(values, dtype=np.float64)
    for label in sorted(set(labels)):
        picked = values[[x == label for x in labels]]
        picked = picked[np.isfinite(picked)]
        out[label] = float(picked.mean()) if len(picked) else math.nan
    return out
