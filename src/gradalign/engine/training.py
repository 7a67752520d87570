"""GRPO training steps through TRL's `GRPOTrainer`, one trainer kept alive across rounds.

Each round assigns the selected problems as the trainer's dataset and calls `train()` for
`steps_per_round` steps. The optimizer and LR scheduler are created once here and handed
to the trainer, which keeps them across `train()` calls (transformers creates its own only
when none is given), so Adam's moments and step count carry over from round to round.
Only public TRL/transformers API is used: `GRPOTrainer(optimizers=...)`, `train_dataset`,
`train()`, `TrainerCallback`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradalign.config import TrainConfig
from gradalign.data.problems import Problem
from gradalign.data.rewards import check_failures, checked_reward, warn_once
from gradalign.engine.policy import format_prompt, plain_prompt, quiet_libraries
from gradalign.engine.trl_args import (
    build_grpo_config,
    grpo_settings,
    optimizer_settings,
    schedule_settings,
)


class TrainingDiverged(RuntimeError):
    """GRPO steps left non-finite weights (or logits): the round's update is unusable, and
    the run stops before anything of the round is saved."""

    def __init__(self, step: int, steps: int, learning_rate: float, reason: str) -> None:
        super().__init__(
            f"GRPO training diverged at step {step} of {steps} with "
            f"train.learning_rate={learning_rate:g}: {reason}"
        )
        self.step, self.steps, self.learning_rate, self.reason = step, steps, learning_rate, reason

    def at(self, round_: int, kept: str | None) -> TrainingDiverged:
        """The same error, its message naming the round (0-based `round_`) and `kept`, the
        checkpoint that still holds the last finite weights (None: none written yet)."""
        err = TrainingDiverged(self.step, self.steps, self.learning_rate, self.reason)
        last = (
            f"{kept} (after round {round_}) keeps the last finite weights"
            if kept
            else "no checkpoint was written yet"
        )
        err.args = (
            f"round {round_ + 1}: {self}; the update is not saved, and {last}; lower "
            "train.learning_rate (or train.max_grad_norm) and start again with --restart",
        )
        return err


_NONFINITE_ERROR = re.compile(r"\b(nan|inf|overflow)\b", re.IGNORECASE)  # multinomial, Adam


def nonfinite(model: torch.nn.Module, probe: list[int]) -> str | None:
    """Why `model` can no longer be trained or sampled, or None: a trainable parameter with
    NaN / Inf, or NaN / Inf logits on the token ids `probe` (weights so large that a forward
    pass overflows). The forward runs in eval mode and draws no random numbers."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            return f"parameter {name!r} holds NaN or Inf"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor([probe], device=device)).logits
    finally:
        model.train(was_training)
    return None if bool(torch.isfinite(logits).all()) else "the logits hold NaN or Inf"


def _completion_text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def step_callback(training: GRPOTraining) -> Any:
    """The TrainerCallback that hands TRL's step ends and log entries to `training`."""
    with quiet_libraries():
        from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            training.step_end(control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            training.logged(state.global_step, logs)

    return StepCallback()


class GRPOTraining:
    """A long-lived TRL GRPO trainer whose training pool is swapped every round."""

    def __init__(
        self,
        model,
        tokenizer,
        cfg: TrainConfig,
        max_completion_length: int,
        seed: int,
        device: str = "cpu",
        total_steps: int = 1,
    ) -> None:
        """`total_steps`: the GRPO steps of the whole run, over which a learning-rate
        schedule from train.trl_args runs (the default schedule is constant)."""
        from datasets import Dataset

        with quiet_libraries():
            from transformers import get_scheduler
            from transformers.trainer_callback import PrinterCallback, ProgressCallback
            from trl import GRPOTrainer

        self._dataset_cls = Dataset
        self.by_id: dict[int, Problem] = {}
        self._calls = itertools.count()
        self._round_seed = 0
        self.on_step: Callable[[], None] | None = None
        self.on_log: Callable[[int, dict[str, float]], None] | None = None  # (step, TRL logs)
        self.model, self.tokenizer = model, tokenizer
        self._probe: list[int] = []  # token ids of a prompt of the round, for `nonfinite`
        self._steps_done = 0
        self.diverged: tuple[int, str] | None = None  # (step, reason) once weights blow up
        self.learning_rate = cfg.learning_rate  # named when training diverges
        self._outdir = tempfile.TemporaryDirectory(prefix="gradalign-trl-")
        bf16 = device != "cpu" and next(model.parameters()).dtype == torch.bfloat16
        own = grpo_settings(cfg, max_completion_length, seed, device, bf16, self._outdir.name)
        args = build_grpo_config(cfg, own)
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], **optimizer_settings(cfg)
        )
        name, warmup = schedule_settings(cfg, args, total_steps)
        self.scheduler = get_scheduler(name, self.optimizer, warmup, total_steps)

        with quiet_libraries():
            self.trainer = GRPOTrainer(
                model=model,
                processing_class=tokenizer,
                reward_funcs=[self.reward],
                args=args,
                train_dataset=self._dataset([]),
                optimizers=(self.optimizer, self.scheduler),
                callbacks=[step_callback(self)],
            )
        self.trainer.remove_callback(PrinterCallback)
        self.trainer.remove_callback(ProgressCallback)

    def reward(self, completions: list[Any], problem_id: list[int], **_: Any) -> list[float | None]:
        """TRL's reward function: each completion scored by its problem's reward, salted by
        the round and the call (so a resumed round draws the same coin flips). A failure
        scores 0, warned once per function (`rewards.checked_reward`); a function failing on
        all its completions stops the run (`rewards.check_failures`)."""
        call = next(self._calls)
        problems = [self.by_id[pid] for pid in problem_id]
        checked = [
            checked_reward(p, _completion_text(c), salt=f"train:{self._round_seed}:{call}:{i}")
            for i, (c, p) in enumerate(zip(completions, problems))
        ]
        check_failures(problems, [e for _, e in checked], "GRPO step's completions")
        for p, (_score, error) in zip(problems, checked):
            warn_once(p, error)
        return [r for r, _ in checked]

    def step_end(self, control: Any) -> None:
        """After each optimizer step: stop before sampling with non-finite weights, else
        `on_step`."""
        self._steps_done += 1
        reason = nonfinite(self.model, self._probe)
        if reason is not None:  # stop before sampling with these weights
            self.diverged = (self._steps_done, reason)
            control.should_training_stop = True
            return
        if self.on_step is not None:
            self.on_step()

    def logged(self, step: int, logs: dict[str, float] | None) -> None:
        """TRL's log entry of `step`, to `on_log`."""
        if self.on_log is not None and logs:
            self.on_log(step, dict(logs))

    def _dataset(self, problems: list[Problem]):
        plain = getattr(self.tokenizer, "chat_template", None) is None  # `format_prompt`
        rows = [
            {"prompt": plain_prompt(p.chat) if plain else p.chat, "problem_id": p.id}
            for p in problems
        ] or [{"prompt": [{"role": "user", "content": "x"}], "problem_id": -1}]
        return self._dataset_cls.from_list(rows)

    def train_round(self, problems: list[Problem], steps: int, round_seed: int) -> dict[str, float]:
        """`steps` GRPO optimizer steps on `problems`; returns the round's training metrics."""
        if not problems or steps == 0:
            return {"train/steps": 0}
        self.by_id = {p.id: p for p in problems}
        self._calls = itertools.count()  # reward salts depend on the round only (resumable)
        self._round_seed = round_seed
        self.trainer.train_dataset = self._dataset(problems)
        self._probe = format_prompt(self.tokenizer, problems[0].chat)
        self._steps_done, self.diverged = 0, None
        self.trainer.args.max_steps = steps
        self.trainer.args.seed = round_seed  # sampler order of this round
        # TRL samples completions from the global generators: each round starts from its seed,
        # so a resumed run trains exactly as an uninterrupted one
        torch.manual_seed(round_seed)
        random.seed(round_seed)
        np.random.seed(round_seed % 2**32)
        try:
            with quiet_libraries():
                self.trainer.train()
        except RuntimeError as err:  # sampling from NaN weights, if a step got that far
            if not _NONFINITE_ERROR.search(str(err)):
                raise
            reason = nonfinite(self.model, self._probe) or f"{type(err).__name__}: {err}"
            self.diverged = (self._steps_done + 1, " ".join(reason.split())[:200])
        if self.diverged is not None:
            step, reason = self.diverged
            raise TrainingDiverged(step, steps, self.learning_rate, reason)
        logs = [h for h in self.trainer.state.log_history if "reward" in h]
        return {
            "train/steps": len(logs),
            "train/reward_mean": float(np.mean([h["reward"] for h in logs])),
            "train/loss": float(np.mean([h["loss"] for h in logs])),
            "train/zero_std_frac": float(
                np.mean([h.get("frac_reward_zero_std", math.nan) for h in logs])
            ),
            "train/completion_length": float(
                np.mean([h.get("completions/mean_length", math.nan) for h in logs])
            ),
        }

    def close(self) -> None:
        self._outdir.cleanup()
