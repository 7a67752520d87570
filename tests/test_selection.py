"""selection: every mode on one hand-made chunk (docs/method.md).

The table has ids out of order, exact ties, two zero-variance rows (id 12 carries round-off
residue 1e-9 that the zero-variance guard must clear) and negative scores. Expected orders
are derived by hand in the comments; EPS = 1e-5 in every cosine.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradalign.core.selection import MODES, Candidates, SelectionWarning, needs, rank_top, select

#                 id   norm  dot_val  dot_chunk  a      zero-variance
TABLE = [
    (7, 2.0, 1.0, -0.6, 0.5, False),
    (3, 1.0, 0.5, 0.5, 0.25, False),
    (12, 1e-9, 1e-9, -1e-9, 1.0, True),
    (5, 10.0, 3.0, 6.0, 0.75, False),
    (1, 1.0, 0.5, 0.1, 0.5, False),
    (9, 4.0, -2.0, -1.0, 0.125, False),
    (4, 0.0, 0.0, 0.0, 0.0, True),
    (10, 1.0, 0.5, -0.2, 0.875, False),
    (2, 0.5, -0.1, 0.3, 0.375, False),
]
IDS = [row[0] for row in TABLE]

# hand scores in table order (ids 7, 3, 12, 5, 1, 9, 4, 10, 2)
SIM = [
    1 / 2.00001,
    0.5 / 1.00001,
    0.0,
    3 / 10.00001,
    0.5 / 1.00001,
    -2 / 4.00001,
    0.0,
    0.5 / 1.00001,
    -0.1 / 0.50001,
]
DOT = [1.0, 0.5, 0.0, 3.0, 0.5, -2.0, 0.0, 0.5, -0.1]
NORM = [2.0, 1.0, 0.0, 10.0, 1.0, 4.0, 0.0, 1.0, 0.5]
ALIGN = [
    -0.6 / 2.00001,
    0.5 / 1.00001,
    0.0,
    6 / 10.00001,
    0.1 / 1.00001,
    -1 / 4.00001,
    0.0,
    -0.2 / 1.00001,
    0.3 / 0.50001,
]
# 4a(1-a) for a = .5, .25, 1, .75, .5, .125, 0, .875, .375:
#          = 1,  .75, 0, .75, 1, .4375, 0, .4375, .9375
SIMACC = [
    SIM[0],
    0.75 * SIM[1],
    0.0,
    0.75 * SIM[3],
    SIM[4],
    0.4375 * SIM[5],
    0.0,
    0.4375 * SIM[7],
    0.9375 * SIM[8],
]
ACCGREEDY = [0.0, -0.25, -0.5, -0.25, 0.0, -0.375, -0.5, -0.375, -0.125]

# (mode, hand scores, full rank order under zero_variance="zero")
RANKED = [
    # sim: 7 (.4999975) > 1 = 3 = 10 (.499995, ascending id) > 5 (.3) > 4 = 12 (0) > 2 > 9
    ("sim", SIM, [7, 1, 3, 10, 5, 4, 12, 2, 9]),
    # dot: 5 (3) > 7 (1) > 1 = 3 = 10 (.5) > 4 = 12 (0) > 2 (-.1) > 9 (-2)
    ("dot", DOT, [5, 7, 1, 3, 10, 4, 12, 2, 9]),
    # norm: 5 > 9 > 7 > 1 = 3 = 10 > 2 > 4 = 12 (12's 1e-9 cleared, so 4 before 12)
    ("norm", NORM, [5, 9, 7, 1, 3, 10, 2, 4, 12]),
    # align: 5 (.6) > 2 (.59999) > 3 (.5) > 1 (.1) > 4 = 12 (0) > 10 (-.2) > 9 (-.25) > 7 (-.3)
    ("align", ALIGN, [5, 2, 3, 1, 4, 12, 10, 9, 7]),
    # negsim: bottom-n of sim, ties still by ascending id
    ("negsim", SIM, [9, 2, 4, 12, 5, 1, 3, 10, 7]),
    # simacc: 7 (.5) > 1 (.499995) > 3 (.375) > 5 (.225) > 10 (.21875) > 4 = 12 > 2 > 9
    ("simacc", SIMACC, [7, 1, 3, 5, 10, 4, 12, 2, 9]),
    # accgreedy: 1 = 7 (0) > 2 > 3 = 5 > 9 = 10 > 4 = 12 (a in {0, 1})
    ("accgreedy", ACCGREEDY, [1, 7, 2, 3, 5, 9, 10, 4, 12]),
]


def chunk() -> Candidates:
    cols = list(zip(*TABLE))
    return Candidates(
        ids=np.array(cols[0]),
        pass_rate=np.array(cols[4]),
        zero_variance=np.array(cols[5]),
        dot_val=np.array(cols[2]),
        dot_chunk=np.array(cols[3]),
        norm=np.array(cols[1]),
    )


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def zero_variance_last(order: list[int]) -> list[int]:
    return [i for i in order if i not in (4, 12)] + [i for i in order if i in (4, 12)]


@pytest.mark.parametrize("mode,scores,order", RANKED, ids=[m for m, _, _ in RANKED])
def test_ranked_modes_scores_and_order(mode, scores, order):
    sel = select(mode, chunk(), len(IDS), rng())
    np.testing.assert_allclose(sel.scores, scores, rtol=1e-12, atol=0)
    assert sel.ids.tolist() == order
    assert sel.excluded == 0
    for n in (1, 3, 6):  # top-n is a prefix of the full order
        assert select(mode, chunk(), n, rng()).ids.tolist() == order[:n]


def test_zero_variance_rows_sit_between_positive_and_negative_scores():
    sel = select("sim", chunk(), 7, rng())
    assert sel.ids.tolist() == [7, 1, 3, 10, 5, 4, 12]  # zero-variance picked before negatives
    assert sel.scores[2] == 0.0 and sel.scores[6] == 0.0


@pytest.mark.parametrize("mode,scores,order", RANKED, ids=[m for m, _, _ in RANKED])
def test_zero_variance_last_and_exclude(mode, scores, order):
    last = select(mode, chunk(), len(IDS), rng(), zero_variance="last")
    assert last.ids.tolist() == zero_variance_last(order)
    assert last.excluded == 0
    excl = select(mode, chunk(), len(IDS), rng(), zero_variance="exclude")
    assert excl.ids.tolist() == zero_variance_last(order)[:7]  # fewer than n selected
    assert excl.excluded == 2


def test_zero_variance_options_on_a_small_n():
    # sim, n = 6: zero -> [7, 1, 3, 10, 5, 4]; last and exclude -> the best non-zero-variance
    assert select("sim", chunk(), 6, rng(), "zero").ids.tolist() == [7, 1, 3, 10, 5, 4]
    assert select("sim", chunk(), 6, rng(), "last").ids.tolist() == [7, 1, 3, 10, 5, 2]
    excl = select("sim", chunk(), 6, rng(), "exclude")
    assert excl.ids.tolist() == [7, 1, 3, 10, 5, 2] and excl.excluded == 2
    # negsim bottom-n: zero -> 9, 2, then the zero-variance 4, 12; last -> skips them
    assert select("negsim", chunk(), 3, rng(), "zero").ids.tolist() == [9, 2, 4]
    assert select("negsim", chunk(), 3, rng(), "last").ids.tolist() == [9, 2, 5]


def test_acc_samples_only_from_mid_pass_rates():
    qualified = {7, 3, 5, 1, 2}  # a = .5, .25, .75, .5, .375
    for seed in range(5):
        sel = select("acc", chunk(), 3, rng(seed))
        assert len(sel.ids) == 3 and len(set(sel.ids.tolist())) == 3
        assert set(sel.ids.tolist()) <= qualified
        assert np.isnan(sel.scores).all()
    assert set(select("acc", chunk(), 5, rng()).ids.tolist()) == qualified


def test_acc_fills_from_the_others_when_too_few_qualify():
    sel = select("acc", chunk(), 7, rng(3))
    ids = sel.ids.tolist()
    assert len(ids) == 7 and len(set(ids)) == 7
    assert set(ids[:5]) == {7, 3, 5, 1, 2}  # all qualified first
    assert set(ids[5:]) <= {12, 9, 4, 10}


def test_acc_bounds_are_inclusive():
    c = Candidates(ids=np.array([4, 3, 2, 1]), pass_rate=np.array([0.2, 0.19, 0.8, 0.81]))
    for seed in range(4):
        assert sorted(select("acc", c, 2, rng(seed)).ids.tolist()) == [2, 4]


@pytest.mark.parametrize("mode", ["acc", "rand"])
def test_sampled_modes_are_reproducible_by_seed(mode):
    a = select(mode, chunk(), 3, rng(11)).ids.tolist()
    assert select(mode, chunk(), 3, rng(11)).ids.tolist() == a
    draws = {tuple(select(mode, chunk(), 3, rng(s)).ids.tolist()) for s in range(6)}
    assert len(draws) > 1  # another seed gives another draw


def test_rand_draws_distinct_ids_from_the_chunk():
    for seed in range(5):
        sel = select("rand", chunk(), 4, rng(seed))
        assert len(set(sel.ids.tolist())) == 4 and set(sel.ids.tolist()) <= set(IDS)
    assert sorted(select("rand", chunk(), len(IDS), rng()).ids.tolist()) == sorted(IDS)


def test_none_keeps_the_whole_chunk_in_order():
    sel = select("none", chunk(), 2, rng())
    assert sel.ids.tolist() == IDS
    assert np.isnan(sel.scores).all()


def test_selection_size_below_one_and_unknown_mode_raise():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        select("sim", chunk(), 0, rng())
    with pytest.raises(ValueError, match="unknown mode 'best'"):
        select("best", chunk(), 2, rng())


def test_missing_inputs_raise():
    c = Candidates(ids=np.array([1, 2]), pass_rate=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="gradients"):
        select("sim", c, 1, rng())
    with pytest.raises(ValueError, match="pass rates"):
        select("accgreedy", Candidates(ids=np.array([1, 2])), 1, rng())


def test_rank_top_breaks_ties_by_ascending_id():
    scores, ids = np.array([1.0, 2.0, 2.0, 0.0]), np.array([4, 9, 3, 1])
    assert rank_top(scores, ids).tolist() == [2, 1, 0, 3]
    assert rank_top(scores, ids, top=False).tolist() == [3, 0, 2, 1]


def test_needs_and_mode_list():
    assert set(MODES) == {
        "sim",
        "dot",
        "norm",
        "align",
        "negsim",
        "simacc",
        "accgreedy",
        "acc",
        "rand",
        "none",
    }
    assert needs("sim") == needs("simacc") == {"rollouts", "gradients"}
    assert needs("acc") == needs("accgreedy") == {"rollouts"}
    assert needs("rand") == needs("none") == set()


def test_an_empty_selection_trains_on_the_whole_chunk_in_the_loop_and_the_callback():
    """zero_variance=exclude with every group zero-variance leaves nothing: select_chunk, the
    one path of the loop and the TRL callback, falls back to the chunk in chunk order."""
    from gradalign.config import SelectConfig
    from gradalign.engine.round_scoring import RoundScores, select_chunk

    ids = np.array([7, 3, 5, 1])
    cand = Candidates(
        ids, np.array([0.0, 1.0, 1.0, 0.0]), np.ones(4, dtype=bool),
        np.zeros(4), np.zeros(4), np.zeros(4), val_norm=1.0,
    )  # fmt: skip
    s = SelectConfig(mode="sim", chunk_size=4, k=2, zero_variance="exclude")
    with pytest.warns(SelectionWarning, match="left none of the 4 candidates"):
        sel = select_chunk(RoundScores(cand, [], {}), s, 0, 0, np.arange(10))
    assert sel.ids.tolist() == [7, 3, 5, 1]
    assert sel.fallback == "empty_selection" and sel.excluded == 4
