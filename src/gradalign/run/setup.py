"""What a run is built from: the task sets, the policy and the rollout engine (`Setup`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gradalign import ranks
from gradalign.config import Config, ConfigError
from gradalign.data.problems import Problem, check_disjoint
from gradalign.data.tasks import TaskSets, make_regime, parse_family_flaws
from gradalign.engine.policy import format_prompt, resolve_device
from gradalign.engine.rollout import Rollouts, generate
from gradalign.engine.round_scoring import sampling_config
from gradalign.progress import Advance, bar, log
from gradalign.scoring import sharded


@dataclass
class Setup:
    cfg: Config
    model: Any
    tokenizer: Any
    sets: TaskSets
    generate: Callable[..., Rollouts] = generate  # rollout engine (HF generate or vLLM)

    def sample(
        self,
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

        sampling = sampling_config(self.cfg.rollout)
        problems = list(problems)
        rank, size = ranks.world()
        salt = f"{what}:{seed}"
        with bar(what, len(problems)) as advance:
            if size == 1 or sharded.is_sharded(self.model):  # FSDP: every forward is
                # collective, so every rank samples every batch in lockstep (same rollouts)
                return self.generate(  # HF generate, or the vLLM engine build_setup installed
                    self.model,
                    self.tokenizer,
                    problems,
                    group_size,
                    sampling,
                    seed,
                    greedy=greedy,
                    salt=salt,
                    progress=advance,
                )
            prompt_ids = [format_prompt(self.tokenizer, p.chat) for p in problems]
            mine = ranks.shard(num_batches(len(problems), sampling), rank, size)
            part = sample_completions(
                self.model, self.tokenizer, prompt_ids, group_size, sampling, seed, greedy,
                advance, mine,
            )  # fmt: skip
            completions = [c for ranked in ranks.gather_objects(part) for c in ranked]
            return score_rollouts(
                self.tokenizer, problems, prompt_ids, completions, group_size, salt
            )


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
    from gradalign.run.sources import check_model, check_scored_params

    check_model(cfg)  # model.device, a built-in model's size: before loading anything

    if cfg.rollout.backend == "vllm":
        from gradalign.engine.vllm_backend import require

        if ranks.world()[1] > 1:
            raise ConfigError(
                "rollout.backend=vllm runs in one process (vLLM shards the model itself); "
                "launch without torchrun, or use rollout.backend=hf"
            )
        require()  # fail before loading anything
    sets = build_sets(cfg)
    model, tokenizer = build_policy(cfg, sets)
    check_scored_params(cfg, model)
    setup = Setup(cfg, model, tokenizer, fit_context(cfg, model, tokenizer, sets))
    if cfg.rollout.backend == "vllm":
        from gradalign.engine.vllm_backend import engine_from_config, generate_vllm

        setup.generate = functools.partial(generate_vllm, engine_from_config(cfg, model, tokenizer))
    return setup


def build_policy(cfg: Config, sets: TaskSets) -> tuple[Any, Any]:
    """The policy before any GRPO step: the warm-started built-in model (from the cache when
    there) or the local HF directory, with LoRA adapters when model.lora_r > 0."""
    from gradalign.engine.warmstart import load_or_warmstart
    from gradalign.run.sources import with_lora

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
                family_flaws=parse_family_flaws(m.warmstart_family_flaws, m.warmstart_flaw_frac),
            )
        model = model.to(resolve_device(m.device))
        if m.lora_r > 0:
            model = with_lora(model, cfg)
    else:
        from gradalign.run.sources import policy_from_config

        model, tokenizer = policy_from_config(cfg)  # LoRA applied inside when lora_r > 0
    return model, tokenizer


def fit_context(cfg: Config, model: Any, tokenizer: Any, sets: TaskSets) -> TaskSets:
    """Drop (and report) problems whose prompt plus rollout.max_new_tokens exceeds the model's
    context; a set left empty, or a pool smaller than a chunk, is a config error."""
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


def warmstart_progress(advance: Advance, step: int, loss: float, total: int) -> None:
    """One warm-start step: its loss goes into the progress lines of a log (`progress.bar`)."""
    advance.note = f"loss {loss:.3f}"
    advance(1)
