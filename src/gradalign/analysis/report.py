"""Report of a bench directory (or of one run directory: `analysis.run_report`) from what its
runs saved.

Reads ``config.yaml``, ``summary.json``, ``rounds/*/metrics.json`` and ``bench-run.json`` of
every run below the directory (nothing is re-run) and writes ``report/`` in it:

- ``report.md``: final greedy eval accuracy and final sampled mean@k per regime and mode,
  mean ± 95% CI over seeds, each with the paired difference to ``rand`` (same seed); the
  share of corrupted (noisy), minority-family (imbalance) and low-utility (lowutility)
  problems among those selected, per round and over all rounds; per round, the AUC of the
  mode's score for clean above corrupted or filler (``select/auc_clean``) and the split-half
  validation cosine; per-seed numbers; failed runs with their stderr tail;
- ``results.json``: the same numbers, per seed;
- ``accuracy.png`` (eval accuracy against cumulative GRPO steps, one panel per regime, mean
  over seeds with a CI band), ``shares.png`` (selected shares against round) and ``auc.png``
  (AUC against round), drawn by `gradalign.analysis.plots`.

CI: mean ± t_{0.975, n-1} · s / √n with s the sample standard deviation (n-1 in the
denominator); undefined ("n/a") for n = 1. Only finished runs (``summary.json``) count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gradalign.config import BENCH_FIELDS, LOCATION_FIELDS, differing_fields, flatten_config
from gradalign.core.selection import MODES
from gradalign.rundir import read_json, write_json, write_text

REGIME_ORDER = ("noisy", "imbalance", "lowutility", "clean")
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
        2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
        2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
        2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)  # fmt: skip
Z975 = 1.959964
PAPER_NOTE = (
    "Paper reference (Yang et al. 2026, arXiv 2602.21492, unreliable-reward regime): about "
    "18% (start) to 30% (step 100) of GradAlign's picks are corrupted, over 80% of AccGreedy's."
)
# share name -> (regime it is reported for, title, pool share from the run's config)
SHARES = {
    "corrupted": ("noisy", "corrupted problems", lambda d: d["corrupt_frac"]),
    "minority": ("imbalance", "minority-family problems", lambda d: 1 - d["majority_frac"]),
    "low_utility": ("lowutility", "low-utility (garbled) problems", lambda d: d["lowutility_frac"]),
}


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the two-sided 95% quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher, error < 1e-5 for df > 30
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, 95% CI half-width or None when n < 2, n)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return None, None, 0
    if len(x) == 1:
        return float(x[0]), None, 1
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()), half, len(x)


@dataclass
class Run:
    """What one run directory holds, as the report needs it."""

    path: str
    regime: str
    mode: str
    seed: int
    data_seed: int | None
    status: str  # done | failed | incomplete
    initial: float | None = None
    final: float | None = None
    steps: list[int] = field(default_factory=list)  # cumulative GRPO steps after each round
    accuracy: list[float] = field(default_factory=list)  # eval accuracy after each round
    shares: dict[str, list[float]] = field(default_factory=dict)  # per round, see SHARES
    auc: list[float | None] = field(default_factory=list)  # select/auc_clean per round
    split_half: list[float | None] = field(default_factory=list)  # val/split_half_cos per round
    initial_mean_at_k: float | None = None  # sampled eval mean@k before and after training
    final_mean_at_k: float | None = None
    pool_shares: dict[str, float] = field(default_factory=dict)  # the same in the pool
    train_rollouts: int | None = None  # GRPO steps × batch_size × num_generations
    wall_s: float | None = None
    returncode: int | None = None
    stderr_tail: str = ""
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # flattened config.yaml


def _round_shares(m: dict[str, Any], minority: str) -> dict[str, float]:
    out = {}
    if "select/corrupted_share" in m:
        out["corrupted"] = float(m["select/corrupted_share"])
    if "select/low_utility_share" in m:
        out["low_utility"] = float(m["select/low_utility_share"])
    mix, n = m.get("select/source_mix"), m.get("select/n")
    if mix is not None and n:
        out["minority"] = mix.get(minority, 0) / n
    return out


def load_run(path: Path) -> Run:
    """Read one run directory (finished, failed or incomplete)."""
    record = read_json(path / "bench-run.json") if (path / "bench-run.json").is_file() else {}
    cfg = {}
    if (path / "config.yaml").is_file():
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    data = cfg.get("data", {})
    files = bool(data.get("pool_files"))  # problem files: no regime, no corruption labels
    run = Run(
        path=str(path),
        regime="files" if files else data.get("regime", record.get("regime", "?")),
        mode=cfg.get("select", {}).get("mode", record.get("mode", "?")),
        seed=int(cfg.get("seed", record.get("seed", 0))),
        data_seed=data.get("seed", record.get("data_seed")),
        status="incomplete",
        returncode=record.get("returncode"),
        stderr_tail=record.get("stderr_tail", ""),
        wall_s=record.get("wall_s"),
    )
    run.config = flatten_config(cfg)
    if data and not files:
        run.pool_shares = {k: float(pool(data)) for k, (_, _, pool) in SHARES.items()}
    metrics = [read_json(p) for p in sorted(path.glob("rounds/*/metrics.json"))]
    steps_per_round = cfg.get("train", {}).get("steps_per_round", 0)
    run.steps = np.cumsum([m.get("train/steps", steps_per_round) for m in metrics]).tolist()
    run.accuracy = [float(m["eval/accuracy"]) for m in metrics]
    per_round = [_round_shares(m, data.get("minority", "")) for m in metrics]
    run.shares = {
        k: [r[k] for r in per_round]
        for k in SHARES
        if all(k in r for r in per_round) and not files  # shares of labels files do not carry
    }
    run.auc = [_finite(m.get("select/auc_clean")) for m in metrics]
    run.split_half = [_finite(m.get("val/split_half_cos")) for m in metrics]
    if (path / "summary.json").is_file():
        summary = read_json(path / "summary.json")
        run.status, run.wall_s = "done", summary["wall_s"]
        run.initial, run.final = summary["initial_eval_accuracy"], summary["final_eval_accuracy"]
        run.initial_mean_at_k = summary.get("initial_eval_mean_at_k")
        run.final_mean_at_k = summary.get("final_eval_mean_at_k")
        train = cfg.get("train", {})
        if run.steps and train:
            run.train_rollouts = run.steps[-1] * train["batch_size"] * train["num_generations"]
    elif record.get("status") == "failed":
        run.status = "failed"
    return run


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def config_differences(runs: list[Run]) -> dict[str, list[str]]:
    """Fields that differ between finished runs beyond regime, mode, seeds and paths
    (`config.BENCH_FIELDS`, `config.LOCATION_FIELDS`), each with the sorted set of its
    values' reprs."""
    per_run = [r.config for r in runs if r.status == "done" and r.config]
    diffs = differing_fields(per_run, (*BENCH_FIELDS, *LOCATION_FIELDS), absent="<absent>")
    return {name: sorted({repr(v) for v in values}) for name, values in diffs.items()}


def collect(root: Path) -> list[Run]:
    """Every run directory at or below `root` (one holding config.yaml or bench-run.json)."""
    root = Path(root)
    markers = ("config.yaml", "bench-run.json")
    if any((root / m).is_file() for m in markers):
        return [load_run(root)]
    found = {p.parent for m in markers for p in root.rglob(m)}
    dirs = sorted(d for d in found if "report" not in d.relative_to(root).parts)
    runs = [load_run(d) for d in dirs]
    return sorted(
        runs, key=lambda r: (_order(r.regime, REGIME_ORDER), _order(r.mode, MODES), r.seed)
    )


def _order(name: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def _modes(names) -> list[str]:
    """Mode names in the order of `selection.MODES` (unknown ones last)."""
    return sorted(set(names), key=lambda m: _order(m, MODES))


def _stat(values: dict[int, float]) -> dict[str, Any]:
    mean, half, n = mean_ci(list(values.values()))
    return {"mean": mean, "ci95": half, "n": n, "seeds": {str(k): v for k, v in values.items()}}


def _cells(done: list[Run], value) -> dict[str, dict[str, dict[int, float]]]:
    """{regime: {mode: {seed: value(run)}}} over the runs where `value` is not None."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in done:
        v = value(r)
        if v is not None:
            out.setdefault(r.regime, {}).setdefault(r.mode, {})[r.seed] = float(v)
    return out


def _paired_to_rand(cells: dict[str, dict[str, dict[int, float]]]) -> dict[str, Any]:
    """Per regime and mode, the difference to `rand` of the same seed, mean ± CI."""
    out = {}
    for regime, by_mode in cells.items():
        rand = by_mode.get("rand", {})
        out[regime] = {
            mode: _stat({s: v - rand[s] for s, v in seeds.items() if s in rand})
            for mode, seeds in by_mode.items()
            if mode != "rand" and rand
        }
    return out


def _stats(cells: dict[str, dict[str, dict[int, float]]]) -> dict[str, Any]:
    return {g: {m: _stat(s) for m, s in ms.items()} for g, ms in cells.items()}


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _per_round_mean(rows: list[list[float | None]]) -> list[float | None]:
    """Mean over runs (seeds) per round of the finite values, up to the shortest run."""
    length = min(map(len, rows))
    return [_mean([row[i] for row in rows]) for i in range(length)]


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per-seed numbers and their means ± CIs (the content of results.json): final greedy
    accuracy and sampled mean@k with the paired difference to `rand`; per share (SHARES) its
    mean per round and its mean over all rounds ± CI over seeds; the per-round AUC of the
    mode's score and the split-half validation cosine, likewise."""
    done = [r for r in runs if r.status == "done" and r.final is not None]
    final = _cells(done, lambda r: r.final)
    mean_at_k = _cells(done, lambda r: r.final_mean_at_k)
    curve = _cells(done, lambda r: _mean(r.accuracy))  # area under the learning curve
    shares: dict[str, Any] = {}
    for name, (regime, _, _) in SHARES.items():
        for mode in dict.fromkeys(r.mode for r in done if r.regime == regime):
            sel = [r for r in done if r.regime == regime and r.mode == mode and r.shares.get(name)]
            if sel:
                shares.setdefault(name, {})[mode] = {
                    "mean_per_round": _per_round_mean([r.shares[name] for r in sel]),
                    "n": len(sel),
                    "all_rounds": _stat({r.seed: _mean(r.shares[name]) for r in sel}),
                }
    per_round: dict[str, Any] = {}
    for key in ("auc", "split_half"):
        cells: dict[str, Any] = {}
        for r in done:
            if any(v is not None for v in getattr(r, key)):
                cells.setdefault(r.regime, {}).setdefault(r.mode, []).append(r)
        per_round[key] = {
            g: {
                m: {
                    "mean_per_round": _per_round_mean([getattr(r, key) for r in rs]),
                    "all_rounds": _stat({r.seed: _mean(getattr(r, key)) for r in rs}),
                    "positive_share": _positive_share([getattr(r, key) for r in rs]),
                }
                for m, rs in ms.items()
            }
            for g, ms in cells.items()
        }
    return {
        "final_accuracy": _stats(final),
        "vs_rand": _paired_to_rand(final),
        "final_mean_at_k": _stats(mean_at_k),
        "mean_at_k_vs_rand": _paired_to_rand(mean_at_k),
        "curve_accuracy": _stats(curve),
        "curve_vs_rand": _paired_to_rand(curve),
        "shares": shares,
        "auc_clean": per_round["auc"],
        "split_half_cos": per_round["split_half"],
        "config_differences": config_differences(runs),
        "runs": [{k: v for k, v in asdict(r).items() if k != "config"} for r in runs],
    }


def _positive_share(rows: list[list[float | None]]) -> float | None:
    values = [v for row in rows for v in row if v is not None]
    return sum(v > 0 for v in values) / len(values) if values else None


def fmt_ci(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    half = "n/a" if stat["ci95"] is None else f"{stat['ci95']:.3f}"
    return f"{mean} ± {half} (n={stat['n']})"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _budget_line(runs: list[Run]) -> str:
    done = [r for r in runs if r.status == "done"]
    steps = sorted({r.steps[-1] for r in done if r.steps})
    rollouts = sorted({r.train_rollouts for r in done if r.train_rollouts is not None})
    same = "the same for every run" if len(steps) <= 1 and len(rollouts) <= 1 else "DIFFERENT"
    return f"Training budget ({same}): GRPO steps per run {steps}, training rollouts {rollouts}."


def _differences_line(diffs: dict[str, list[str]]) -> str:
    if not diffs:
        return "Apart from regime, mode and seeds, every finished run has the same config."
    listed = "; ".join(f"`{k}` ({', '.join(v)})" for k, v in diffs.items())
    return f"**Configs differ between runs** beyond regime, mode and seeds: {listed}."


def markdown(root: Path, runs: list[Run], res: dict[str, Any]) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "failed", "incomplete")}
    regimes = list(res["final_accuracy"])
    modes = _modes(m for g in res["final_accuracy"].values() for m in g)
    out = [
        "# GradAlign benchmark report",
        "",
        f"From `{root}`: {len(runs)} runs ({counts['done']} done, {counts['failed']} failed, "
        f"{counts['incomplete']} incomplete). {_budget_line(runs)}",
        _differences_line(res["config_differences"]),
        "Means over seeds ± the 95% CI half-width (Student t, n-1 dof; n/a for n = 1).",
        "",
        "## Final eval accuracy (greedy pass@1)",
        "",
    ]
    acc = res["final_accuracy"]
    out += _md_table(
        ["mode", *regimes], [[m] + [fmt_ci(acc[g].get(m)) for g in regimes] for m in modes]
    )
    out += ["", "## Difference to `rand` (same seed)", ""]
    vs = res["vs_rand"]
    rows = [
        [m] + [fmt_ci(vs.get(g, {}).get(m), signed=True) for g in regimes]
        for m in modes
        if m != "rand"
    ]
    out += _md_table(["mode", *regimes], rows)
    out += _paired_section(
        "Final sampled eval mean@k (temperature-1 samples, verl's mean@k)",
        res["final_mean_at_k"], res["mean_at_k_vs_rand"], modes,
    )  # fmt: skip
    out += _paired_section(
        "Greedy eval accuracy averaged over the rounds (how early a mode learns)",
        res["curve_accuracy"], res["curve_vs_rand"], modes,
    )  # fmt: skip
    out += _share_sections(runs, res["shares"])
    out += _per_round_section(
        res["auc_clean"],
        "AUC of the mode's score, clean above corrupted or filler, per round",
        "Among the chunk's groups with reward variance; 0.5 is chance. `all` = mean over seeds "
        "of each run's mean over rounds ± CI.",
        "{:.2f}",
    )
    out += _per_round_section(
        res["split_half_cos"],
        "Split-half validation cosine, per round",
        "cos(g_V(first half), g_V(second half)); <= 0 means g^_V is no direction that round. "
        "`> 0` = share of all rounds with a positive cosine.",
        "{:+.2f}",
    )
    out += ["", "## Per run", ""]
    out += _md_table(
        ["regime", "mode", "seed", "data seed", "status", "initial", "final", "GRPO steps", "wall s"],
        [
            [r.regime, r.mode, str(r.seed), _num(r.data_seed, "{}"), r.status,
             _num(r.initial), _num(r.final), str(r.steps[-1] if r.steps else "–"),
             "–" if r.wall_s is None else f"{r.wall_s:.0f}"]
            for r in runs
        ],
    )  # fmt: skip
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        out += ["", "## Failed runs", ""]
        for r in failed:
            out += [f"### {r.regime}/{r.mode}/seed{r.seed} (exit {r.returncode})", "",
                    f"`{r.path}`", "", "```text", r.stderr_tail, "```", ""]  # fmt: skip
    out += ["", "## Plots", "", "![eval accuracy](accuracy.png)", ""]
    if res["shares"]:
        out += ["![selected shares](shares.png)", ""]
    if res["auc_clean"]:
        out += ["![AUC per round](auc.png)", ""]
    return "\n".join(out) + "\n"


def _paired_section(
    title: str, acc: dict[str, Any], vs: dict[str, Any], modes: list[str]
) -> list[str]:
    """A measure per regime and mode (mean ± CI) and its paired difference to `rand`."""
    if not acc:
        return []
    regimes = list(acc)
    out = ["", f"## {title}", ""]
    out += _md_table(
        ["mode", *regimes, *[f"Δ vs rand ({g})" for g in regimes]],
        [
            [m]
            + [fmt_ci(acc[g].get(m)) for g in regimes]
            + [fmt_ci(vs.get(g, {}).get(m), signed=True) for g in regimes]
            for m in modes
        ],
    )
    return out


def _per_round_section(data: dict[str, Any], title: str, note: str, form: str) -> list[str]:
    out: list[str] = []
    for regime, per_mode in data.items():
        rounds = max(len(v["mean_per_round"]) for v in per_mode.values())
        cols = _round_columns(rounds)
        out += ["", f"## {title} ({regime})", "", note, ""]
        rows = [
            [m, str(v["all_rounds"]["n"]), _ci(v["all_rounds"], form),
             _num(v["positive_share"], "{:.0%}")]
            + [_num(v["mean_per_round"][i], form) if i < len(v["mean_per_round"]) else "–"
               for i in cols]
            for m, v in per_mode.items()
        ]  # fmt: skip
        out += _md_table(["mode", "seeds", "all", "> 0", *[f"r{i + 1}" for i in cols]], rows)
    return out


def _ci(stat: dict[str, Any], form: str) -> str:
    if stat["mean"] is None:
        return "–"
    half = "n/a" if stat["ci95"] is None else form.format(stat["ci95"]).lstrip("+")
    return f"{form.format(stat['mean'])} ± {half}"


def _share_sections(runs: list[Run], shares: dict[str, Any]) -> list[str]:
    """One table per measured share: mean over seeds per round, and the pool's share."""
    out: list[str] = []
    for name, per_mode in shares.items():
        regime, title, _ = SHARES[name]
        rounds = len(next(iter(per_mode.values()))["mean_per_round"])
        cols = _round_columns(rounds)
        out += ["", f"## Share of {title} among the selected, per round ({regime})", ""]
        if name == "corrupted":
            out += [PAPER_NOTE, ""]
        out += [
            "Mean over seeds; (pool) = the share in the whole pool, i.e. `rand`'s expectation.",
            "",
        ]
        rows = [
            [m, str(v["n"]), _ci(_percent(v["all_rounds"]), "{:.0f}%")]
            + [f"{v['mean_per_round'][i]:.0%}" for i in cols if i < len(v["mean_per_round"])]
            for m, v in per_mode.items()
        ]
        pool = [r.pool_shares[name] for r in runs if r.regime == regime and r.pool_shares]
        if pool:  # what `rand` picks on average
            rows.append(["(pool)", "", f"{pool[0]:.0%}", *[f"{pool[0]:.0%}"] * len(cols)])
        out += _md_table(["mode", "seeds", "all rounds", *[f"r{i + 1}" for i in cols]], rows)
    return out


def _percent(stat: dict[str, Any]) -> dict[str, Any]:
    scale = {k: None if stat[k] is None else 100 * stat[k] for k in ("mean", "ci95")}
    return stat | scale


def _num(x: float | None, form: str = "{:.3f}") -> str:
    return "–" if x is None else form.format(x)


def _round_columns(rounds: int, most: int = 12) -> list[int]:
    """All round indices, or `most` evenly spaced ones (first and last included)."""
    if rounds <= most:
        return list(range(rounds))
    return sorted({round(i * (rounds - 1) / (most - 1)) for i in range(most)})


def build_report(root: Path, out: Path | None = None) -> dict[str, Any]:
    """Write report.md, results.json and the plots to `out` (default ROOT/report). For one
    run directory, report.md is its per-round report and results.json also holds ``rounds``."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    runs = collect(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run directories (config.yaml or bench-run.json)")
    res = summarize(runs)
    single = len(runs) == 1 and Path(runs[0].path) == root  # one run: its rounds, no comparison
    if single:
        from gradalign.analysis import run_report

        res["rounds"] = run_report.round_rows(root)
    write_json(out / "results.json", res)
    from gradalign.analysis.plots import plot  # matplotlib, and it reads this module's records

    plot(runs, out)
    text = (
        run_report.markdown(root, runs[0], res["rounds"]) if single else markdown(root, runs, res)
    )
    write_text(out / "report.md", text)
    return res
