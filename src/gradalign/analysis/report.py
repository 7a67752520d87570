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

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from gradalign.analysis.runs import SHARES, Run, collect, config_differences, mean_ci, mode_order
from gradalign.storage import write_json, write_text

PAPER_NOTE = (
    "Paper reference (Yang et al. 2026, arXiv 2602.21492, unreliable-reward regime): about "
    "18% (start) to 30% (step 100) of GradAlign's picks are corrupted, over 80% of AccGreedy's."
)


def _stat(values: Mapping[int, float | None]) -> dict[str, Any]:
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


def _per_round_mean(rows: Sequence[Sequence[float | None]]) -> list[float | None]:
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


def _positive_share(rows: Sequence[Sequence[float | None]]) -> float | None:
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
    modes = mode_order(m for g in res["final_accuracy"].values() for m in g)
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
        "cos(g_V(even positions), g_V(odd ones)); <= 0 means g^_V is no direction that round. "
        "`> 0` = share of all rounds with a positive cosine.",
        "{:+.2f}",
    )
    out += _per_run_sections(runs)
    out += ["", "## Plots", "", "![eval accuracy](accuracy.png)", ""]
    if res["shares"]:
        out += ["![selected shares](shares.png)", ""]
    if res["auc_clean"]:
        out += ["![AUC per round](auc.png)", ""]
    return "\n".join(out) + "\n"


def _per_run_sections(runs: list[Run]) -> list[str]:
    """Every run's line, then each failed run's stderr tail."""
    out = ["", "## Per run", ""]
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
    return out


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
    from gradalign.analysis.plots import plot  # matplotlib: imported when a report is drawn

    plot(runs, out)
    text = (
        run_report.markdown(root, runs[0], res["rounds"]) if single else markdown(root, runs, res)
    )
    write_text(out / "report.md", text)
    return res
