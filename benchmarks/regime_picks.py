"""Benchmark: what each mode picks in a run's first rounds, per regime, on the starting policy.

For each seed (run seed = data seed, so the pool, corruption, validation and eval sets vary)
the first `--chunks` chunks are scored on the untrained policy as a run's first rounds score
them (`round_scoring.ChunkScorer`, the loop's path), and every `--modes` mode selects from the
same scores (`select_chunk`). Per chunk:

- share: of the n picks, the share that is coin-flip (noisy), from the minority family
  (imbalance) or garbled filler (lowutility); and the best share any selector could reach in
  that chunk: lowutility max(0, n − clean candidates) / n, imbalance min(n, minority
  candidates) / n;
- variance: the share of the chunk's candidates with reward variance, for the minority and
  the majority apart (imbalance: a preference for the minority must not come from the
  majority having nothing left to learn);
- overlap: |top-n of `sim` ∩ top-n of `sim` from other rollout seeds| / n on the same chunk
  and policy (a high rank correlation can hide a small top-set overlap), and the AUC of
  `sim` for clean above bad problems among groups with reward variance.

Every figure is a mean over seeds × chunks with its 95% CI (Student t over seeds of the
per-seed means). The round-1 figure is chunk 1's; later chunks show the same policy's view of
other problems, not the learning curve (that is `gradalign bench regimes`).

    .venv/bin/python benchmarks/regime_picks.py --regime imbalance --seeds 5 --chunks 2 \\
        --set data.families=[addition,countdown2] --set data.minority=countdown2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.analysis.runs import mean_ci
from gradalign.config import load_config
from gradalign.core.diagnostics import selection_auc
from gradalign.data.problems import ChunkSchedule
from gradalign.engine.round_scoring import ChunkScorer, select_chunk
from gradalign.run.artifacts import is_bad

RESAMPLE = 10_000  # rollout seed offset of the second scoring of the same chunk


def bad_of(p: Any, regime: str, minority: str) -> bool:
    """The problems whose share of the picks the regime reports."""
    return p.source == minority if regime == "imbalance" else is_bad(p)


def chunk_rows(setup: Any, cfg: Any, r: int, modes: list[str], resample: bool) -> dict:
    pool = setup.sets.pool
    chunk = [pool[i] for i in ChunkSchedule(len(pool), cfg.select.chunk_size, cfg.seed).chunk(r)]
    ids = np.array([p.id for p in chunk])
    regime, minority = cfg.data.regime, cfg.data.minority
    flag = np.array([bad_of(p, regime, minority) for p in chunk])

    def scored_with(seed: int):
        scorer = ChunkScorer(
            setup.model, setup.tokenizer, setup.sets.validation, cfg.rollout, cfg.select,
            seed, setup.sample,
        )  # fmt: skip
        return scorer.score(chunk, ids, r)

    scored = scored_with(cfg.seed)
    n = cfg.n_select
    out: dict[str, Any] = {"n": n}
    for mode in modes:
        name, _, zero = mode.partition(":")  # "sim:last": sim with select.zero_variance=last
        s = dataclasses.replace(
            cfg.select, mode=name, zero_variance=zero or cfg.select.zero_variance
        )
        sel = select_chunk(scored, s, cfg.seed, r, ids)
        picked = set(sel.ids.tolist())
        out[f"share/{mode}"] = float(
            np.mean([flag[j] for j, p in enumerate(chunk) if p.id in picked])
        )
        if mode == "sim":
            sim_ids = picked
            eligible = ~scored.candidates.zero_variance
            if regime != "imbalance":
                out["auc_sim"] = selection_auc(sel.scores, ~flag, eligible)
    zv = scored.candidates.zero_variance
    out["variance/flagged"] = float(np.mean(~zv[flag])) if flag.any() else math.nan
    out["variance/other"] = float(np.mean(~zv[~flag])) if (~flag).any() else math.nan
    out["pool_share"] = float(flag.mean())
    if regime == "lowutility":  # the fewest filler picks any selector can make
        out["best_share"] = max(0, n - int((~flag).sum())) / n
    if regime == "imbalance":  # the most minority picks any selector can make
        out["best_share"] = min(n, int(flag.sum())) / n
    out["split_half"] = scored.metrics.get("val/split_half_cos", math.nan)
    if resample:
        again = select_chunk(scored_with(cfg.seed + RESAMPLE), cfg.select, cfg.seed, r, ids)
        out["overlap_sim"] = len(sim_ids & set(again.ids.tolist())) / n
    return out


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def summary(rows: dict[int, list[dict]]) -> dict[str, Any]:
    keys = sorted({k for chunks in rows.values() for c in chunks for k in c if k != "n"})
    res = {}
    for key in keys:
        per_seed = [_nanmean([c.get(key, math.nan) for c in chunks]) for chunks in rows.values()]
        mean, half, _ = mean_ci([x for x in per_seed if not math.isnan(x)])
        res[key] = {"mean": mean, "ci95": half, "per_seed": per_seed}
    first = {}
    for key in keys:
        per_seed = [chunks[0].get(key, math.nan) for chunks in rows.values()]
        mean, half, _ = mean_ci([x for x in per_seed if not math.isnan(x)])
        first[key] = {"mean": mean, "ci95": half, "per_seed": per_seed}
    return {"all_chunks": res, "round1": first}


def main() -> None:
    from gradalign.run.setup import build_setup

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--regime", required=True, choices=["noisy", "imbalance", "lowutility"])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument(
        "--modes",
        default="sim,accgreedy,rand,dot,simacc",
        help="modes to select with from the same scores; MODE:Z sets select.zero_variance=Z",
    )
    ap.add_argument("--no-resample", action="store_true", help="skip the overlap measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if "sim" not in modes:
        modes = ["sim", *modes]
    rows: dict[int, list[dict]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        cfg = load_config(
            None,
            [*args.overrides, f"data.regime={args.regime}", f"seed={seed}", f"data.seed={seed}"],
        )
        setup = build_setup(cfg)
        rows[seed] = [
            chunk_rows(setup, cfg, r, modes, not args.no_resample) for r in range(args.chunks)
        ]
        first = rows[seed][0]
        print(
            f"seed {seed}: round 1 "
            + "  ".join(f"{m} {first[f'share/{m}']:.0%}" for m in modes)
            + f"  overlap {first.get('overlap_sim', math.nan):.2f}"
            + f"  variance flagged/other {first['variance/flagged']:.0%}/{first['variance/other']:.0%}"
            + f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    res = summary(rows)
    for part in ("round1", "all_chunks"):
        print(f"== {part} (mean ± 95% CI over {args.seeds} seeds)")
        for key, v in res[part].items():
            mean = "n/a" if v["mean"] is None else f"{v['mean']:.3f}"
            ci = "" if v["ci95"] is None else f" ± {v['ci95']:.3f}"
            print(f"  {key:<22} {mean}{ci}   per seed {[round(x, 3) for x in v['per_seed']]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "rows": rows, **res},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
