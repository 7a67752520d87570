"""The round loop (DESIGN §4): chunk → rollouts → group gradients → scores → selection →
GRPO steps → eval, with every round's artifacts written to the run directory (§5)."""

from __future__ import annotations

import contextlib
import functools
import json
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradalign.config import Config, ConfigError, check
from gradalign.core import alignment
from gradalign.core.selection import Candidates, Selection, SelectionWarning, needs, select
from gradalign.data.problems import ChunkSchedule, Problem, check_disjoint, round_seed
from gradalign.data.tasks import TaskSets, make_regime
from gradalign.engine.policy import format_prompt, resolve_device
from gradalign.engine.rollout import Rollouts, SamplingConfig, generate
from gradalign.progress import bar, console, log
from gradalign.run.artifacts import (
    RoundScores,
    discard_run,
    problem_rows,
    read_stage,
    round_line,
    selection_metrics,
    selection_quality,
    write_stage,
    write_summary,
)
from gradalign.run.checkpoint import (
    Checkpoint,
    ResumeError,
    RunLock,
    RunLocked,
    checkpoint_dir,
    config_differences,
    crash_point,
    latest_checkpoint,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from gradalign.rundir import StorageError, write_json, write_jsonl, write_yaml
from gradalign.scoring import distributed as dd


@dataclass
class Setup:
    cfg: Config
    model: Any
    tokenizer: Any
    sets: TaskSets
    generate: Callable[..., Rollouts] = generate  # rollout engine (HF generate or vLLM)


def seed_for(cfg: Config, round_: int, stream: int) -> int:
    """The run's seed for (round, stream): `problems.round_seed`."""
    return round_seed(cfg.seed, round_, stream)


def build_sets(cfg: Config) -> TaskSets:
    """Pool, validation and eval sets: from problem files, or a built-in regime."""
    d = cfg.data
    if d.pool_files:
        from gradalign.run.sources import sets_from_files

        return sets_from_files(cfg, log)
    try:
        sets = make_regime(
            d.regime,
            d.families,
            d.pool_size,
            d.val_size,
            d.eval_size,
            d.seed,
            d.corrupt_frac,
            d.corruption,
            d.majority_frac,
            d.minority,
            d.lowutility_frac,
        )
    except ValueError as err:  # a family that cannot supply that many distinct prompts
        raise ConfigError(f"data.pool_size, val_size and eval_size: {err}") from None
    check_disjoint(sets.validation, sets.eval, ("validation", "eval"))
    return sets


def build_setup(cfg: Config) -> Setup:
    """Task sets, the policy (warm-started built-in or a local HF directory, LoRA when
    asked) and the rollout engine."""
    from gradalign.engine.warmstart import load_or_warmstart
    from gradalign.run.sources import check_model, check_scored_params, with_lora

    check_model(cfg)  # model.device, a built-in model's size: before loading anything
    if cfg.rollout.backend == "vllm":
        from gradalign.engine.vllm_backend import require

        if dd.world()[1] > 1:
            raise ConfigError(
                "rollout.backend=vllm runs in one process (vLLM shards the model itself); "
                "launch without torchrun, or use rollout.backend=hf"
            )
        require()  # fail before loading anything
    sets = build_sets(cfg)
    m = cfg.model
    if m.name.startswith("builtin:"):
        exclude = {p.prompt for p in sets.pool + sets.validation + sets.eval}
        with bar("warm start", m.warmstart_steps) as advance:
            model, tokenizer = load_or_warmstart(
                m.name.split(":", 1)[1],
                cfg.data.families,
                m.warmstart_steps,
                m.warmstart_lr,
                m.warmstart_batch_size,
                m.warmstart_seed,
                exclude,
                m.cache_dir,
                progress=lambda step, loss: warmstart_progress(
                    advance, step, loss, m.warmstart_steps
                ),
                log=log,
                flaw=m.warmstart_flaw,
                flaw_frac=m.warmstart_flaw_frac,
            )
        model = model.to(resolve_device(m.device))
        if m.lora_r > 0:
            model = with_lora(model, cfg)
    else:
        from gradalign.run.sources import policy_from_config

        model, tokenizer = policy_from_config(cfg)  # LoRA applied inside when lora_r > 0
    check_scored_params(cfg, model)
    setup = Setup(cfg, model, tokenizer, fit_context(cfg, model, tokenizer, sets))
    if cfg.rollout.backend == "vllm":
        from gradalign.engine.vllm_backend import engine_from_config, generate_vllm

        setup.generate = functools.partial(generate_vllm, engine_from_config(cfg, model, tokenizer))
    return setup


def fit_context(cfg: Config, model: Any, tokenizer: Any, sets: TaskSets) -> TaskSets:
    """Drop (and report) problems whose prompt plus rollout.max_new_tokens exceeds the model's
    context; a set left empty, or a pool smaller than a chunk, is a config error."""
    from gradalign.config import ConfigError
    from gradalign.run.sources import check_pool_size, check_prompt_lengths, model_context

    context, kept = model_context(model), {}
    for what in ("pool", "validation", "eval"):
        problems = getattr(sets, what)
        kept[what], msgs = check_prompt_lengths(
            problems, tokenizer, context, cfg.rollout.max_new_tokens, what
        )
        if msgs:
            log(f"warning: {len(msgs)} of {len(problems)} {what} problems do not fit the context:")
            for msg in msgs[:5]:
                log(f"  {msg}")
        if not kept[what]:
            raise ConfigError(
                f"no {what} problem fits the model context of {context} tokens with "
                f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
            )
    if len(kept["pool"]) < len(sets.pool):
        check_pool_size(cfg, len(kept["pool"]))
    return TaskSets(**kept)


def warmstart_progress(advance: Callable[[int], None], step: int, loss: float, total: int) -> None:
    advance(1)
    if step % max(total // 5, 1) == 0 and not console.is_terminal:  # a few lines in logs
        log(f"warm start: step {step}/{total}, loss {loss:.3f}")


@contextmanager
def timed(timings: dict[str, float], key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def sample(
    setup: Setup, problems: list[Problem], k: int, seed: int, what: str, greedy: bool = False
) -> Rollouts:
    """k seeded rollouts per problem. Under torchrun the prompt batches are shared out over
    the ranks and gathered: every rank gets the rollouts one process would sample."""
    from gradalign.engine.rollout import num_batches, sample_completions, score_rollouts

    r = setup.cfg.rollout
    sampling = SamplingConfig(r.temperature, r.top_p, r.max_new_tokens, r.prompts_per_batch)
    rank, size = dd.world()
    salt = f"{what}:{seed}"
    with bar(what, len(problems)) as advance:
        if size == 1:
            return setup.generate(  # HF generate, or the vLLM engine build_setup installed
                setup.model,
                setup.tokenizer,
                problems,
                k,
                sampling,
                seed,
                greedy=greedy,
                salt=salt,
                progress=advance,
            )
        prompt_ids = [format_prompt(setup.tokenizer, p.prompt) for p in problems]
        mine = dd.shard(num_batches(len(problems), sampling), rank, size)
        part = sample_completions(
            setup.model, setup.tokenizer, prompt_ids, k, sampling, seed, greedy, advance, mine
        )
        completions = [c for ranked in dd.gather_objects(part) for c in ranked]
        return score_rollouts(setup.tokenizer, problems, prompt_ids, completions, k, salt)


def evaluate(setup: Setup, seed: int, sampled: bool = False) -> dict[str, float]:
    """Greedy pass@1 on the eval set, overall and per source; with `sampled`, also the mean
    reward of `rollout.eval_samples` samples per problem (mean@k)."""
    ro = sample(setup, setup.sets.eval, 1, seed, "eval", greedy=True)
    out = {"eval/accuracy": float(ro.rewards.mean()), "eval/bad_rewards": ro.bad_rewards}
    out |= per_source(ro, "eval/accuracy")
    k = setup.cfg.rollout.eval_samples
    if sampled and k > 0:
        ro = sample(setup, setup.sets.eval, k, seed + 1, f"eval mean@{k}")
        out["eval/mean_at_k"] = float(ro.rewards.mean())
        out |= per_source(ro, "eval/mean_at_k")
        out["eval/bad_rewards"] += ro.bad_rewards
    return out


def per_source(ro: Rollouts, name: str) -> dict[str, float]:
    """The mean reward of each problem source's rollouts, as `name/source`."""
    sources = np.array([ro.problems[g].source for g in ro.group])
    return {f"{name}/{s}": float(ro.rewards[sources == s].mean()) for s in sorted(set(sources))}


def score_round(
    setup: Setup,
    chunk: list[Problem],
    r: int,
    timings: dict[str, float],
    optimizer: torch.optim.Optimizer | None = None,
) -> RoundScores:
    """Candidate rollouts, validation rollouts and group gradients, as the mode needs."""
    cfg, ids = setup.cfg, np.array([p.id for p in chunk])
    need = needs(cfg.select.mode)
    if not need:
        return RoundScores(Candidates(ids), [], {})
    with timed(timings, "time/candidate_rollouts_s"):
        cand = sample(setup, chunk, cfg.rollout.k_r, seed_for(cfg, r, 1), "candidate rollouts")
    crash_point("rollouts", r)
    zv = cand.zero_variance()
    metrics = {
        "select/chunk_pass_rate": float(cand.pass_rates().mean()),
        "select/chunk_zero_variance_frac": float(zv.mean()),
        "rollouts/bad_rewards": cand.bad_rewards,  # failed or non-finite, scored 0
    }
    if "gradients" not in need:
        return RoundScores(Candidates(ids, cand.pass_rates(), zv), [cand], metrics)
    with timed(timings, "time/validation_rollouts_s"):
        val = sample(
            setup,
            setup.sets.validation,
            cfg.rollout.k_v,
            seed_for(cfg, r, 2),
            "validation rollouts",
        )
    metrics["val/pass_rate"] = float(val.rewards.mean())
    metrics["val/bad_rewards"] = val.bad_rewards
    metrics["val/zero_variance_frac"] = float(val.zero_variance().mean())
    with timed(timings, "time/scoring_s"):
        al, features = gradient_alignment(setup, cand, val, optimizer)
    crash_point("scoring", r)
    metrics["score/cos_mean"] = float(np.mean(al.cos_val))  # NaN shows a non-finite gradient
    metrics["score/val_norm"] = al.val_norm
    cands = Candidates(
        ids, cand.pass_rates(), zv, al.dot_val, al.dot_chunk, al.norm, val_norm=al.val_norm
    )
    return RoundScores(cands, [cand, val], metrics, features)


def gradient_alignment(
    setup: Setup, cand: Rollouts, val: Rollouts, optimizer: torch.optim.Optimizer | None
) -> tuple[alignment.GroupAlignment, np.ndarray | None]:
    """<g_p, g^_V>, <g_p, g^_C> (mode `align` only) and ||g_p|| of every candidate group, with
    the batched scorer or the exact reference; optional projection features [P, dim]."""
    from gradalign.scoring import fastscore

    s, model, pad = setup.cfg.select, setup.model, setup.tokenizer.pad_token_id
    params = alignment.scored_parameters(model, s.params)
    device = next(model.parameters()).device
    cand_batch = cand.to_batch(pad, s.scale_advantages).to(device)
    val_batch = val.to_batch(pad, s.scale_advantages).to(device)
    need_chunk = s.mode == "align"
    exp_avg_sq = None
    if s.precondition == "adam" and optimizer is not None and optimizer.state:
        exp_avg_sq = fastscore.adam_exp_avg_sq(optimizer, params)  # none before the 1st step
    model.eval()
    with bar("scoring", cand.num_groups) as advance:
        if s.scorer == "exact":
            direction = alignment.validation_direction(model, params, val_batch, s.val_aggregate)
            if exp_avg_sq is not None:
                al = fastscore.exact_preconditioned_alignment(
                    model, params, cand_batch, direction, exp_avg_sq
                )
            else:
                al = alignment.exact_alignment(
                    model, params, cand_batch, direction, advance, chunk=need_chunk
                )
        else:  # each rank scores its share of the groups (all of them in one process)
            al = dd.distributed_alignment(
                model,
                params,
                cand_batch,
                val_batch,
                s.val_aggregate,
                s.groups_per_micro,
                chunk=need_chunk,
                exp_avg_sq=exp_avg_sq,
                progress=advance,
            )
    features = None
    if s.project_dim:
        features = dd.distributed_projected_gradients(
            model, params, cand_batch, s.project_dim, setup.cfg.seed, s.groups_per_micro, exp_avg_sq
        )
    return al, features


def run(cfg: Config, setup: Setup | None = None, restart: bool = False) -> dict[str, Any]:
    """Run `cfg.rounds` rounds; returns the run summary (also written to summary.json).

    The run directory is locked for the run. A directory holding an unfinished run with the
    same config is resumed from its newest verified checkpoint (`restart` discards it).
    Under torchrun / accelerate launch, rank 0 holds the lock and writes; every rank loads
    the same checkpoint, samples and scores its share and trains through TRL's DDP."""
    check(cfg)  # again: a Config's fields may have been changed after it was built
    out = Path(cfg.out_dir)
    dd.init_from_env(resolve_device(cfg.model.device))
    with contextlib.ExitStack() as stack:

        def prepare() -> Checkpoint | None:
            stack.enter_context(RunLock(out))
            if restart:
                discard_run(out)
            return resume_point(cfg, out)

        ckpt = on_main(prepare)
        return _run(cfg, setup, out, ckpt)


def on_main(fn: Callable[[], Checkpoint | None]) -> Checkpoint | None:
    """`fn()` on rank 0; other ranks read the checkpoint it chose. A refusal (locked run
    directory, other config) is raised on every rank, so none waits for the others."""
    ckpt, error = None, None
    if dd.is_main():
        try:
            ckpt = fn()
        except (RunLocked, ResumeError, StorageError) as err:
            error = err
    path, error = dd.broadcast_object((ckpt.path if ckpt else None, error))
    if error is not None:
        raise error
    if path is not None and ckpt is None:
        ckpt = read_checkpoint(path)
    return ckpt


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
    )
    if ckpt is not None:
        restore(ckpt, setup.model, trainer.optimizer, trainer.scheduler)
        state = ckpt.state
        log(
            f"[{cfg.select.mode}] resuming {out} after round {done}/{cfg.rounds} ({ckpt.path.name})"
        )
    else:
        initial = evaluate(setup, seed_for(cfg, -1, 4), sampled=True)
        state = {"config": cfg.to_dict(), "initial": initial, "history": [], "wall_s": 0.0}
        log(f"[{cfg.select.mode}] initial eval accuracy {initial['eval/accuracy']:.3f}")
    history: list[dict[str, Any]] = state["history"]
    for r in range(done, cfg.rounds):
        timings: dict[str, float] = {}
        chunk = [pool[i] for i in schedule.chunk(r)]
        staged = None
        if r == done:  # rank 0 reads what a crash left of this round
            staged = dd.broadcast_object(
                read_stage(out / "rounds" / f"{r:04d}", chunk, by_id) if main else None
            )
        if staged is None:
            chosen, metrics = score_and_select(setup, out, chunk, by_id, r, timings, trainer)
        else:
            chosen, metrics = staged
            log(f"[{cfg.select.mode}] round {r + 1}: selection read back from the run directory")
        with bar("GRPO steps", cfg.train.steps_per_round) as advance:
            trainer.on_step = functools.partial(training_step_done, advance, r)
            with timed(timings, "time/training_s"):
                try:
                    metrics |= trainer.train_round(
                        chosen, cfg.train.steps_per_round, seed_for(cfg, r, 5)
                    )
                except TrainingDiverged as err:  # before this round writes anything
                    raise err.at(r, str(checkpoint_dir(out, r - 1)) if r else None) from None
        with timed(timings, "time/eval_s"):
            metrics |= evaluate(setup, seed_for(cfg, r, 4), sampled=r == cfg.rounds - 1)
        crash_point("eval", r)
        metrics |= timings | {"round": r}  # a staged round keeps its scoring times
        history.append(metrics)
        state["wall_s"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        if main:
            write_json(out / "rounds" / f"{r:04d}" / "metrics.json", metrics)
            save_checkpoint(out, r, setup.model, trainer.optimizer, trainer.scheduler, state)
        log(round_line(cfg, r, metrics))
    trainer.close()
    return write_summary(cfg, out, state, time.perf_counter() - t_start)


def training_step_done(advance: Callable[[int], None], r: int) -> None:
    advance(1)
    crash_point("training", r)


def resume_point(cfg: Config, out: Path) -> Checkpoint | None:
    """The checkpoint to continue from, after checking that it is this config's run."""
    ckpt = latest_checkpoint(out, lambda msg: log(f"warning: {msg}"))
    if ckpt is None:
        if (out / "rounds").is_dir():
            log(f"warning: {out} has round artifacts but no usable checkpoint; starting over")
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
    """Rollouts, scores and the selection of round r, staged in rounds/NNNN/ (selection.json
    last) so that a crash during training does not redo them."""
    cfg, pool = setup.cfg, setup.sets.pool
    scored = score_round(setup, chunk, r, timings, trainer.optimizer)
    cand, metrics = scored.candidates, scored.metrics
    with timed(timings, "time/selection_s"):
        rng = np.random.default_rng(seed_for(cfg, r, 3))
        with warnings.catch_warnings(record=True) as caught:  # fallback, skipped candidates
            warnings.simplefilter("always", SelectionWarning)
            sel = select(cfg.select.mode, cand, cfg.n_select, rng, cfg.select.zero_variance)
        for w in caught:
            log(f"warning: round {r + 1}: {w.message}")
        sel = dd.broadcast_object(sel)  # made the same on every rank; rank 0's is the one
    if cfg.select.mode == "none":  # plain GRPO: the whole pool, every round
        sel = Selection(np.array([p.id for p in pool]), sel.scores)
    chosen = [by_id[int(i)] for i in sel.ids]
    metrics |= selection_metrics(chosen, cand, sel) | selection_quality(chunk, cand, sel) | timings
    if dd.is_main():
        write_stage(out / "rounds" / f"{r:04d}", r, chunk, scored, sel, metrics)
    return chosen, metrics
