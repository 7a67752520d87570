"""The round loop: chunk → rollouts → group gradients → scores → selection (`round_scoring`)
→ GRPO steps → eval, with every round's artifacts written to the run directory."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradalign import ranks
from gradalign.config import Config, check
from gradalign.core.selection import SelectionWarning
from gradalign.data.problems import ChunkSchedule, Problem, Stream, round_seed
from gradalign.engine.policy import resolve_device
from gradalign.engine.rollout import Rollouts
from gradalign.engine.round_scoring import (
    ChunkScorer,
    clipped_message,
    clipped_share,
    select_chunk,
    selection_metrics,
    timed,
)
from gradalign.engine.trl_args import check_grpo_config
from gradalign.progress import bar, log
from gradalign.run import sharded_state
from gradalign.run.artifacts import (
    discard_run,
    problem_rows,
    read_stage,
    round_line,
    selection_quality,
    write_stage,
    write_summary,
)
from gradalign.run.checkpoint import (
    Checkpoint,
    ResumeError,
    RunLock,
    checkpoint_dir,
    config_differences,
    crash_point,
    from_main,
    latest_checkpoint,
    read_checkpoint,
    restore,
    round_dir,
    save_checkpoint,
)
from gradalign.run.export import save_final
from gradalign.run.setup import Setup, build_setup
from gradalign.run.tracking import Tracker, check_trackers, write_metrics_lines
from gradalign.storage import write_json, write_jsonl, write_yaml


def evaluate(setup: Setup, seed: int, sampled: bool = False) -> dict[str, float]:
    """Greedy pass@1 on the eval set, overall and per source; with `sampled`, also the mean
    reward of `rollout.eval_samples` samples per problem (mean@k)."""
    ro = setup.sample(setup.sets.eval, 1, seed, "eval", greedy=True)
    out = {"eval/accuracy": float(ro.rewards.mean()), "eval/bad_rewards": ro.bad_rewards}
    out["eval/clipped_frac"] = clipped_share(ro)  # greedy answers cut off at max_new_tokens
    out |= per_source(ro, "eval/accuracy")
    samples = setup.cfg.rollout.eval_samples
    if sampled and samples > 0:
        ro = setup.sample(setup.sets.eval, samples, seed + 1, f"eval mean@{samples}")
        out["eval/mean_at_k"] = float(ro.rewards.mean())
        out |= per_source(ro, "eval/mean_at_k")
        out["eval/bad_rewards"] += ro.bad_rewards
    return out


def per_source(ro: Rollouts, name: str) -> dict[str, float]:
    """The mean reward of each problem source's rollouts, as `name/source`."""
    sources = np.array([ro.problems[g].source for g in ro.group])
    return {f"{name}/{s}": float(ro.rewards[sources == s].mean()) for s in sorted(set(sources))}


def run(cfg: Config, setup: Setup | None = None, restart: bool = False) -> dict[str, Any]:
    """Run `cfg.rounds` rounds; returns the run summary (also written to summary.json).

    The run directory is locked for the run. A directory holding an unfinished run with the
    same config is resumed from its newest verified checkpoint (`restart` discards it).
    Under torchrun / accelerate launch, rank 0 holds the lock and writes; every rank loads
    the same checkpoint, samples and scores its share and trains through TRL's DDP."""
    check(cfg)  # again: a Config's fields may have been changed after it was built
    out = Path(cfg.out_dir)
    ranks.init_from_env(resolve_device(cfg.model.device))
    if cfg.train.fsdp:
        sharded_state.check_training(resolve_device(cfg.model.device))
    check_trackers(cfg)  # before any model loads: the trackers' packages, TRL's fields
    check_grpo_config(
        cfg.train, cfg.rollout.max_new_tokens, cfg.seed, resolve_device(cfg.model.device)
    )
    with contextlib.ExitStack() as stack:

        def prepare() -> Checkpoint | None:
            stack.enter_context(RunLock(out))
            if restart:
                discard_run(out)
            return resume_point(cfg, out)

        ckpt = on_main(prepare)
        return _run(cfg, setup, out, ckpt)


def on_main(fn: Callable[[], Checkpoint | None]) -> Checkpoint | None:
    """`fn()` on rank 0; other ranks read the checkpoint it chose (`from_main`)."""
    chosen: list[Checkpoint | None] = [None]

    def path_of_choice() -> Path | None:
        chosen[0] = fn()
        return chosen[0].path if chosen[0] else None

    path = from_main(path_of_choice)
    if path is not None and chosen[0] is None:
        return read_checkpoint(path)
    return chosen[0]


def _run(cfg: Config, setup: Setup | None, out: Path, ckpt: Checkpoint | None) -> dict[str, Any]:
    """The rounds after checkpoint `ckpt` (all of them without one): the algorithm, with the
    run directory's plumbing in `Rounds`."""
    first = ckpt.round + 1 if ckpt else 0
    if ranks.is_main():
        write_yaml(out / "config.yaml", cfg.to_dict())
    if ckpt is not None and first == cfg.rounds:
        log(f"[{cfg.select.mode}] {out}: all {cfg.rounds} rounds already done (--restart reruns)")
        return write_summary(cfg, out, ckpt.state, 0.0)
    run = Rounds.start(cfg, setup or build_setup(cfg), out, ckpt)
    for r in range(first, cfg.rounds):
        timings: dict[str, float] = {}
        chunk = run.chunk(r)
        chosen, metrics = run.score_and_select(chunk, r, timings, resumed=r == first)
        metrics |= run.train(chosen, r, timings)  # GRPO steps on the selected problems
        metrics |= run.evaluate(r, timings)
        run.persist(r, metrics | timings | {"round": r + 1})  # a staged round keeps its times
    return run.finish()


@dataclass
class Rounds:
    """A run in progress: what its rounds share (policy, trainer, scorer, tracker, state) and
    the plumbing of each step of a round (staging, crash points, bars, checkpoints)."""

    cfg: Config
    setup: Setup
    out: Path
    trainer: Any  # engine.training.GRPOTraining
    tracker: Tracker
    scorer: ChunkScorer
    schedule: ChunkSchedule
    state: dict[str, Any]  # what a checkpoint saves: config, initial eval, history, wall_s
    t_start: float  # wall_s counts the rounds and evals, not loading the model

    @classmethod
    def start(cls, cfg: Config, setup: Setup, out: Path, ckpt: Checkpoint | None) -> Rounds:
        """The trainer, tracker and scorer of the run; problems.jsonl and the chunk manifest
        written; the state of `ckpt` restored, or the initial eval run."""
        from gradalign.engine.training import GRPOTraining

        if cfg.train.fsdp:  # from here every rank holds 1/R of the policy (docs/fsdp.md)
            sharded_state.shard_policy(setup.model, resolve_device(cfg.model.device))
        t_start = time.perf_counter()
        schedule = ChunkSchedule(len(setup.sets.pool), cfg.select.chunk_size, cfg.seed)
        main = ranks.is_main()
        if main:
            write_json(out / "chunks" / "manifest.json", schedule.manifest(cfg.rounds))
            write_jsonl(out / "problems.jsonl", problem_rows(setup.sets))
        trainer = GRPOTraining(
            setup.model,
            setup.tokenizer,
            cfg.train,
            cfg.rollout.max_new_tokens,
            cfg.seed,
            resolve_device(cfg.model.device),
            total_steps=cfg.rounds * cfg.train.steps_per_round,
        )
        tracker = Tracker(cfg, out) if main else Tracker.off(cfg)
        state = start_state(setup, out, ckpt, trainer)
        tracker.counters = state.setdefault("trl_counters", {})  # saved with every checkpoint
        if ckpt is None:
            tracker.initial(state["initial"])
        scorer = ChunkScorer(
            setup.model, setup.tokenizer, setup.sets.validation, cfg.rollout, cfg.select,
            cfg.seed, setup.sample, trainer.optimizer, stage_done=crash_point, bar=bar,
        )  # fmt: skip
        return cls(cfg, setup, out, trainer, tracker, scorer, schedule, state, t_start)

    def chunk(self, r: int) -> list[Problem]:
        """Round r's chunk of the pool (`ChunkSchedule`)."""
        return [self.setup.sets.pool[i] for i in self.schedule.chunk(r)]

    def score_and_select(
        self, chunk: list[Problem], r: int, timings: dict[str, float], resumed: bool
    ) -> tuple[list[Problem], dict[str, Any]]:
        """Round r's selection and metrics: read back from rounds/NNNN/ when the round a run
        resumes at staged it before a crash (rank 0 reads, every rank gets it), else scored
        (`score_and_select`)."""
        by_id = {p.id: p for p in self.setup.sets.pool}
        if resumed:
            staged = ranks.broadcast_object(
                read_stage(round_dir(self.out, r), chunk, by_id) if ranks.is_main() else None
            )
            if staged is not None:
                mode = self.cfg.select.mode
                log(f"[{mode}] round {r + 1}: selection read back from the run directory")
                return staged
        return score_and_select(self.setup, self.scorer, self.out, chunk, by_id, r, timings)

    def train(self, chosen: list[Problem], r: int, timings: dict[str, float]) -> dict[str, Any]:
        """``train.steps_per_round`` GRPO steps on `chosen`, seeded by the round; each step
        advances the bar, passes a crash point and reaches the tracker."""
        from gradalign.engine.training import TrainingDiverged

        steps, seed = self.cfg.train.steps_per_round, round_seed(self.cfg.seed, r, Stream.TRAIN)
        with bar("GRPO steps", steps) as advance:
            self.trainer.on_step = functools.partial(training_step_done, advance, r)
            self.trainer.on_log = functools.partial(self.tracker.trl_step, r)
            with timed(timings, "time/training_s"):
                try:
                    metrics = self.trainer.train_round(chosen, steps, seed)
                except TrainingDiverged as err:  # before this round writes anything
                    kept = str(checkpoint_dir(self.out, r - 1)) if r else None
                    raise err.at(r, kept) from None
        self.tracker.settle()  # TRL's running counters, continued by the next round
        return metrics

    def evaluate(self, r: int, timings: dict[str, float]) -> dict[str, float]:
        """The eval after round r (sampled mean@k too after the last round, and after every
        `rollout.eval_samples_every`-th)."""
        every = self.cfg.rollout.eval_samples_every
        sampled = r == self.cfg.rounds - 1 or (every > 0 and (r + 1) % every == 0)
        with timed(timings, "time/eval_s"):
            metrics = evaluate(self.setup, round_seed(self.cfg.seed, r, Stream.EVAL), sampled)
        crash_point("eval", r)
        return metrics

    def persist(self, r: int, metrics: dict[str, Any]) -> None:
        """Round r's metrics into the history; rank 0 writes metrics.json, the checkpoint and
        metrics.jsonl; the tracker and the console get the round."""
        history: list[dict[str, Any]] = self.state["history"]
        history.append(metrics)
        self.state["wall_s"] += time.perf_counter() - self.t_start
        self.t_start = time.perf_counter()
        model, trainer = self.setup.model, self.trainer
        whole = sharded_state.full_state(model, trainer.optimizer)  # FSDP: all gather
        if ranks.is_main():
            write_json(round_dir(self.out, r) / "metrics.json", metrics)
            save_checkpoint(
                self.out, r, model, trainer.optimizer, trainer.scheduler, self.state, whole
            )
            write_metrics_lines(self.out, history)
        self.tracker.round_done(r, metrics)
        log(round_line(self.cfg, r, metrics))

    def finish(self) -> dict[str, Any]:
        """Close the trainer and the tracker, write final/ and the summary."""
        self.trainer.close()
        self.tracker.close()
        whole = sharded_state.full_weights(self.setup.model) if self.cfg.train.fsdp else None
        if ranks.is_main():
            save_final(self.out, self.setup.model, self.setup.tokenizer, self.cfg, whole)
        return write_summary(self.cfg, self.out, self.state, time.perf_counter() - self.t_start)


def start_state(setup: Setup, out: Path, ckpt: Checkpoint | None, trainer: Any) -> dict[str, Any]:
    """The state to continue: the checkpoint's (its weights, optimizer and RNG states
    restored), or a new one that holds the eval accuracy before any training."""
    cfg = setup.cfg
    if ckpt is not None:
        restore(ckpt, setup.model, trainer.optimizer, trainer.scheduler)
        done = ckpt.round + 1
        log(
            f"[{cfg.select.mode}] resuming {out} after round {done}/{cfg.rounds} ({ckpt.path.name})"
        )
        return ckpt.state
    initial = evaluate(setup, round_seed(cfg.seed, -1, Stream.EVAL), sampled=True)
    log(f"[{cfg.select.mode}] initial eval accuracy {initial['eval/accuracy']:.3f}")
    cut = clipped_message({"greedy eval": initial["eval/clipped_frac"]}, cfg.rollout.max_new_tokens)
    if cut is not None:  # before any training: the rounds warn of their own rollouts
        log(f"warning: initial eval: {cut}")
    return {"config": cfg.to_dict(), "initial": initial, "history": [], "wall_s": 0.0}


def training_step_done(advance: Callable[[int], None], r: int) -> None:
    advance(1)
    crash_point("training", r)


def resume_point(cfg: Config, out: Path) -> Checkpoint | None:
    """The checkpoint to continue from, after checking that it is this config's run."""
    ckpt = latest_checkpoint(out, lambda msg: log(f"warning: {msg}"))
    if ckpt is None:
        if any((out / "checkpoints").glob("round-*")):  # each was reported as it was skipped
            log(f"warning: {out}: no checkpoint verifies; starting again from round 1")
        elif (out / "rounds").is_dir():  # interrupted in round 1: nothing lost but its time
            log(
                f"[{cfg.select.mode}] {out}: no round had finished yet; starting round 1 (a "
                "selection it had staged is read back)"
            )
        return None
    current = json.loads(json.dumps(cfg.to_dict()))  # as state.json holds it
    diffs = config_differences(ckpt.state.get("config", {}), current)
    if diffs:
        raise ResumeError(
            f"{out} holds a run with another config ({'; '.join(diffs[:4])}); "
            "run it with its own config to resume it, or choose another out_dir "
            "(or --restart to discard it)"
        )
    if ckpt.round + 1 > cfg.rounds:
        raise ResumeError(
            f"{out} has already run {ckpt.round + 1} rounds, more than rounds={cfg.rounds}"
        )
    return ckpt


def score_and_select(
    setup: Setup,
    scorer: ChunkScorer,
    out: Path,
    chunk: list[Problem],
    by_id: dict[int, Problem],
    r: int,
    timings: dict[str, float],
) -> tuple[list[Problem], dict[str, Any]]:
    """Rollouts, scores and the selection of round r (`round_scoring`), staged in
    rounds/NNNN/ (selection.json last) so that a crash during training does not redo them."""
    cfg = setup.cfg
    with warnings.catch_warnings(record=True) as caught:  # split-half, fallback, skipped ones
        warnings.simplefilter("always", SelectionWarning)
        scored = scorer.score(chunk, np.array([p.id for p in chunk]), r, timings)
        with timed(timings, "time/selection_s"):
            pool_ids = np.array([p.id for p in setup.sets.pool])
            sel = select_chunk(scored, cfg.select, cfg.seed, r, pool_ids)
    for w in caught:
        log(f"warning: round {r + 1}: {w.message}")
    sel = ranks.broadcast_object(sel)  # every rank selects the same; rank 0's is the one
    chosen = [by_id[int(i)] for i in sel.ids]
    metrics = scored.metrics | selection_metrics(sel.ids, scored.candidates, sel, chosen)
    metrics |= selection_quality(chunk, scored.candidates, sel) | timings
    if ranks.is_main():
        write_stage(round_dir(out, r), r, chunk, scored, sel, metrics, by_id)
    return chosen, metrics
