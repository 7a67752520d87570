"""alignment: exact group gradients, validation direction and alignment stats (docs/method.md).

Gradients are float32 on the model and differ from an independently batched computation
by float32 round-off only (~3e-7 of the norm), so vectors are compared by relative error of
the norm, `||a - b|| <= rel * ||b||`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradalign.core.alignment import (
    EPS,
    exact_alignment,
    flat_grad,
    iter_group_gradients,
    summed_gradient,
    validation_direction,
)
from gradalign.core.grpo import SequenceBatch, group_advantages, pack_sequences, scoring_loss
from gradalign.core.selection import Candidates, select
from gradalign.engine.policy import scored_parameters

EOS = 1
# three groups of unequal sizes and lengths; group 1 has equal rewards (zero variance)
PROMPTS = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [10, 11, 12, 13], [10, 11, 12, 13]]
COMPLETIONS = [
    [20, 21, EOS],
    [22, EOS],
    [23, 24, 25, 26, EOS],  # group 0
    [27, EOS],
    [28, 29, EOS],  # group 1
    [30, 31, 32, EOS],
    [33, EOS],  # group 2
]
GROUP = [0, 0, 0, 1, 1, 2, 2]
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
VAL_PROMPTS = [[40, 41], [40, 41], [42, 43, 44], [42, 43, 44]]
VAL_COMPLETIONS = [[45, 46, EOS], [47, EOS], [48, EOS], [49, 50, 51, EOS]]
VAL_GROUP, VAL_REWARDS = [0, 0, 1, 1], [1.0, 0.0, 0.0, 1.0]


def make_batch(prompts, completions, group, rewards) -> SequenceBatch:
    ids, att, cm = pack_sequences(prompts, completions, pad_id=0)
    g = torch.tensor(group)
    num_groups = max(group) + 1
    adv = group_advantages(torch.tensor(rewards), g, num_groups)
    return SequenceBatch(ids, att, cm, adv, g, num_groups)


def assert_vec_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-6):
    err = float((actual - expected).norm())
    assert err <= rel * float(expected.norm()), f"relative error {err / float(expected.norm())}"


def hand_group_gradient(model, params, rows: list[int]) -> torch.Tensor:
    """g_p = grad of -(1/T_p) sum_i A_i sum_t log pi(y_it | x, y_<t), one unpadded forward
    per sequence, written independently of `grpo`."""
    rewards = torch.tensor([REWARDS[i] for i in rows], dtype=torch.float64)
    adv = rewards - rewards.mean()
    total, tokens = 0.0, 0
    for a, i in zip(adv, rows):
        x = torch.tensor([PROMPTS[i] + COMPLETIONS[i]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], dim=-1)
        start = len(PROMPTS[i]) - 1  # position predicting the first completion token
        picked = logp[start:].gather(1, x[0, start + 1 :, None])  # completion incl. EOS
        total = total + float(a) * picked.sum()
        tokens += len(COMPLETIONS[i])
    loss = -total / tokens
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


@pytest.fixture(scope="module")
def cand_batch():
    return make_batch(PROMPTS, COMPLETIONS, GROUP, REWARDS)


@pytest.fixture(scope="module")
def params(tiny_model):
    return scored_parameters(tiny_model)


@pytest.fixture(scope="module")
def group_grads(tiny_model, params, cand_batch):
    return list(iter_group_gradients(tiny_model, params, cand_batch))


def test_group_gradient_equals_autograd_of_hand_written_loss(tiny_model, params, group_grads):
    assert len(group_grads) == 3
    for p, rows in [(0, [0, 1, 2]), (2, [5, 6])]:
        expected = hand_group_gradient(tiny_model, params, rows)
        assert group_grads[p].dtype == torch.float64
        assert group_grads[p].shape == (sum(q.numel() for q in params),)
        assert float(expected.norm()) > 1e-2  # a real gradient, not a trivial match
        assert_vec_close(group_grads[p], expected)


def test_zero_variance_group_has_exactly_zero_gradient(tiny_model, params, cand_batch, group_grads):
    assert torch.equal(group_grads[1], torch.zeros_like(group_grads[1]))
    # also without the shortcut: the loss of a group with A = 0 has an exactly zero gradient
    sub = cand_batch.select(torch.tensor([3, 4]), 1, torch.tensor([0, 0]))
    g = flat_grad(scoring_loss(tiny_model, sub), params)
    assert torch.equal(g, torch.zeros_like(g))


def test_summed_gradient_is_the_sum_of_group_gradients(tiny_model, params, cand_batch, group_grads):
    expected = group_grads[0] + group_grads[1] + group_grads[2]
    for per_micro in (1, 2, 8):  # micro-batch boundaries must not matter
        assert_vec_close(summed_gradient(tiny_model, params, cand_batch, per_micro), expected)


def test_validation_direction_sum_and_mean_of_unit(tiny_model, params):
    val = make_batch(VAL_PROMPTS, VAL_COMPLETIONS, VAL_GROUP, VAL_REWARDS)
    g0, g1 = iter_group_gradients(tiny_model, params, val)
    total = g0 + g1
    expected_sum = total / (total.norm() + 1e-5)
    unit_sum = g0 / (g0.norm() + 1e-5) + g1 / (g1.norm() + 1e-5)
    expected_mou = unit_sum / (unit_sum.norm() + 1e-5)
    assert float((expected_sum - expected_mou).norm()) > 1e-2  # the two options differ here
    assert_vec_close(validation_direction(tiny_model, params, val, "sum"), expected_sum)
    assert_vec_close(validation_direction(tiny_model, params, val, "mean_of_unit"), expected_mou)


def test_exact_alignment_stats_match_flat_gradients(tiny_model, params, cand_batch, group_grads):
    direction = torch.randn(
        group_grads[0].shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    direction = direction / direction.norm()
    ticks = []
    al = exact_alignment(tiny_model, params, cand_batch, direction, progress=ticks.append)
    assert ticks == [1, 1, 1]
    chunk = sum(group_grads)
    chunk_dir = chunk / (chunk.norm() + EPS)
    norms = np.array([float(g.norm()) for g in group_grads])
    dot_val = np.array([float(g @ direction) for g in group_grads])
    dot_chunk = np.array([float(g @ chunk_dir) for g in group_grads])
    # each entry is <g_p, v> with |v| <= 1: round-off is relative to ||g_p||
    np.testing.assert_allclose(al.norm, norms, rtol=2e-6)
    np.testing.assert_allclose(al.dot_val, dot_val, rtol=0, atol=2e-6 * norms.max())
    np.testing.assert_allclose(al.dot_chunk, dot_chunk, rtol=0, atol=2e-6 * norms.max())
    np.testing.assert_allclose(al.cos_val, dot_val / (norms + 1e-5), rtol=0, atol=2e-6)
    np.testing.assert_allclose(al.cos_chunk, dot_chunk / (norms + 1e-5), rtol=0, atol=2e-6)
    # <g_0, g_0 + g_2> = ||g_0||^2 + <g_0, g_2> > 0 here: both project onto their own sum
    assert al.dot_chunk[0] > 0 and al.dot_chunk[2] > 0


def test_zero_variance_group_scores_zero_in_gradient_modes(tiny_model, params, cand_batch):
    direction = validation_direction(
        tiny_model, params, make_batch(VAL_PROMPTS, VAL_COMPLETIONS, VAL_GROUP, VAL_REWARDS)
    )
    al = exact_alignment(tiny_model, params, cand_batch, direction)
    assert al.norm[1] == 0.0 and al.dot_val[1] == 0.0 and al.dot_chunk[1] == 0.0
    # flags left off: the 0.0 comes from g_p = 0 itself, not from the zero_variance guard
    c = Candidates(
        np.array([10, 11, 12]),
        np.array([1 / 3, 1.0, 0.5]),
        np.zeros(3, bool),
        al.dot_val,
        al.dot_chunk,
        al.norm,
    )
    for mode in ("sim", "dot", "norm", "align"):
        assert select(mode, c, 1, np.random.default_rng(0)).scores[1] == 0.0, mode


def _names(model, chosen):
    ids = {id(p) for p in chosen}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_scored_parameters_subsets(tiny_model):
    all_names = {n for n, _ in tiny_model.named_parameters()}
    assert _names(tiny_model, scored_parameters(tiny_model, "all")) == all_names
    last1 = _names(tiny_model, scored_parameters(tiny_model, "last:1"))
    assert last1 == {n for n in all_names if n.startswith("model.layers.1.")} | {
        "model.norm.weight"
    }
    assert len(last1) == 10  # 7 projections + 2 block norms + final norm
    last2 = _names(tiny_model, scored_parameters(tiny_model, "last:2"))
    assert last2 == all_names - {"model.embed_tokens.weight"}
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        scored_parameters(tiny_model, "last:3")
    with pytest.raises(ValueError, match="lora"):
        scored_parameters(tiny_model, "lora")
    with pytest.raises(ValueError, match="'all', 'lora' or 'last:N'"):
        scored_parameters(tiny_model, "bogus")


def test_flat_grad_order_and_unused_parameters():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    unused = torch.nn.Parameter(torch.tensor([7.0]))
    loss = (a**2).sum() + (b[0] * b[1]).sum()  # d/da = 2a, d/db = [[5, 6], [3, 4]]
    g = flat_grad(loss, [a, unused, b])
    assert g.dtype == torch.float64
    assert g.tolist() == [2.0, 4.0, 0.0, 5.0, 6.0, 3.0, 4.0]
