"""Scoring and selecting a round's chunk: the one path of the round loop and the TRL callback.

Notation: P chunk problems (candidates) · V validation problems · D scored parameters.

`ChunkScorer.score` runs, as the mode needs (`selection.needs`): k_r rollouts per candidate, k_v per
validation problem, the validation direction g^_V (`direction_with_split_half`, the one place a
round computes it) and every candidate's alignment statistics (`group_alignment`), and returns them
as a `RoundScores` record with the round's metrics. `select_chunk` then chooses with the
round's seeded generator. The caller brings the rollouts (`Sample`: the loop's sharded HF or
vLLM sampling and problem rewards; the callback's TRL prompts and reward functions) and keeps
what is its own (run directory, checkpoints, TRL's sampler).

Metrics: stable names, shared by the run directory, `gradalign score` and the callback's
``gradalign/*`` logs, each defined once in docs/metrics.md (``select/*``, ``rollouts/*``,
``val/*``, ``score/*`` and the ``time/*_s`` of each phase are computed here); a
`SelectionWarning` when over `CLIPPED_WARN` of a stage's rollouts hit ``rollout.max_new_tokens``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch

from gradalign.config import RolloutConfig, SelectConfig
from gradalign.core import alignment
from gradalign.core.alignment import GroupAlignment, Progress, direction_norm
from gradalign.core.common import parse_output_dims
from gradalign.core.diagnostics import cosine, split_halves
from gradalign.core.grpo import SequenceBatch
from gradalign.core.selection import Candidates, Selection, SelectionWarning, needs, select
from gradalign.data.problems import Problem, Stream, round_seed
from gradalign.engine.budget import halving_rollouts
from gradalign.engine.policy import scored_parameters
from gradalign.engine.rollout import Rollouts, SamplingConfig
from gradalign.scoring import distributed as dd
from gradalign.scoring import micro, output_features, precondition, sharded
from gradalign.scoring.pieces import Direction, unit_pieces

Item = TypeVar("Item")  # a chunk or validation item: a Problem (the loop), a TRL row (callback)
# (items, rollouts per item, seed, what: "candidate rollouts" | "validation rollouts") -> rollouts
Sample = Callable[[Sequence[Item], int, int, str], Rollouts]
Bar = Callable[[str, int], AbstractContextManager[Progress]]
CLIPPED_WARN = 0.5  # share of a stage's rollouts cut off at max_new_tokens that is warned of


@dataclass
class RoundScores:
    """What scoring a chunk gave, as far as the mode needed it."""

    candidates: Candidates  # ids; pass rates with rollouts; dot_val, dot_chunk, norm with gradients
    rollouts: list[Rollouts]  # candidate, then validation rollouts (as computed)
    metrics: dict[str, Any]
    features: np.ndarray | None = None  # [P, select.project_dim] projections of g_p


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


@contextmanager
def no_bar(description: str, total: int) -> Iterator[Progress]:
    yield no_progress


def no_progress(n: int = 1) -> None:
    """`no_bar`'s advance: counts nothing."""


def no_stage(stage: str, round_: int) -> None:
    """`ChunkScorer.stage_done` by default: nothing to mark."""


def sampling_config(r: RolloutConfig) -> SamplingConfig:
    return SamplingConfig(r.temperature, r.top_p, r.max_new_tokens, r.prompts_per_batch)


@dataclass(frozen=True)
class ChunkScorer:
    """Scores round chunks under the current policy: built once per run (the loop, `gradalign
    score`, `gradalign diagnose`, the TRL callback) with what stays fixed, then
    `score(chunk, ids, round_)` per round.

    `sample` draws the rollouts, seeded by `round_seed(seed, round_, Stream.CANDIDATES /
    VALIDATION)` (and ``Stream.HALVING`` for ``select.budget=halving``'s second stage);
    `optimizer` gives Adam's second moment for ``select.precondition=adam``; `stage_done(stage,
    round_)` is called as the "rollouts" and the "scoring" stage ends; `bar` shows the
    scoring's progress."""

    model: torch.nn.Module
    tokenizer: Any
    validation: Sequence[Any]  # the validation items `sample` is given
    rollout: RolloutConfig
    select: SelectConfig
    seed: int
    sample: Sample
    optimizer: torch.optim.Optimizer | None = None
    stage_done: Callable[[str, int], None] = no_stage
    bar: Bar = no_bar

    def score(
        self,
        chunk: Sequence[Any],
        ids: np.ndarray,
        round_: int,
        timings: dict[str, float] | None = None,
    ) -> RoundScores:
        """Rollouts, validation direction and group gradients of round `round_`'s chunk (ids
        [P], in chunk order), as mode ``select.mode`` needs them. `timings` collects
        ``time/candidate_rollouts_s``, ``time/validation_rollouts_s`` and ``time/scoring_s``."""
        timings = {} if timings is None else timings
        s, need = self.select, needs(self.select.mode)
        if not need:
            return RoundScores(Candidates(ids), [], {})
        with timed(timings, "time/candidate_rollouts_s"):
            cand, survive = candidate_rollouts(
                chunk, self.rollout, s, self.seed, round_, self.sample
            )
        self.stage_done("rollouts", round_)
        zv = cand.zero_variance()
        metrics = candidate_metrics(cand, survive)
        if "gradients" not in need:
            warn_clipped({"candidate": cand}, self.rollout.max_new_tokens)
            return RoundScores(Candidates(ids, cand.pass_rates(), zv), [cand], metrics)
        val_seed = round_seed(self.seed, round_, Stream.VALIDATION)
        with timed(timings, "time/validation_rollouts_s"):
            val = self.sample(self.validation, self.rollout.k_v, val_seed, "validation rollouts")
        warn_clipped({"candidate": cand, "validation": val}, self.rollout.max_new_tokens)
        metrics |= validation_metrics(val)
        with timed(timings, "time/scoring_s"):
            al, split, features = _gradient_scores(
                self.model, self.tokenizer, cand, val, s, self.seed, self.optimizer, self.bar
            )
        self.stage_done("scoring", round_)
        metrics["val/split_half_cos"] = split
        if split <= 0:  # NaN (a half without gradient) compares False: nothing to say
            warnings.warn(
                f"split-half validation cosine {split:+.3f}: the two halves of the validation "
                "set pull in opposite directions, so this round's g^_V is no direction to "
                "select by (a larger validation set, or `gradalign diagnose` on this model "
                "and data)",
                SelectionWarning,
                stacklevel=2,
            )
        metrics["score/cos_mean"] = float(np.mean(al.cos_val))  # NaN: a non-finite gradient
        metrics["score/val_norm"] = al.val_norm
        cands = Candidates(
            ids, cand.pass_rates(), zv, al.dot_val, al.dot_chunk, al.norm, val_norm=al.val_norm
        )
        return RoundScores(cands, [cand, val], metrics, features)


def candidate_metrics(cand: Rollouts, survive: np.ndarray | None) -> dict[str, Any]:
    """The chunk's ``select/chunk_*`` and ``rollouts/*`` metrics (``select/stopped_frac``
    for ``select.budget=halving``)."""
    metrics: dict[str, Any] = {
        "select/chunk_pass_rate": float(cand.pass_rates().mean()),
        "select/chunk_zero_variance_frac": float(cand.zero_variance().mean()),
        "rollouts/bad_rewards": cand.bad_rewards,  # failed or non-finite, scored 0
        "rollouts/candidates": len(cand.rewards),
        "rollouts/clipped_frac": clipped_share(cand),
    }
    if survive is not None:
        metrics["select/stopped_frac"] = float(1 - survive.mean())
    return metrics


def validation_metrics(val: Rollouts) -> dict[str, Any]:
    """The round's ``rollouts/validation`` and ``val/*`` metrics of the validation rollouts."""
    return {
        "rollouts/validation": len(val.rewards),
        "val/pass_rate": float(val.rewards.mean()),
        "val/bad_rewards": val.bad_rewards,
        "val/zero_variance_frac": float(val.zero_variance().mean()),
        "val/clipped_frac": clipped_share(val),
    }


def clipped_share(ro: Rollouts) -> float:
    """The share of `ro`'s completions that hit the length limit without EOS."""
    return ro.clipped / len(ro.completion_ids) if ro.completion_ids else 0.0


def clipped_message(shares: dict[str, float], max_new_tokens: int) -> str | None:
    """One warning for the stages ({"candidate": share, ...}) whose rollouts were mostly cut
    off at `max_new_tokens` (share > `CLIPPED_WARN`), or None."""
    over = [f"{share:.0%} of the {what} rollouts" for what, share in shares.items()]
    over = [text for text, share in zip(over, shares.values()) if share > CLIPPED_WARN]
    if not over:
        return None
    return (
        f"{' and '.join(over)} hit rollout.max_new_tokens={max_new_tokens} before ending: "
        "answers are cut off before the reward reads them; raise rollout.max_new_tokens (its "
        "default of 12 is sized for the built-in tasks; real models need hundreds of tokens)"
    )


def warn_clipped(stages: dict[str, Rollouts], max_new_tokens: int) -> None:
    message = clipped_message({k: clipped_share(v) for k, v in stages.items()}, max_new_tokens)
    if message is not None:
        warnings.warn(message, SelectionWarning, stacklevel=3)


def candidate_rollouts(
    chunk: Sequence[Item],
    rollout: RolloutConfig,
    s: SelectConfig,
    seed: int,
    round_: int,
    sample: Sample,
) -> tuple[Rollouts, np.ndarray | None]:
    """The chunk's candidate rollouts under ``s.budget`` and, for `halving`, the survivors
    (bool [P], `budget.halving_rollouts`): `full` gives every candidate k_r rollouts."""
    if s.budget == "halving":
        return halving_rollouts(chunk, rollout.k_r, s.k_r0, seed, round_, sample)
    cand_seed = round_seed(seed, round_, Stream.CANDIDATES)
    return sample(chunk, rollout.k_r, cand_seed, "candidate rollouts"), None


def _gradient_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    cand: Rollouts,
    val: Rollouts,
    s: SelectConfig,
    seed: int,
    optimizer: torch.optim.Optimizer | None,
    bar: Bar,
) -> tuple[GroupAlignment, float, np.ndarray | None]:
    """<g_p, g^_V>, <g_p, g^_C> (mode `align` only) and ||g_p|| of every candidate group, with
    the batched scorer or the exact reference; the split-half validation cosine; optional
    projection features [P, project_dim]."""
    sharded.reshard(model)  # FSDP2: the root's weights back into shards after generation
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    cand_batch = cand.to_batch(pad, s.scale_advantages).to(device)
    val_batch = val.to_batch(pad, s.scale_advantages).to(device)
    if s.features == "output":
        model.eval()
        with bar("scoring", cand.num_groups) as advance:
            return (*output_scores(model, cand_batch, val_batch, s, seed, advance), None)
    params = scored_parameters(model, s.params)
    s = replace(s, groups_per_micro=micro_groups(model, params, s, cand_batch, val_batch))
    exp_avg_sq = None
    if s.precondition == "adam" and optimizer is not None and optimizer.state:
        exp_avg_sq = precondition.adam_exp_avg_sq(optimizer, params)  # none before the 1st step
    model.eval()
    if sharded.is_sharded(model):  # train.fsdp: the directions sharded too (docs/fsdp.md)
        return _sharded_scores(model, params, cand_batch, val_batch, s, seed, exp_avg_sq, bar)
    with bar("scoring", cand.num_groups) as advance:
        direction, split = direction_with_split_half(model, params, val_batch, s)
        al = group_alignment(model, params, cand_batch, direction, s, exp_avg_sq, advance)
    features = None
    if s.project_dim:
        features = dd.distributed_projected_gradients(
            model, params, cand_batch, s.project_dim, seed, s.groups_per_micro, exp_avg_sq
        )
    return al, split, features


def micro_groups(
    model: torch.nn.Module, params: list | None, s: SelectConfig, *batches: SequenceBatch
) -> int:
    """``select.groups_per_micro``, or when it is 0 the groups per micro-batch that the
    scored blocks' activations allow at these batches' rows per group and padded length
    (`micro.groups_per_micro`; `params` None: output features)."""
    if s.groups_per_micro > 0:  # set, or resolved already by the caller
        return s.groups_per_micro
    live = [b for b in batches if b.num_groups]
    rows = max((int(torch.bincount(b.group).max()) for b in live), default=1)
    length = max((int(b.input_ids.shape[1]) for b in live), default=1)
    return micro.groups_per_micro(model, params, rows, length, s.groups_per_micro)


def _sharded_scores(
    model: torch.nn.Module,
    params: list,
    cand_batch: SequenceBatch,
    val_batch: SequenceBatch,
    s: SelectConfig,
    seed: int,
    exp_avg_sq: dict | None,
    bar: Bar,
) -> tuple[GroupAlignment, float, np.ndarray | None]:
    """`_gradient_scores` of an FSDP2-sharded policy (`scoring.sharded`): batched only."""
    sharded.refuse_exact(model, s.scorer)
    with bar("scoring", cand_batch.num_groups) as advance:
        al, split = sharded.round_alignment(
            model, params, cand_batch, val_batch, s.val_aggregate, s.groups_per_micro,
            s.mode == "align", exp_avg_sq, advance,
        )  # fmt: skip
    features = None
    if s.project_dim:
        features = sharded.projected_gradients(
            model, params, cand_batch, s.project_dim, seed, s.groups_per_micro, exp_avg_sq
        )
    return al, split, features


def output_scores(
    model: torch.nn.Module,
    cand_batch: SequenceBatch,
    val_batch: SequenceBatch,
    s: SelectConfig,
    seed: int,
    advance: Progress,
) -> tuple[GroupAlignment, float]:
    """``select.features=output``: dot_val, dot_chunk (mode `align`) and norm of every
    candidate's LM-head gradient feature against the validation set's (`output_features`,
    seeded by `seed` when projected), and the split-half cosine of the feature."""
    feature = output_features.HeadFeature(parse_output_dims(s.output_dims), seed)
    s = replace(s, groups_per_micro=micro_groups(model, None, s, cand_batch, val_batch))
    a, b = output_features.distributed_feature_halves(
        model, val_batch, split_halves(val_batch.num_groups), feature, s.val_aggregate,
        s.groups_per_micro,
    )  # fmt: skip
    direction = unit_pieces([x + y for x, y in zip(a, b)])
    al = output_features.distributed_feature_alignment(
        model, cand_batch, direction, feature, s.groups_per_micro, s.mode == "align", advance
    )
    return al, split_half_cosine(a, b)


def direction_with_split_half(
    model: torch.nn.Module, params: list, val_batch: SequenceBatch, s: SelectConfig
) -> tuple[Direction, float]:
    """The round's g^_V = unit(g_V) (``s.val_aggregate``) and the split-half cosine
    cos(g_V(even positions), g_V(odd positions)) (`diagnostics.split_halves`; NaN when a half has
    no gradient). g_V is computed as the sum of its two halves, so the cosine costs no
    extra backward: flat [D] with the exact scorer, pieces (summed over ranks' shards) with
    the batched one."""
    halves = split_halves(val_batch.num_groups)
    a: Direction
    b: Direction
    direction: Direction
    if s.scorer == "exact":
        a, b = (
            alignment.validation_sum(model, params, val_batch.take_groups(h), s.val_aggregate)
            if len(h)
            else torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
            for h in halves
        )
        direction = alignment.unit(a + b)
    else:
        gpm = micro_groups(model, params, s, val_batch)
        a, b = dd.distributed_validation_halves(
            model, params, val_batch, halves, s.val_aggregate, gpm
        )
        direction = unit_pieces([x + y for x, y in zip(a, b)])
    return direction, split_half_cosine(a, b)


def split_half_cosine(a: Direction, b: Direction) -> float:
    """cos(a, b) of the two halves' gradients; NaN when either is zero (a half whose every
    group had equal rewards, or an empty half: one validation problem)."""
    cos = cosine(a, b)
    return cos if cos != 0.0 or direction_norm(a) * direction_norm(b) > 0 else math.nan


def group_alignment(
    model: torch.nn.Module,
    params: list,
    cand_batch: SequenceBatch,
    direction: Direction,
    s: SelectConfig,
    exp_avg_sq: dict | None,
    advance: Progress,
) -> GroupAlignment:
    """dot_val, dot_chunk (mode `align` only) and norm of every candidate group against
    `direction`: the exact reference (one backward per group) or the batched scorer (each rank
    scoring its shard of the groups); LESS-preconditioned with `exp_avg_sq`."""
    chunk = s.mode == "align"
    if s.scorer == "exact" and exp_avg_sq is not None:
        return precondition.exact_preconditioned_alignment(
            model, params, cand_batch, direction, exp_avg_sq
        )
    if s.scorer == "exact":
        assert isinstance(direction, torch.Tensor)
        return alignment.exact_alignment(model, params, cand_batch, direction, advance, chunk)
    gpm = micro_groups(model, params, s, cand_batch)
    return dd.distributed_group_alignment(
        model, params, cand_batch, list(direction), gpm, chunk, exp_avg_sq, advance
    )


def select_chunk(
    scored: RoundScores, s: SelectConfig, seed: int, round_: int, pool_ids: np.ndarray
) -> Selection:
    """The round's selection under ``s.mode``, random choices seeded by `round_seed(seed,
    round_, Stream.SELECT)`. Mode `none` selects the whole pool (`pool_ids`): plain GRPO. A
    selection left empty (``zero_variance=exclude`` with every group zero-variance, or every
    input non-finite) falls back to the whole chunk in chunk order, with ``fallback``
    "empty_selection" and a `SelectionWarning`: the loop and the TRL callback both train on it."""
    rng = np.random.default_rng(round_seed(seed, round_, Stream.SELECT))
    sel = select(s.mode, scored.candidates, s.n_select, rng, s.zero_variance)
    if s.mode == "none":
        return Selection(np.asarray(pool_ids), sel.scores)
    if len(sel.ids) == 0:
        ids = scored.candidates.ids
        warnings.warn(
            f"selection mode '{s.mode}' left none of the {len(ids)} candidates "
            f"(select.zero_variance={s.zero_variance}); training on the whole chunk instead",
            SelectionWarning,
            stacklevel=2,
        )
        return replace(sel, ids=np.array(ids, copy=True), fallback="empty_selection")
    return sel


def selection_metrics(
    chosen: Sequence[int] | np.ndarray,
    cand: Candidates,
    sel: Selection,
    problems: Sequence[Problem] | None = None,
) -> dict[str, Any]:
    """The ``select/*`` metrics of the chosen ids; with the chosen `problems` (same order),
    also their source mix and, for a built-in regime's problems (no file: only they carry
    such labels), the shares the regime made corrupted or low-utility."""
    out: dict[str, Any] = {"select/n": len(chosen)}
    if problems is not None:
        mix: dict[str, int] = {}
        for p in problems:
            mix[p.source] = mix.get(p.source, 0) + 1
        out["select/source_mix"] = mix
    out |= {
        "select/excluded": sel.excluded,
        "select/skipped_nonfinite": sel.skipped_nonfinite,
        "select/fallback": sel.fallback,
    }
    if cand.pass_rate is not None and len(chosen):
        pos = {int(i): j for j, i in enumerate(cand.ids)}
        out["select/pass_rate"] = float(np.mean([cand.pass_rate[pos[int(i)]] for i in chosen]))
    if problems is not None and all(p.meta.get("file") is None for p in problems):
        n = max(len(problems), 1)
        out["select/corrupted_share"] = sum(bool(p.meta.get("corruption")) for p in problems) / n
        out["select/low_utility_share"] = sum(bool(p.meta.get("utility")) for p in problems) / n
    return out
