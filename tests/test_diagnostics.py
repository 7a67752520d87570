"""Diagnostics (`gradalign.core.diagnostics`) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradalign.core.diagnostics import cosine, mean_by, selection_auc, split_halves


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
    assert split_halves(5) == (range(0, 3), range(3, 5))
    assert split_halves(4) == (range(0, 2), range(2, 4))


def test_mean_by_label() -> None:
    got = mean_by(np.array([1.0, 3.0, 2.0, np.nan]), ["b", "b", "a", "a"])
    assert got == {"a": 2.0, "b": 2.0}
