"""grpo: advantages, packing, token log-probs and the scoring loss (docs/method.md)."""

from __future__ import annotations

import math

import torch

from gradalign.core.grpo import (
    SequenceBatch,
    group_advantages,
    group_losses,
    pack_sequences,
    scoring_loss,
    token_logprobs,
    zero_variance_groups,
)


def close(actual, expected, rtol=1e-6, atol=0.0):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


# ---------------------------------------------------------------- advantages


def test_advantages_are_group_centred_not_scaled_by_default():
    rewards = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]]).reshape(-1)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, group, 2)
    close(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    assert adv[4:].eq(0).all()  # exactly zero: this group has no gradient


def test_scaled_advantages_divide_by_unbiased_std_plus_1e4():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, group, 2, scale=True)
    # group 0: A = ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3; group 1: A = 0 / (0 + 1e-4) = 0
    s = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(adv, [s, -s, -s, s, 0, 0, 0, 0])


def test_advantages_with_unequal_interleaved_groups():
    rewards = torch.tensor([1.0, 0, 1, 0, 1])
    group = torch.tensor([0, 1, 1, 0, 1])  # group 0: rows 0, 3 (size 2); group 1: rows 1, 2, 4
    close(group_advantages(rewards, group, 2), [0.5, -2 / 3, 1 / 3, -0.5, 1 / 3])
    # scaled: group 0 var = (0.25 + 0.25) / 1; group 1 var = (4/9 + 1/9 + 1/9) / 2 = 1/3
    s0, s1 = math.sqrt(0.5) + 1e-4, math.sqrt(1 / 3) + 1e-4
    close(
        group_advantages(rewards, group, 2, scale=True),
        [0.5 / s0, -2 / 3 / s1, 1 / 3 / s1, -0.5 / s0, 1 / 3 / s1],
    )


def test_zero_variance_groups():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0.5, 0.5, 0.0, 0.25])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    assert zero_variance_groups(rewards, group, 4).tolist() == [False, True, True, False]


# ---------------------------------------------------------------- packing


def test_pack_sequences_right_pads_and_masks_completion_predictions():
    eos, pad = 1, 0
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[12, eos], [13, 14, 15, eos]]
    input_ids, attention_mask, completion_mask = pack_sequences(prompts, completions, pad)
    assert input_ids.tolist() == [[5, 6, 7, 12, eos, pad], [8, 9, 13, 14, 15, eos]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # position t predicts token t+1: row 0 predicts 12 at t=2 and EOS at t=3
    assert completion_mask.dtype == torch.bool
    assert completion_mask.tolist() == [
        [False, False, True, True, False],
        [False, True, True, True, True],
    ]
    predicted = input_ids[:, 1:]
    assert predicted[0][completion_mask[0]].tolist() == [12, eos]
    assert predicted[1][completion_mask[1]].tolist() == [13, 14, 15, eos]


def test_sequence_batch_select_trims_common_padding_and_renumbers():
    prompts = [[5, 6], [7], [8, 9, 10]]
    completions = [[11, 1], [12, 1], [13, 14, 15, 16, 1]]
    ids, att, cm = pack_sequences(prompts, completions, 0)
    batch = SequenceBatch(ids, att, cm, torch.tensor([1.0, 2, 3]), torch.tensor([0, 1, 2]), 3)
    sub = batch.select(torch.tensor([0, 1]), 1, torch.tensor([0, 0]))
    assert sub.input_ids.tolist() == [[5, 6, 11, 1], [7, 12, 1, 0]]
    assert sub.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert sub.completion_mask.tolist() == [[False, True, True], [True, True, False]]
    assert sub.advantages.tolist() == [1.0, 2.0]
    assert sub.group.tolist() == [0, 0] and sub.num_groups == 1


# ---------------------------------------------------------------- log-probs


def test_token_logprobs_is_the_shifted_log_softmax_gather(tiny_model):
    ids, att, _ = pack_sequences([[5, 6, 7], [8]], [[12, 1], [13, 14, 1]], 0)
    with torch.no_grad():
        lp = token_logprobs(tiny_model, ids, att)
    assert lp.shape == (2, ids.shape[1] - 1)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, attention_mask=att).logits
        for i in range(2):
            for t in range(ids.shape[1] - 1):
                expected = torch.log_softmax(logits[i, t].double(), -1)[ids[i, t + 1]]
                close(lp[i, t], expected, rtol=1e-6, atol=1e-6)


def test_right_padding_does_not_change_real_token_logprobs(tiny_model):
    prompts, completions = [[5, 6, 7], [8, 9], [10]], [[12, 1], [13, 14, 15, 16, 1], [17, 1]]
    ids, att, _ = pack_sequences(prompts, completions, 0)
    with torch.no_grad():
        padded = token_logprobs(tiny_model, ids, att)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            alone = torch.tensor([p + c])
            unpadded = token_logprobs(tiny_model, alone, torch.ones_like(alone))[0]
            n = len(p) + len(c) - 1
            # float32 forward with a different batch shape: agreement to ~1e-7 absolute
            close(padded[i, :n], unpadded, rtol=1e-6, atol=2e-6)


# ---------------------------------------------------------------- losses


def test_group_losses_on_a_hand_made_logprob_table():
    # rows of groups 0, 1, 0, 1, 0; T = 4 next-token positions; -9 marks values masked out
    logprobs = torch.tensor(
        [
            [-9.0, -2.0, -3.0, -9.0],  # g0, mask 0110: sum -5
            [-1.0, -1.0, -1.0, -1.0],  # g1, mask 1111: sum -4
            [-9.0, -1.0, -1.0, -1.0],  # g0, mask 0111: sum -3
            [-9.0, -9.0, -2.0, -6.0],  # g1, mask 0011: sum -8
            [-2.0, -9.0, -9.0, -9.0],  # g0, mask 1000: sum -2
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [
            [0, 1, 1, 0],
            [1, 1, 1, 1],
            [0, 1, 1, 1],
            [0, 0, 1, 1],
            [1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    adv = torch.tensor([0.5, 0.25, -1.0, -0.25, 0.5], dtype=torch.float64)
    group = torch.tensor([0, 1, 0, 1, 0])
    losses = group_losses(logprobs, mask, adv, group, 2)
    # L_0 = -(0.5*-5 + -1*-3 + 0.5*-2) / (2+3+1) = -(-0.5)/6;  L_1 = -(0.25*-4 + -0.25*-8) / 6
    close(losses, [1 / 12, -1 / 6], rtol=1e-12)


def test_scoring_loss_is_the_sum_of_group_losses(tiny_model):
    ids, att, cm = pack_sequences(
        [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]], [[10, 1], [11, 12, 1], [13, 1], [14, 15, 16, 1]], 0
    )
    adv, group = torch.tensor([0.5, -0.5, -1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    batch = SequenceBatch(ids, att, cm, adv, group, 2)
    with torch.no_grad():
        loss = scoring_loss(tiny_model, batch)
        lp = token_logprobs(tiny_model, ids, att).double()
    seq = (lp * cm).sum(1)
    expected = -(0.5 * seq[0] - 0.5 * seq[1]) / 5 - (-1.0 * seq[2] + seq[3]) / 6
    close(loss, expected, rtol=1e-6)
