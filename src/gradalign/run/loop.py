"""The round loop: chunk → rollouts → group gradients → scores → selection (`round_scoring`)
→ GRPO steps → eval, with every round's artifacts written to the run directory."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.config import Config, check
from gradalign.core.selection import Selection, SelectionWarning
from gradalign.data.problems import ChunkSchedule, Problem, Stream, round_seed
from gradalign.engine.policy import format_prompt, resolve_device
from gradalign.engine.rollout import Rollouts
from gradalign.engine.round_scoring import (
    RoundScores,
    clipped_message,
    clipped_share,
    sampling_config,
    score_chunk,
    select_chunk,
    selection_metrics,
    timed,
)
from gradalign.engine.trl_args import check_grpo_config
from gradalign.progress import bar, log
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
from gradalign.rundir import write_json, write_jsonl, write_yaml
from gradalign.scoring import distributed as dd


def sample(
    setup: Setup,
    problems: Sequence[Problem],
    group_size: int,
    seed: int,
    what: str,
    greedy: bool = False,
) -> Rollouts:
    """`group_size` seeded rollouts per problem (k_r, k_v, or 1 for eval). Under torchrun
    the prompt batches are shared out over the ranks and gathered: every rank gets the
    rollouts one process would sample."""
    from gradalign.engine.rollout import num_batches, sample_completions, score_rollouts

    sampling = sampling_config(setup.cfg.rollout)
    problems = list(problems)
    rank, size = dd.world()
    salt = f"{what}:{seed}"
    with bar(what, len(problems)) as advance:
        if size == 1:
            return setup.generate(  # HF generate, or the vLLM engine build_setup installed
                setup.model,
                setup.tokenizer,
                problems,
                group_size,
                sampling,
                seed,
                greedy=greedy,
                salt=salt,
                progress=advance,
            )
        prompt_ids = [format_prompt(setup.tokenizer, p.chat) for p in problems]
        mine = dd.shard(num_batches(len(problems), sampling), rank, size)
        part = sample_completions(
            setup.model, setup.tokenizer, prompt_ids, group_size, sampling, seed, greedy,
            advance, mine,
        )  # fmt: skip
        completions = [c for ranked in dd.gather_objects(part) for c in ranked]
        return score_rollouts(setup.tokenizer, problems, prompt_ids, completions, group_size, salt)


def evaluate(setup: Setup, seed: int, sampled: bool = False) -> dict[str, float]:
    """Greedy pass@1 on the eval set, overall and per source; with `sampled`, also the mean
    reward of `rollout.eval_samples` samples per problem (mean@k)."""
    ro = sample(setup, setup.sets.eval, 1, seed, "eval", greedy=True)
    out = {"eval/accuracy": float(ro.rewards.mean()), "eval/bad_rewards": ro.bad_rewards}
    out["eval/clipped_frac"] = clipped_share(ro)  # greedy answers cut off at max_new_tokens
    out |= per_source(ro, "eval/accuracy")
    samples = setup.cfg.rollout.eval_samples
    if sampled and samples > 0:
        ro = sample(setup, setup.sets.eval, samples, seed + 1, f"eval mean@{samples}")
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
    dd.init_from_env(resolve_device(cfg.model.device))
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
    from gradalign.engine.training import GRPOTraining, TrainingDiverged

    main = dd.is_main()
    done = ckpt.round + 1 if ckpt else 0
    if main:
        write_yaml(out / "config.yaml", cfg.to_dict())
    if ckpt is not None and done == cfg.rounds:
        log(f"[{cfg.select.mode}] {out}: all {cfg.rounds} rounds already done (--restart reruns)")
        return write_summary(cfg, out, ckpt.state, 0.0)
    setup = setup or build_setup(cfg)
    t_start = time.perf_counter()  # wall_s: the rounds and evals, not loading the model
    pool, by_id = setup.sets.pool, {p.id: p for p in setup.sets.pool}
    schedule = ChunkSchedule(len(pool), cfg.select.chunk_size, cfg.seed)
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
    history: list[dict[str, Any]] = state["history"]
    for r in range(done, cfg.rounds):
        timings: dict[str, float] = {}
        chunk = [pool[i] for i in schedule.chunk(r)]
        staged = None
        if r == done:  # rank 0 reads what a crash left of this round
            staged = dd.broadcast_object(
                read_stage(round_dir(out, r), chunk, by_id) if main else None
            )
        if staged is None:
            chosen, metrics = score_and_select(setup, out, chunk, by_id, r, timings, trainer)
        else:
            chosen, metrics = staged
            log(f"[{cfg.select.mode}] round {r + 1}: selection read back from the run directory")
        with bar("GRPO steps", cfg.train.steps_per_round) as advance:
            trainer.on_step = functools.partial(training_step_done, advance, r)
            trainer.on_log = functools.partial(tracker.trl_step, r)
            with timed(timings, "time/training_s"):
                try:
                    metrics |= trainer.train_round(
                        chosen, cfg.train.steps_per_round, round_seed(cfg.seed, r, Stream.TRAIN)
                    )
                except TrainingDiverged as err:  # before this round writes anything
                    raise err.at(r, str(checkpoint_dir(out, r - 1)) if r else None) from None
        tracker.settle()  # TRL's running counters, continued by the next round
        with timed(timings, "time/eval_s"):
            eval_seed = round_seed(cfg.seed, r, Stream.EVAL)
            metrics |= evaluate(setup, eval_seed, sampled=r == cfg.rounds - 1)
        crash_point("eval", r)
        metrics |= timings | {"round": r + 1}  # a staged round keeps its scoring times
        history.append(metrics)
        state["wall_s"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        if main:
            write_json(round_dir(out, r) / "metrics.json", metrics)
            save_checkpoint(out, r, setup.model, trainer.optimizer, trainer.scheduler, state)
            write_metrics_lines(out, history)
        tracker.round_done(r, metrics)
        log(round_line(cfg, r, metrics))
    trainer.close()
    tracker.close()
    if main:
        save_final(out, setup.model, setup.tokenizer, cfg)
    return write_summary(cfg, out, state, time.perf_counter() - t_start)


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
    out: Path,
    chunk: list[Problem],
    by_id: dict[int, Problem],
    r: int,
    timings: dict,
    trainer: Any,
) -> tuple[list[Problem], dict[str, Any]]:
    """Rollouts, scores and the selection of round r (`round_scoring`), staged in
    rounds/NNNN/ (selection.json last) so that a crash during training does not redo them."""
    with warnings.catch_warnings(record=True) as caught:  # split-half, fallback, skipped ones
        warnings.simplefilter("always", SelectionWarning)
        scored, sel = _score_and_select(setup, chunk, r, timings, trainer)
    for w in caught:
        log(f"warning: round {r + 1}: {w.message}")
    sel = dd.broadcast_object(sel)  # every rank selects the same; rank 0's is the one
    chosen = [by_id[int(i)] for i in sel.ids]
    metrics = scored.metrics | selection_metrics(sel.ids, scored.candidates, sel, chosen)
    metrics |= selection_quality(chunk, scored.candidates, sel) | timings
    if dd.is_main():
        write_stage(round_dir(out, r), r, chunk, scored, sel, metrics, by_id)
    return chosen, metrics


def _score_and_select(
    setup: Setup, chunk: list[Problem], r: int, timings: dict, trainer: Any
) -> tuple[RoundScores, Selection]:
    cfg = setup.cfg
    scored = score_chunk(
        setup.model,
        setup.tokenizer,
        chunk,
        np.array([p.id for p in chunk]),
        setup.sets.validation,
        cfg.rollout,
        cfg.select,
        cfg.seed,
        r,
        functools.partial(sample, setup),
        optimizer=trainer.optimizer,
        timings=timings,
        stage_done=lambda stage: crash_point(stage, r),
        bar=bar,
    )
    with timed(timings, "time/selection_s"):
        pool_ids = np.array([p.id for p in setup.sets.pool])
        return scored, select_chunk(scored, cfg.select, cfg.seed, r, pool_ids)
