"""GradAlign inside your own TRL ``GRPOTrainer``: a callback and the sampler it installs.

Add GradAlign data selection to an existing TRL GRPO script with a few lines::

    from gradalign.config import RolloutConfig, SelectConfig
    from gradalign.integrations.trl_callback import GradAlignCallback

    cb = GradAlignCallback(validation=val_ds, reward_funcs=[my_reward],
                           select=SelectConfig(mode="sim", chunk_size=64, k=4),
                           steps_per_round=4, seed=0)
    trainer = GRPOTrainer(model, reward_funcs=[my_reward], args=args, train_dataset=ds,
                          callbacks=[cb])
    cb.attach(trainer)  # installs the sampler; required (see `GradAlignCallback.attach`)
    trainer.train()
    cb.history          # one dict per round: chunk, scores, selected rows

Both datasets use TRL's row format: ``prompt`` (a string, or a conversational list of
messages) plus any extra columns, which the reward functions receive as keyword arguments.

What happens each round (every ``steps_per_round`` optimizer steps), with the current policy:
the round scoring of `gradalign run` (`gradalign.engine.round_scoring`, the same code, metric
names and seed streams), on the train dataset's rows:

1. the next chunk of ``select.chunk_size`` rows of the train dataset (`ChunkSchedule`: seeded
   shuffles of the dataset, chunks cycle through it);
2. ``rollout.k_r`` rollouts per chunk row and, for the gradient modes, ``rollout.k_v`` per
   validation row (`gradalign.engine.rollout.generate` from TRL's prompt tokens), rewarded by
   the TRL reward functions (`trl_rewards`);
3. `round_scoring.ChunkScorer` scores the rows and `round_scoring.select_chunk` picks
   n = ``select.chunk_size // select.k`` of them; mode ``none`` selects the whole train
   dataset, as `gradalign run` trains on the whole pool (plain GRPO, no rollouts);
4. the round's ``steps_per_round`` steps train on those rows only, in TRL's batch layout
   (`RoundSampler`). A record of the round is appended to ``history`` and its metrics are
   added to the trainer's training logs (``gradalign/*`` keys).

Requires a single process (one device), ``dataloader_num_workers=0``, a map-style
``train_dataset`` and callable reward functions (no reward models, no tools).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from gradalign.config import (
    RolloutConfig,
    SelectConfig,
    check_budget,
    check_rollout,
    check_select,
)
from gradalign.core import selection
from gradalign.data.problems import ChunkSchedule, Problem
from gradalign.engine.rollout import Rollouts, generate
from gradalign.engine.round_scoring import (
    ChunkScorer,
    RoundScores,
    sampling_config,
    select_chunk,
    selection_metrics,
    timed,
)
from gradalign.integrations.round_sampler import RoundSampler
from gradalign.integrations.trl_rows import RewardFunc, Row, trl_prompt_ids, trl_rewards
from gradalign.integrations.trl_version import check_trl


class GradAlignCallback(TrainerCallback):
    """GradAlign data selection for a user-built TRL `GRPOTrainer` (see the module docstring).

    Args:
        validation: trusted validation rows (TRL format, e.g. a `datasets.Dataset`); their
            gradient is the reference direction; never trained on.
        reward_funcs: TRL-style reward functions used to reward the callback's rollouts;
            default: the trainer's own (rewards for selection should be the training rewards).
        select: the `gradalign.config.SelectConfig` of `gradalign run`: ``mode`` (sim, dot,
            norm, align, negsim, simacc, accgreedy, acc, rand, none), ``chunk_size`` (train rows
            scored per round, at most the train dataset's size), ``k`` (n = chunk_size // k rows
            trained on per round) and the scoring options; checked as the config checks it.
            Mode ``none`` scores nothing and trains every round on the whole train dataset.
        rollout: the `gradalign.config.RolloutConfig`: ``k_r``, ``k_v`` (rollouts per chunk row
            and per validation row, >= 2) and the sampling; ``backend`` must be "hf". Default:
            ``k_r = k_v = 8`` at the trainer's ``temperature``, ``top_p`` and
            ``max_completion_length``.
        steps_per_round: optimizer steps per round.
        seed: seeds the chunk shuffles, rollouts, sampled modes and the in-round order.
        reward_weights: per reward function; default: 1 each, or with the trainer's reward
            functions, the trainer's ``args.reward_weights``.

    ``history`` holds one dict per round: ``round`` (from 1, as `gradalign run` numbers
    rounds), ``scored_at_step`` (trainer step when it
    was scored), ``chunk`` and ``selected`` (train-dataset row indices; selected in rank
    order), ``scores`` and ``pass_rate`` (per chunk row), ``metrics`` (the names of
    `gradalign.engine.round_scoring`), ``features`` (with ``select.project_dim``) and
    ``seconds``.
    """

    def __init__(
        self,
        validation: Sequence[Row],
        reward_funcs: Sequence[RewardFunc] | None = None,
        *,
        select: SelectConfig | None = None,
        rollout: RolloutConfig | None = None,
        steps_per_round: int = 4,
        seed: int = 0,
        reward_weights: Sequence[float] | None = None,
    ) -> None:
        self.select = select if select is not None else SelectConfig()
        check_select(self.select)
        if rollout is not None:
            check_rollout(rollout)
            check_budget(self.select, rollout)
            if rollout.backend != "hf":
                raise ValueError(
                    f"rollout.backend: {rollout.backend!r}, but GradAlignCallback samples with "
                    "HF generate; use 'hf'"
                )
        self.rollout = rollout
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}")
        self.validation = [dict(row) for row in validation]
        if not self.validation and "gradients" in selection.needs(self.select.mode):
            raise ValueError(f"mode '{self.select.mode}' needs a non-empty validation set")
        self.reward_funcs = list(reward_funcs) if reward_funcs is not None else None
        self.reward_weights = list(reward_weights) if reward_weights is not None else None
        self.steps_per_round, self.seed = steps_per_round, seed
        self.history: list[dict[str, Any]] = []
        self.trainer: Any = None
        self._schedule: ChunkSchedule | None = None
        self._first_round, self._first_step = 0, 0

    # ------------------------------------------------------------------ wiring into TRL
    def attach(self, trainer: Any) -> GradAlignCallback:
        """Install the round sampler in `trainer` (and add this callback if it isn't there).

        Why a callback alone cannot: `Trainer.train` builds the train dataloader, with its
        sampler, before the first callback event (``on_train_begin``), and a torch
        `DataLoader` refuses a new sampler once built. The only place TRL 1.16 takes a
        sampler from is the private ``GRPOTrainer._get_train_sampler`` (TRL's own override
        point, returning its `RepeatSampler`); `attach` sets it on this trainer instance and
        nothing else private is touched. `trl_version.check_trl` checks that the hook is there
        and warns outside the TRL versions the tests cover.

        Prefetch, and why rounds are chosen lazily: accelerate's `DataLoaderShard` reads one
        batch ahead, and `Trainer` collects all ``gradient_accumulation_steps`` batches of an
        optimizer step before running it (``on_step_begin`` fires after that). So the first
        batch of round r+1 is read at the start of round r's last step; a pool changed in
        ``on_step_end`` / ``on_step_begin`` would be seen one step late. `RoundSampler`
        instead asks this callback for round r+1's rows at the moment that batch is read:
        every index of a round comes from that round's selection, and the policy that scores
        round r+1 has taken ``steps_per_round - 1`` of round r's steps, not all of them
        (``history[r]["scored_at_step"]``, 0-based r). DataLoader workers would read further
        ahead, hence ``dataloader_num_workers=0``.
        """
        check_trl(trainer)  # the private hook below: present, and a tested TRL version
        args, dataset = trainer.args, trainer.train_dataset
        if trainer.accelerator.num_processes != 1:
            raise ValueError("GradAlignCallback supports one process (one device) only")
        if args.dataloader_num_workers != 0:
            raise ValueError("GradAlignCallback needs dataloader_num_workers=0 (see attach)")
        if getattr(trainer, "tools", None):
            raise ValueError("GradAlignCallback's rollouts do not run tools")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("GradAlignCallback needs a map-style train_dataset")
        if len(dataset) < self.select.chunk_size:
            raise ValueError(
                f"select.chunk_size {self.select.chunk_size} > train_dataset size {len(dataset)}"
            )
        if self.rollout is None:  # the trainer's sampling
            self.rollout = RolloutConfig(
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_completion_length,
            )
            check_rollout(self.rollout)
            check_budget(self.select, self.rollout)
        if self.reward_funcs is None:  # the trainer's rewards, with the trainer's weights
            self.reward_funcs = list(trainer.reward_funcs)
            self.reward_weights = self.reward_weights or args.reward_weights
        funcs = self.reward_funcs
        if any(isinstance(f, torch.nn.Module) or not callable(f) for f in funcs):
            raise ValueError("GradAlignCallback needs callable reward functions (no reward models)")
        self.reward_weights = list(self.reward_weights or [1.0] * len(funcs))
        if len(self.reward_weights) != len(funcs):
            raise ValueError(
                f"{len(self.reward_weights)} reward_weights for {len(funcs)} functions"
            )
        self._schedule = ChunkSchedule(len(dataset), self.select.chunk_size, self.seed)
        self.trainer = trainer
        trainer._get_train_sampler = self.make_sampler  # the one private hook (see above)
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)  # first, so loggers after it see the gradalign/* keys
        return self

    def make_sampler(self, dataset: Any = None) -> RoundSampler:
        """The train sampler (TRL's ``_get_train_sampler`` signature)."""
        args = self.trainer.args
        g = args.num_generations
        repeat = args.num_iterations * args.steps_per_generation
        micro_batches = self.steps_per_round * args.gradient_accumulation_steps
        if micro_batches % repeat:
            raise ValueError(
                f"steps_per_round ({self.steps_per_round}) x gradient_accumulation_steps "
                f"({args.gradient_accumulation_steps}) must be a multiple of num_iterations "
                f"({args.num_iterations}) x steps_per_generation ({args.steps_per_generation}), "
                "so that no generation batch spans two rounds"
            )
        assert self._schedule is not None
        if args.max_steps > 0:
            rounds = math.ceil(args.max_steps / self.steps_per_round)
        else:  # epochs: one pass over the dataset's chunks per epoch
            rounds = self._schedule.chunks_per_pass
        self._first_round = len(self.history)
        return RoundSampler(
            self.select_round,
            g,
            args.generation_batch_size // g,
            repeat,
            micro_batches // repeat,
            rounds,
            self.seed,
            first_round=self._first_round,
        )

    # ------------------------------------------------------------------ one round
    def select_round(self, r: int) -> list[int]:
        """Score round r's chunk under the current policy; the selected row indices."""
        if self.trainer is None or self._schedule is None:
            raise RuntimeError("call GradAlignCallback.attach(trainer) first")
        t0 = time.perf_counter()
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        positions = self._schedule.chunk(r)
        rows = [trainer.train_dataset[int(i)] for i in positions]
        timings: dict[str, float] = {}
        was_training = model.training
        try:
            scored = self._score(model, rows, positions.astype(int), r, timings)
        finally:
            model.train(was_training)
        with timed(timings, "time/selection_s"):
            pool = np.arange(len(trainer.train_dataset))
            sel = select_chunk(scored, self.select, self.seed, r, pool)
        chosen = [int(i) for i in sel.ids]
        metrics = scored.metrics | selection_metrics(chosen, scored.candidates, sel) | timings
        pass_rate = scored.candidates.pass_rate
        record = {
            "round": r + 1,  # from 1, as everywhere (rounds/0001/, the console's round 1/N)
            "scored_at_step": trainer.state.global_step,
            "chunk": positions.tolist(),
            "selected": chosen,
            "scores": sel.scores.tolist(),
            "pass_rate": None if pass_rate is None else pass_rate.tolist(),
            "metrics": metrics,
        }
        if scored.features is not None:
            record["features"] = scored.features
        self.history.append(record | {"seconds": time.perf_counter() - t0})
        return chosen

    def _score(
        self, model: Any, rows: list[Row], ids: np.ndarray, r: int, timings: dict[str, float]
    ) -> RoundScores:
        assert self.rollout is not None
        scorer = ChunkScorer(  # the trainer's model and optimizer of this moment
            model, self.trainer.processing_class, self.validation, self.rollout, self.select,
            self.seed, functools.partial(self._rollouts, model),
            optimizer=getattr(self.trainer, "optimizer", None),
        )  # fmt: skip
        return scorer.score(rows, ids, r, timings)

    def _rollouts(
        self, model: Any, rows: Sequence[Row], group_size: int, seed: int, what: str
    ) -> Rollouts:
        """`group_size` rollouts per row with `rollout.generate` from TRL's prompt tokens,
        rewarded by the TRL reward functions."""
        trainer = self.trainer
        prompt_ids = trl_prompt_ids(trainer, [row["prompt"] for row in rows])
        problems = [Problem(j, f"{what}/{j}", "", "trl") for j in range(len(rows))]
        assert self.rollout is not None
        sampling = sampling_config(self.rollout)
        ro = generate(
            model,
            trainer.processing_class,
            problems,
            group_size,
            sampling,
            seed,
            prompt_ids=prompt_ids,
        )
        assert self.reward_funcs is not None and self.reward_weights is not None
        rewards = trl_rewards(self.reward_funcs, self.reward_weights, rows, ro, trainer.state)
        return replace(ro, rewards=rewards)

    # ------------------------------------------------------------------ callback events
    def round_of_step(self, step: int) -> int:
        """The round that optimizer step `step` (0-based, this `train()` call) trains, as an
        index from 0 (``history[i]``, whose ``round`` is i + 1)."""
        return self._first_round + (step - self._first_step) // self.steps_per_round

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "GradAlignCallback: call cb.attach(trainer) before trainer.train(), "
                "else TRL trains on the whole dataset"
            )
        self._first_step = state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Add the current round's summary (``gradalign/*``) to training log entries."""
        if not logs or "loss" not in logs or state.global_step == 0:
            return
        number = self.round_of_step(state.global_step - 1) + 1  # rounds count from 1
        row = next((h for h in reversed(self.history) if h["round"] == number), None)
        if row is None:
            return
        extra = {"gradalign/round": number}
        extra |= {f"gradalign/{k}": v for k, v in row["metrics"].items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
