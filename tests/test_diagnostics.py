"""Diagnostics (`gradalign.core.diagnostics`) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradalign.core.diagnostics import cosine, mean_by, selection_auc, split_halves
from gradalign.core.selection import Candidates, Selection
from gradalign.data.problems import Problem
from gradalign.data.tasks import make_regime, make_task
from gradalign.run.artifacts import problem_rows, selection_quality


def test_auc_counts_pairs_and_half_ties() -> None:
    # clean scores 3, 1; corrupted 2, 1: pairs (3>2) (3>1) (1<2) (1=1) -> (1 + 1 + 0 + 0.5) / 4
    scores = np.array([3.0, 2.0, 1.0, 1.0])
    clean = np.array([True, False, True, False])
    assert selection_auc(scores, clean) == pytest.approx(0.625, abs=0)


def test_auc_ignores_ineligible_and_nonfinite() -> None:
    scores = np.array([3.0, 2.0, 1.0, 9.0, np.nan])
    clean = np.array([True, False, False, False, True])
    eligible = np.array([True, True, True, False, True])  # the 9.0 corrupted one: zero variance
    assert selection_auc(scores, clean, eligible) == 1.0
    assert selection_auc(scores, clean) == pytest.approx(2 / 3)


def test_auc_perfectly_wrong_is_zero_and_one_class_is_nan() -> None:
    assert selection_auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert math.isnan(selection_auc(np.array([0.0, 1.0]), np.array([True, True])))


def test_cosine_of_pieces_equals_cosine_of_the_concatenation() -> None:
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([[-1.0]])]
    # <a, b> = 1 - 2 = -1; |a| = sqrt(5); |b| = sqrt(3)
    assert cosine(a, b) == pytest.approx(-1 / math.sqrt(15), rel=1e-12)
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0


def test_split_halves_are_fixed_and_cover_the_set() -> None:
    assert [list(h) for h in split_halves(5)] == [[0, 2, 4], [1, 3]]
    assert [list(h) for h in split_halves(4)] == [[0, 2], [1, 3]]
    assert [list(h) for h in split_halves(1)] == [[0], []]


def test_mean_by_label() -> None:
    got = mean_by(np.array([1.0, 3.0, 2.0, np.nan]), ["b", "b", "a", "a"])
    assert got == {"a": 2.0, "b": 2.0}


def test_selection_quality_from_a_labelled_chunk() -> None:
    chunk = [
        Problem(0, "a", "1", "addition"),
        Problem(1, "b", "1", "addition", "coinflip", {"corruption": "coinflip"}),
        Problem(2, "c", "1", "addition"),
        Problem(3, "d", "1", "addition", "coinflip", {"corruption": "coinflip"}),
        Problem(4, "e", "1", "addition", meta={"utility": "garbled"}),
    ]
    ids = np.arange(5)
    zv = np.array([False, False, False, False, True])  # the filler: all rewards 0
    cand = Candidates(ids, np.full(5, 0.5), zv)
    sel = Selection(ids[:2], np.array([0.9, 0.1, 0.2, 0.3, 0.0]))
    # clean 0.9, 0.2 above corrupted 0.1, 0.3: (1 + 1 + 1 + 0) / 4; the filler is not eligible
    assert selection_quality(chunk, cand, sel) == {"select/auc_clean": 0.75}
    sampled = Selection(ids[:2], np.full(5, np.nan))  # rand has no scores
    assert selection_quality(chunk, cand, sampled) == {"select/auc_clean": None}
    clean = [Problem(i, str(i), "1", "addition") for i in range(5)]  # no labels: nothing to say
    assert selection_quality(clean, cand, sel) == {"select/auc_clean": None}


def test_problem_rows_keep_every_set_and_meta() -> None:
    sets = make_regime("noisy", ["addition"], 8, 2, 3, seed=0)
    rows = problem_rows(sets)
    assert [r["set"] for r in rows] == ["pool"] * 8 + ["validation"] * 2 + ["eval"] * 3
    assert sum(r["meta"].get("corruption") == "coinflip" for r in rows) == 4
    assert {r["id"] for r in rows} == {p.id for p in sets.pool + sets.validation + sets.eval}


def test_split_halves_put_every_family_of_a_builtin_validation_set_in_both_halves() -> None:
    """The built-in validation set is drawn family by family (16 addition, then 16
    countdown2); halves by contiguous position would be one family each."""
    val = make_task(["addition", "countdown2"], 8, 32, 8, seed=0).validation
    assert [p.source for p in val[:16]] == ["addition"] * 16
    for half in split_halves(len(val)):
        sources = [val[i].source for i in half]
        assert sources.count("addition") == sources.count("countdown2") == 8
