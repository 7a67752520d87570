"""The report of one run directory: what its selection did round by round.

A bench report compares modes over seeds (`analysis.report`); one run has nothing to compare,
so `gradalign report RUN_DIR` writes its rounds instead, from ``rounds/*/metrics.json``: eval
accuracy, the pass rate of the selected problems against the chunk's and the validation
set's, the share of zero-variance candidates, the split-half validation cosine (is g^_V a
direction?), whether selection fell back to `rand`, the share of rollouts cut off at
``rollout.max_new_tokens``, and, for built-in regimes, the AUC clean above corrupted and the
corrupted share of the picks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradalign.storage import read_json

# column -> (metrics.json key, format); a column no round has is left out
COLUMNS = {
    "eval accuracy": ("eval/accuracy", "{:.3f}"),
    "selected pass rate": ("select/pass_rate", "{:.2f}"),
    "chunk pass rate": ("select/chunk_pass_rate", "{:.2f}"),
    "validation pass rate": ("val/pass_rate", "{:.2f}"),
    "zero-variance share": ("select/chunk_zero_variance_frac", "{:.0%}"),
    "split-half cos": ("val/split_half_cos", "{:+.2f}"),
    "fallback": ("select/fallback", "{}"),
    "cut off": ("rollouts/clipped_frac", "{:.0%}"),
    "AUC clean": ("select/auc_clean", "{:.2f}"),
    "corrupted share": ("select/corrupted_share", "{:.0%}"),
}


def round_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One dict per finished round (its number from 1, and the `COLUMNS` keys it has)."""
    rows = []
    for i, path in enumerate(sorted(Path(run_dir).glob("rounds/*/metrics.json"))):
        m = read_json(path)
        row: dict[str, Any] = {"round": i + 1}
        for key, _ in COLUMNS.values():
            if key in m:
                row[key] = m[key]
        rows.append(row)
    return rows


def cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The header and the formatted cells of the per-round table (shared with the CLI's)."""
    present = [c for c, (key, _) in COLUMNS.items() if any(r.get(key) is not None for r in rows)]
    body = []
    for r in rows:
        line = [str(r["round"])]
        for column in present:
            key, form = COLUMNS[column]
            value = r.get(key)
            finite = not isinstance(value, float) or math.isfinite(value)
            line.append("–" if value is None or not finite else form.format(value))
        body.append(line)
    return ["round", *present], body


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the rounds say in words: split-half cosines above 0, fallbacks, cut-off rollouts."""
    n = len(rows)
    if not n:
        return ["No round has finished yet."]
    split = [r.get("val/split_half_cos") for r in rows]
    finite = [s for s in split if isinstance(s, (int, float)) and math.isfinite(s)]
    fallbacks = sum(bool(r.get("select/fallback")) for r in rows)
    out = [
        f"Split-half validation cosine > 0 in {sum(s > 0 for s in finite)} of {n} rounds "
        f"({n - len(finite)} without one): where it is <= 0, g^_V is no direction that round.",
        f"Selection fell back to rand in {fallbacks} of {n} rounds (zero validation gradient).",
    ]
    cut = [r["rollouts/clipped_frac"] for r in rows if "rollouts/clipped_frac" in r]
    if cut and max(cut) > 0.5:
        out.append(
            f"Up to {max(cut):.0%} of a round's candidate rollouts hit rollout.max_new_tokens: "
            "answers were cut off; raise it."
        )
    return out


def markdown(root: Path, run: Any, rows: list[dict[str, Any]]) -> str:
    """report.md of one run (`run`: its `analysis.report.Run`)."""
    data = "problem files" if run.regime == "files" else f"the built-in {run.regime} regime"
    out = [
        "# GradAlign run report",
        "",
        f"From `{root}`: mode `{run.mode}` on {data}, seed {run.seed}, {len(rows)} rounds "
        f"finished ({run.status}).",
    ]
    if run.initial is not None and run.final is not None:
        out.append(
            f"Greedy eval accuracy {run.initial:.3f} before training, {run.final:.3f} after the "
            f"last round ({run.final - run.initial:+.3f})."
        )
    if run.initial_mean_at_k is not None and run.final_mean_at_k is not None:
        out.append(
            f"Sampled eval mean@k {run.initial_mean_at_k:.3f} before, {run.final_mean_at_k:.3f} "
            "after."
        )
    out += ["", *summary_lines(rows), "", "## Per round", ""]
    header, body = cells(rows)
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    out += ["", "## Plots", "", "![eval accuracy](accuracy.png)", ""]
    return "\n".join(out) + "\n"
