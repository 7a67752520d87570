"""The long-lived TRL trainer: the pool is swapped each round, Adam's state carries over."""

from __future__ import annotations

import pytest

from gradalign.config import TrainConfig
from gradalign.data.problems import Problem
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.engine.training import GRPOTraining
from gradalign.engine.trl_args import micro_batching


@pytest.mark.parametrize(
    ("batch", "gens", "micro", "expected"),
    [(8, 8, 64, (64, 1)), (8, 8, 16, (16, 4)), (6, 4, 16, (12, 2)), (3, 8, 4, (8, 3))],
)
def test_micro_batching_keeps_whole_groups(batch, gens, micro, expected):
    per_device, accum = micro_batching(batch, gens, micro)
    assert (per_device, accum) == expected
    assert per_device % gens == 0 and per_device * accum == batch * gens


@pytest.mark.slow
def test_pool_swapped_each_round_and_adam_state_carries_over(monkeypatch):
    tok = build_tokenizer()
    model = build_model(tok, "tiny", seed=0)
    cfg = TrainConfig(steps_per_round=2, batch_size=2, num_generations=2, micro_batch=4)
    trainer = GRPOTraining(model, tok, cfg, max_completion_length=4, seed=0)
    seen: list[int] = []
    import gradalign.engine.training as training

    real = training.checked_reward

    def spy(problem, completion, salt=""):
        seen.append(problem.id)
        return real(problem, completion, salt)

    monkeypatch.setattr(training, "checked_reward", spy)
    rounds = [
        [Problem(i, f"{i}+1", str(i + 1), "addition") for i in (1, 2, 3)],
        [Problem(i, f"{i}+2", str(i + 2), "addition") for i in (10, 11)],
    ]
    first = next(p for p in model.parameters() if p.requires_grad)
    for r, problems in enumerate(rounds):
        seen.clear()
        metrics = trainer.train_round(problems, 2, round_seed=r)
        assert metrics["train/steps"] == 2
        assert set(seen) <= {p.id for p in problems} and seen
        assert int(trainer.optimizer.state[first]["step"]) == 2 * (r + 1)
    trainer.close()
