"""`gradalign diagnose`: can gradient alignment select well for this model and data?

On the starting policy, without training, the first `chunks` chunks of the pool are scored
as a run's first rounds would score them (`round_scoring.ChunkScorer`, the loop's path, with
the `sim` score whatever `select.mode` says), and the measures of `core.diagnostics` are
read off:

- split-half validation cosine: cos(g_V(even positions), g_V(odd ones)) per chunk. <= 0: the
  validation set pulls two ways and g^_V is no direction;
- transfer cosine: cos(sum g_p, sum g_p') between the GRPO gradients of the two halves of a
  chunk's candidates with reward variance (only the clean ones when the pool records its
  corruption): whether different problems' gradients share a direction at all;
- the distribution of candidate cosines cos(g_p, g^_V), the zero-variance share (groups with
  no gradient to rank), the mean cosine per source and per regime label;
- for built-in regimes, the AUC of the cosine for clean above corrupted or filler problems
  among groups with reward variance, per chunk and over the chunks pooled;
- the pass rates of the chunk and of the validation set, and the share of rollouts cut off at
  ``rollout.max_new_tokens``: they say *why* when there is nothing to rank (answers cut off,
  a set too hard or too easy for the policy).

The verdict's thresholds are rules of thumb from the built-in testbed (docs/testbed.md): there,
a warm start that shares a direction with the reward gives split-half +0.36…+0.60, transfer
+0.99 and AUC 0.78–0.87; one fitted to exactly what the reward checks gives −0.25, −0.14 and
AUC 0.50–0.59.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from gradalign.config import Config
from gradalign.core.diagnostics import cosine, mean_by, selection_auc, split_halves
from gradalign.core.selection import RULES, SelectionWarning, score_sim
from gradalign.data.problems import ChunkSchedule, Problem
from gradalign.engine.round_scoring import ChunkScorer, RoundScores, micro_groups
from gradalign.progress import bar, log

SPLIT_OK = 0.2  # split-half validation cosine above which g^_V is a usable direction
CLIPPED_MAX = 0.5  # share of rollouts cut off at max_new_tokens above which rewards mean little
SOLVED_NONE, SOLVED_ALL = 0.05, 0.95  # pass rates at which a set is too hard / too easy
TRANSFER_OK = 0.3  # the testbed's transfer gate
AUC_OK, AUC_WEAK = 0.75, 0.6
ZERO_VARIANCE_MAX = 0.9  # above it almost nothing has a gradient to rank
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def label(p: Problem) -> str:
    """What a built-in regime made of a problem (its `meta` corruption or utility, e.g.
    "coinflip", "garbled"), or "clean"."""
    return str(p.meta.get("corruption") or p.meta.get("utility") or "clean")


def diagnose(cfg: Config, chunks: int = 4) -> dict[str, Any]:
    """Score the first `chunks` chunks of cfg's pool on the starting policy; the measures and
    the verdict as a JSON-ready dict."""
    from gradalign.run.setup import build_setup

    s = cfg.select if RULES[cfg.select.mode].uses_validation else None
    s = s or dataclasses.replace(cfg.select, mode="sim")
    cfg = dataclasses.replace(cfg, select=s)
    setup = build_setup(cfg)
    pool = setup.sets.pool
    schedule = ChunkSchedule(len(pool), s.chunk_size, cfg.seed)
    n = min(chunks, schedule.chunks_per_pass)
    scorer = ChunkScorer(
        setup.model, setup.tokenizer, setup.sets.validation, cfg.rollout, s, cfg.seed,
        setup.sample, bar=bar,
    )  # fmt: skip
    per_chunk = []
    for r in range(n):
        chunk = [pool[i] for i in schedule.chunk(r)]
        log(f"diagnose: chunk {r + 1}/{n} ({len(chunk)} candidates)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SelectionWarning)
            scored = scorer.score(chunk, np.array([p.id for p in chunk]), r)
        for w in caught:
            log(f"warning: chunk {r + 1}: {w.message}")
        per_chunk.append(_chunk_measures(setup, chunk, scored))
    return summarise(per_chunk, cfg, n)


def _chunk_measures(setup: Any, chunk: list[Problem], scored: RoundScores) -> dict[str, Any]:
    c = scored.candidates
    cos = score_sim(c)  # cos(g_p, g^_V), as mode `sim` ranks
    assert c.zero_variance is not None  # mode sim computed the rollouts
    eligible = ~c.zero_variance
    labels = [label(p) for p in chunk]
    return {
        "cos": cos,
        "eligible": eligible,
        "sources": [p.source for p in chunk],
        "labels": labels,
        "split_half_cos": scored.metrics["val/split_half_cos"],
        "transfer_cos": _transfer(setup, scored, eligible, labels),
        "chunk_pass_rate": scored.metrics["select/chunk_pass_rate"],
        "val_pass_rate": scored.metrics["val/pass_rate"],
        "clipped_share": scored.metrics["rollouts/clipped_frac"],
        "val_clipped_share": scored.metrics["val/clipped_frac"],
    }


def _transfer(setup: Any, scored: RoundScores, eligible: np.ndarray, labels: list[str]) -> float:
    """cos of the summed GRPO gradients of the two halves of the chunk's eligible (clean,
    where labelled) candidates; NaN with fewer than 2 such candidates."""
    from gradalign.engine.policy import scored_parameters
    from gradalign.scoring import distributed as dd

    keep = [j for j in range(len(labels)) if eligible[j] and labels[j] == "clean"]
    if len(keep) < 2:
        return math.nan
    s = setup.cfg.select
    batch = scored.rollouts[0].to_batch(setup.tokenizer.pad_token_id, s.scale_advantages)
    batch = batch.take_groups(keep).to(next(setup.model.parameters()).device)
    halves = split_halves(len(keep))
    params = None if s.features == "output" else scored_parameters(setup.model, s.params)
    s = dataclasses.replace(s, groups_per_micro=micro_groups(setup.model, params, s, batch))
    if s.features == "output":  # the transfer cosine of the feature that is scored
        from gradalign.core.common import parse_output_dims
        from gradalign.scoring.output_features import HeadFeature, distributed_feature_halves

        feature = HeadFeature(parse_output_dims(s.output_dims), setup.cfg.seed)
        a, b = distributed_feature_halves(
            setup.model, batch, halves, feature, "sum", s.groups_per_micro
        )
        return cosine(a, b)
    assert params is not None
    a, b = dd.distributed_validation_halves(
        setup.model, params, batch, halves, "sum", s.groups_per_micro
    )
    return cosine(a, b)


def summarise(per_chunk: list[dict[str, Any]], cfg: Config, n: int) -> dict[str, Any]:
    """The measures over all diagnosed chunks (`per_chunk` from `_chunk_measures`) and the
    verdict. Pure: tested on hand-made chunks."""
    cos = np.concatenate([c["cos"] for c in per_chunk])
    eligible = np.concatenate([c["eligible"] for c in per_chunk])
    sources = [x for c in per_chunk for x in c["sources"]]
    labels = [x for c in per_chunk for x in c["labels"]]
    ok = eligible & np.isfinite(cos)
    picked = cos[ok]
    labelled = any(x != "clean" for x in labels)
    out: dict[str, Any] = {
        "model": cfg.model.name,
        "data": data_label(cfg),
        "chunks": n,
        "candidates": len(cos),
        "k_r": cfg.rollout.k_r,
        "k_v": cfg.rollout.k_v,
        "split_half_cos": [c["split_half_cos"] for c in per_chunk],
        "transfer_cos": [c["transfer_cos"] for c in per_chunk],
        "zero_variance_share": float(1 - eligible.mean()) if len(eligible) else math.nan,
        "cos_quantiles": {f"q{int(q * 100)}": float(np.quantile(picked, q)) for q in QUANTILES}
        if len(picked)
        else {},
        "cos_positive_share": float((picked > 0).mean()) if len(picked) else math.nan,
        "cos_by_source": mean_by(np.where(ok, cos, np.nan), sources),
        "cos_by_label": mean_by(np.where(ok, cos, np.nan), labels) if labelled else {},
        "auc_clean": None,
        "auc_clean_per_chunk": [],
        "max_new_tokens": cfg.rollout.max_new_tokens,
    }
    for key in ("chunk_pass_rate", "val_pass_rate", "clipped_share", "val_clipped_share"):
        out[key] = _mean([c.get(key, math.nan) for c in per_chunk])
    if labelled:
        out["auc_clean_per_chunk"] = [_auc(c["cos"], c["labels"], c["eligible"]) for c in per_chunk]
        out["auc_clean"] = _auc(cos, labels, eligible)
    out["verdict"] = verdict(out)
    return out


def data_label(cfg: Config) -> str:
    """What the pool is: its files' paths, or the built-in regime."""
    files = cfg.data.pool_files
    if not files:
        return f"the built-in {cfg.data.regime} regime"
    return ", ".join(str(f.get("path", "?")) if isinstance(f, dict) else str(f) for f in files)


def _auc(cos: np.ndarray, labels: list[str], eligible: np.ndarray) -> float | None:
    auc = selection_auc(cos, np.array([x == "clean" for x in labels]), eligible)
    return None if math.isnan(auc) else auc


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def verdict(d: dict[str, Any]) -> str:
    """One line: can alignment select here, and if not, what stands in the way."""
    split, transfer = _mean(d["split_half_cos"]), _mean(d["transfer_cos"])
    zv, auc = d["zero_variance_share"], d["auc_clean"]
    shares = (d.get("clipped_share"), d.get("val_clipped_share"))
    clipped = max((x for x in shares if x is not None and math.isfinite(x)), default=0.0)
    if clipped > CLIPPED_MAX:  # the cause of what follows: rewards of cut-off answers
        return (
            f"no: {clipped:.0%} of the rollouts hit rollout.max_new_tokens="
            f"{d.get('max_new_tokens')} before ending, so answers are cut off before the reward "
            "reads them; raise rollout.max_new_tokens (real models need hundreds of tokens)"
        )
    if zv > ZERO_VARIANCE_MAX:
        return (
            f"no: {zv:.0%} of the candidates got the same reward in all {d['k_r']} rollouts, "
            f"so almost nothing has a gradient to rank ({_too('pool', d.get('chunk_pass_rate'))}; "
            "raise rollout.k_r or change the pool)"
        )
    if math.isnan(split):
        return (
            "no: the validation rollouts give no direction (in every diagnosed chunk a half of "
            "the validation set got equal rewards in all its rollouts): "
            f"{_too('validation set', d.get('val_pass_rate'))}, or more rollouts (rollout.k_v)"
        )
    if split <= 0:
        return (
            f"no: the two halves of the validation set pull in opposite directions (split-half "
            f"cosine {split:+.2f}), so g^_V is no direction to select by (a larger validation "
            "set, or a policy whose RL gradients share a direction)"
        )
    if math.isfinite(transfer) and transfer < TRANSFER_OK:
        why = (
            f"different problems' gradients barely share a direction (transfer cosine "
            f"{transfer:+.2f} < {TRANSFER_OK})"
        )
        if auc is None or auc < AUC_OK:
            return f"unlikely: {why}: RL on one problem does little for another"
    if auc is not None:
        if auc >= AUC_OK:
            return f"yes: the GradAlign score ranks clean above corrupted problems (AUC {auc:.2f})"
        if auc >= AUC_WEAK:
            return (
                "weak: the GradAlign score separates clean from corrupted only partly "
                f"(AUC {auc:.2f})"
            )
        return f"no: the GradAlign score does not separate clean from corrupted (AUC {auc:.2f})"
    if split >= SPLIT_OK:
        return (
            f"likely: the validation halves agree (split-half cosine {split:+.2f}) and "
            f"problems share a direction (transfer {transfer:+.2f}); whether bad problems score "
            "low needs labelled data (a built-in regime) to measure"
        )
    return (
        f"weak: the validation halves agree only a little (split-half cosine {split:+.2f} < "
        f"{SPLIT_OK}): g^_V is a noisy direction; a larger validation set or more rollouts "
        "(rollout.k_v) sharpen it"
    )


def _too(what: str, pass_rate: float | None) -> str:
    """What to change about a set whose groups got equal rewards, by its pass rate: one the
    policy solves (almost) never needs an easier set or a stronger start, one it (almost)
    always solves a harder set."""
    if pass_rate is None or not math.isfinite(pass_rate):
        return f"the {what} is too easy or too hard for this policy"
    if pass_rate <= SOLVED_NONE:
        return (
            f"the policy solves almost none of the {what} (pass rate {pass_rate:.2f}): an "
            f"easier {what} or a stronger starting policy"
        )
    if pass_rate >= SOLVED_ALL:
        return f"the policy solves almost all of the {what} (pass rate {pass_rate:.2f}): a harder {what}"
    return f"the {what}'s pass rate is {pass_rate:.2f}: a larger {what}"
