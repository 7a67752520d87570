"""Benchmark: selection quality against scoring rollouts, full budget and cheaper strategies.

On the built-in testbed (noisy regime: half of the pool has a coin-flip reward), for each
strategy side by side in one run, over several seeds (run seed = data seed, so the pool
varies; one warm start, shared through the cache):

1. on the starting policy (no training), the first `--chunks` chunks of each seed's pool are
   scored and selected as a run's first rounds would be (`round_scoring.ChunkScorer` and
   `select_chunk`, the loop's path), and per chunk:
   - rollouts: candidate + validation rollouts generated (``rollouts/candidates`` +
     ``rollouts/validation``), and its ratio to the full budget's;
   - AUC: P(score of a clean problem > score of a coin-flip one), ties 1/2, over the whole
     chunk (zero-variance groups included with their score: what the ranking sees), and
     ``select/auc_clean`` (groups with reward variance only, as a run logs it);
   - corrupt: coin-flip share of the n selected;
   - overlap: |selected ∩ selected by the full budget| / n on the same chunk and policy;
     the row `full (resampled)` is the full budget with other rollout seeds, i.e. how much
     two full-budget selections agree by themselves;
2. `--rounds` rounds of training per strategy and seed (`gradalign run`'s loop): the change
   of sampled mean@k on the eval set, the per-round scoring rollouts, and the selection
   overhead (candidate + validation rollouts + scoring + selection time) / training time
   from the run's ``time/*`` totals.

Every figure is a mean over seeds (chunks pooled) with its 95% CI; each strategy's ratio to
`full` is printed beside it. On a CPU shared with other jobs, times are noisy; rollout counts,
AUC, overlap and accuracy are exact functions of the seeds.

    .venv/bin/python benchmarks/selection_budget.py --seeds 3 --chunks 4 --rounds 5

`--set` overrides every run's config: pass the testbed recipe (``--set
data.families=[addition,countdown] --set model.warmstart_family_flaws=[]``) to reproduce
the documented figures whatever the defaults become.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.analysis.runs import mean_ci
from gradalign.config import Config, load_config
from gradalign.core.diagnostics import selection_auc
from gradalign.data.problems import ChunkSchedule
from gradalign.engine.round_scoring import ChunkScorer, select_chunk
from gradalign.run.artifacts import is_bad, selection_quality

STRATEGIES: dict[str, list[str]] = {
    "full": [],
    "halving k_r0=2": ["select.budget=halving", "select.k_r0=2"],
    "halving k_r0=4": ["select.budget=halving", "select.k_r0=4"],
    "k_r=6": ["rollout.k_r=6"],
    "k_r=4": ["rollout.k_r=4"],
    "k_r=3": ["rollout.k_r=3"],
    "k_v=4": ["rollout.k_v=4"],
    "k_v=2": ["rollout.k_v=2"],
    "k_r=4 + k_v=4": ["rollout.k_r=4", "rollout.k_v=4"],
    "k_r=2 + k_v=4": ["rollout.k_r=2", "rollout.k_v=4"],
    "k_r=4 + k_v=2": ["rollout.k_r=4", "rollout.k_v=2"],
    "k_r=3 + k_v=2": ["rollout.k_r=3", "rollout.k_v=2"],
    "last:1": ["select.params=last:1"],  # scoring backward through the last block only
    "k_r=4 + k_v=2 + last:1": ["rollout.k_r=4", "rollout.k_v=2", "select.params=last:1"],
    # the LM head's gradient from the forward pass alone, exact and projected (64 x 128)
    "output exact": ["select.features=output"],
    "output 64x128": ["select.features=output", "select.output_dims=64x128"],
    "k_r=4 + k_v=4 + output": ["rollout.k_r=4", "rollout.k_v=4", "select.features=output"],
    "k_r=4 + k_v=2 + output": ["rollout.k_r=4", "rollout.k_v=2", "select.features=output"],
    "k_r=4 + k_v=2 + output 64x128": [
        "rollout.k_r=4",
        "rollout.k_v=2",
        "select.features=output",
        "select.output_dims=64x128",
    ],
    "k_r=3 + k_v=2 + output 64x128": [
        "rollout.k_r=3",
        "rollout.k_v=2",
        "select.features=output",
        "select.output_dims=64x128",
    ],
}
RESAMPLED = "full (resampled)"
SELECT_TIMES = (
    "time/candidate_rollouts_s",
    "time/validation_rollouts_s",
    "time/scoring_s",
    "time/selection_s",
)


def config(base: list[str], name: str, seed: int, extra: list[str] = ()) -> Config:  # type: ignore[assignment]
    overrides = STRATEGIES.get(name, [])
    return load_config(None, [*base, *overrides, f"seed={seed}", f"data.seed={seed}", *extra])


def chunk_measures(setup: Any, cfg: Config, r: int, rollout_seed: int) -> dict[str, Any]:
    """Score and select chunk r of cfg's pool on setup's (untrained) policy."""
    pool = setup.sets.pool
    chunk = [pool[i] for i in ChunkSchedule(len(pool), cfg.select.chunk_size, cfg.seed).chunk(r)]
    ids = np.array([p.id for p in chunk])
    scorer = ChunkScorer(
        setup.model, setup.tokenizer, setup.sets.validation, cfg.rollout, cfg.select,
        rollout_seed, setup.sample,
    )  # fmt: skip
    scored = scorer.score(chunk, ids, r)
    sel = select_chunk(scored, cfg.select, rollout_seed, r, ids)
    bad = np.array([is_bad(p) for p in chunk])
    picked = set(sel.ids.tolist())
    return {
        "rollouts": scored.metrics["rollouts/candidates"] + scored.metrics["rollouts/validation"],
        "auc": selection_auc(sel.scores, ~bad, np.ones(len(chunk), dtype=bool)),
        "auc_eligible": selection_quality(chunk, scored.candidates, sel)["select/auc_clean"],
        "corrupt": float(np.mean([is_bad(p) for p in chunk if p.id in picked])),
        "selected": picked,
    }


def starting_policy(base: list[str], seeds: list[int], chunks: int) -> dict[str, list[dict]]:
    """Part 1: every strategy on the same chunks of the same untrained policy."""
    from gradalign.run.setup import build_setup

    rows: dict[str, list[dict]] = {name: [] for name in [*STRATEGIES, RESAMPLED]}
    for seed in seeds:
        setup = build_setup(config(base, "full", seed))
        for r in range(chunks):
            full = None
            for name in [*STRATEGIES, RESAMPLED]:
                cfg = config(base, name, seed)
                setup.cfg = cfg  # the sampling settings `sample` reads
                rollout_seed = seed + 10_000 if name == RESAMPLED else seed
                m = chunk_measures(setup, cfg, r, rollout_seed)
                full = full or m["selected"]
                m["overlap"] = len(m.pop("selected") & full) / cfg.n_select
                rows[name].append(m)
            print(f"  seed {seed} chunk {r + 1}/{chunks} scored", flush=True)
    return rows


def training(
    base: list[str], seeds: list[int], rounds: int, out: Path
) -> dict[str, list[dict[str, float]]]:
    """Part 2: `rounds` rounds of the loop per strategy and seed."""
    from gradalign.run.loop import run
    from gradalign.storage import read_json

    rows: dict[str, list[dict[str, float]]] = {name: [] for name in STRATEGIES}
    for seed in seeds:
        for name in STRATEGIES:
            where = out / name.replace(" ", "_").replace("+", "") / f"seed{seed}"
            cfg = config(base, name, seed, [f"rounds={rounds}", f"out_dir={where}"])
            t0 = time.perf_counter()
            summary = run(cfg, restart=True)
            history = [read_json(d / "metrics.json") for d in sorted((where / "rounds").iterdir())]
            times = summary["time_totals"]
            rollouts = [
                m.get("rollouts/candidates", 0) + m.get("rollouts/validation", 0) for m in history
            ]
            rows[name].append(
                {
                    "d_mean_at_k": summary["final_eval_mean_at_k"]
                    - summary["initial_eval_mean_at_k"],
                    "rollouts": float(np.mean(rollouts)),
                    "overhead": sum(times.get(k, 0.0) for k in SELECT_TIMES)
                    / times["time/training_s"],
                    "auc_eligible": _mean(m.get("select/auc_clean") for m in history),
                    "corrupt": _mean(m.get("select/corrupted_share") for m in history),
                }
            )
            print(f"  {name}, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def _mean(values: Any) -> float:
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else math.nan


def cell(values: list[float], form: str = "{:.3f}") -> str:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    mean, half, _ = mean_ci(xs)
    if mean is None:
        return "-"
    return form.format(mean) + ("" if half is None else " ± " + form.replace("+", "").format(half))


def ratio(values: list[float], full: list[float]) -> str:
    a, b = _mean(values), _mean(full)
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "-"


def table(
    rows: dict[str, list[dict]], columns: list[tuple[str, str]], paired: list[str], title: str
) -> None:
    """Mean ± 95% CI of each column; for the `paired` keys, the difference to `full` on the
    same seed (and chunk) with its CI; the rollouts' ratio to `full`."""
    print(f"\n== {title} (mean ± 95% CI; Δ: paired difference to full)")
    names = [c for c, _ in columns] + [f"Δ{k}" for k in paired]
    print(f"{'strategy':20s}" + "".join(f"{c:>18s}" for c in names) + f"{'rollouts ×full':>16s}")
    forms = dict(columns)
    full = rows["full"]
    for name, ms in rows.items():
        line = f"{name:20s}"
        for key, form in columns:
            line += f"{cell([m[key] for m in ms], form):>18s}"
        for key in paired:
            diffs = [_diff(m[key], f[key]) for m, f in zip(ms, full)]
            line += f"{cell(diffs, forms[key].replace('{:.', '{:+.')):>18s}"
        line += f"{ratio([m['rollouts'] for m in ms], [m['rollouts'] for m in full]):>16s}"
        print(line)


def _diff(a: float | None, b: float | None) -> float:
    return math.nan if a is None or b is None else a - b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds (run seed = data seed): 0..N-1")
    ap.add_argument("--chunks", type=int, default=4, help="chunks scored on the starting policy")
    ap.add_argument("--rounds", type=int, default=5, help="training rounds per run (0: none)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    ap.add_argument("--out", type=Path, default=Path("runs/selection_budget"))
    ap.add_argument("--set", action="append", default=[], help="config override for all runs")
    args = ap.parse_args()
    keep = [s.strip() for s in args.strategies.split(",")]
    unknown = [k for k in keep if k not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown} (known: {', '.join(STRATEGIES)})")
    for name in list(STRATEGIES):
        if name not in keep and name != "full":
            del STRATEGIES[name]
    base = ["data.regime=noisy", "select.mode=sim", *args.set]
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    rows = starting_policy(base, seeds, args.chunks)
    columns = [("rollouts", "{:.0f}"), ("auc", "{:.3f}"), ("auc_eligible", "{:.3f}")]
    columns += [("corrupt", "{:.3f}"), ("overlap", "{:.3f}")]
    title = f"starting policy: {args.chunks} chunks x {len(seeds)} seeds"
    table(rows, columns, ["auc", "corrupt"], title)
    if args.rounds:
        trained = training(base, seeds, args.rounds, args.out)
        columns = [("rollouts", "{:.0f}"), ("d_mean_at_k", "{:+.3f}"), ("overhead", "{:.2f}")]
        columns += [("auc_eligible", "{:.3f}"), ("corrupt", "{:.3f}")]
        title = f"training: {args.rounds} rounds x {len(seeds)} seeds"
        table(trained, columns, ["d_mean_at_k", "overhead"], title)
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
