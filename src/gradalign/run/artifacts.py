"""The run directory's round artifacts: a round's staged rollouts, scores and selection, its
metrics line, and the run summary. Written by rank 0, atomically."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gradalign import ranks
from gradalign.config import Config
from gradalign.core.diagnostics import selection_auc
from gradalign.core.selection import STATS, Candidates, Selection
from gradalign.data.problems import Problem, provenance
from gradalign.data.tasks import TaskSets
from gradalign.engine.round_scoring import RoundScores
from gradalign.progress import log
from gradalign.run.checkpoint import crash_point
from gradalign.storage import read_json, write_json, write_jsonl, write_npy


def is_bad(p: Problem) -> bool:
    """A problem a built-in regime made corrupted or low-utility (recorded in `meta`)."""
    return bool(p.meta.get("corruption") or p.meta.get("utility"))


def selection_quality(chunk: list[Problem], cand: Candidates, sel: Selection) -> dict[str, Any]:
    """``select/auc_clean``: AUC of the mode's scores for clean above corrupted or filler
    problems, among the chunk's groups with reward variance; None when the pool carries no
    such labels, the mode has no scores or a class is missing (`core.diagnostics`)."""
    bad = np.array([is_bad(p) for p in chunk])
    if not bad.any() or cand.zero_variance is None:
        return {"select/auc_clean": None}
    auc = selection_auc(sel.scores, ~bad, ~cand.zero_variance)
    return {"select/auc_clean": None if math.isnan(auc) else auc}


def problem_rows(sets: TaskSets) -> list[dict[str, Any]]:
    """problems.jsonl: every pool, validation and eval problem with its `meta`, so that a
    run's selection quality can be recomputed from its directory alone."""
    return [
        {"set": name, **dataclasses.asdict(p)}
        for name, problems in (
            ("pool", sets.pool),
            ("validation", sets.validation),
            ("eval", sets.eval),
        )
        for p in problems
    ]


def score_rows(chunk: list[Problem], cand: Candidates, sel: Selection) -> list[dict[str, Any]]:
    """scores.jsonl: one row per candidate, with its provenance (`problems.provenance`)."""
    rows = []
    for j, p in enumerate(chunk):
        row: dict[str, Any] = {"id": p.id, "source": p.source, **provenance(p)}
        row["score"] = sel.scores[j]
        for name in STATS:
            value = getattr(cand, name)
            row[name] = None if value is None else value[j]
        rows.append(row)
    return rows


def selected_rows(ids: Any, by_id: dict[int, Problem]) -> list[dict[str, Any]]:
    """selected.jsonl: the chosen ids in rank order, each with its provenance (mode `none`
    selects the whole pool: ids outside the chunk have provenance from `by_id` when known)."""
    rows = []
    for rank, pid in enumerate(ids):
        p = by_id.get(int(pid))
        rows.append({"rank": rank, "id": int(pid), **(provenance(p) if p is not None else {})})
    return rows


def discard_run(out: Path) -> None:
    """Remove a previous run's artifacts from `out` (only the names a run writes)."""
    for name in ("rounds", "checkpoints", "chunks"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("summary.json", "config.yaml"):
        (out / name).unlink(missing_ok=True)


def read_stage(
    path: Path, chunk: list[Problem], by_id: dict[int, Problem]
) -> tuple[list[Problem], dict[str, Any]] | None:
    """A round's staged selection, if complete and consistent with its chunk; else None
    (with a warning when a file is there but unusable: the round is then rescored)."""
    f = path / "selection.json"
    if not f.is_file():
        return None
    try:
        staged = read_json(f)
        if staged["chunk"] != [p.id for p in chunk]:
            raise ValueError("its chunk is not this round's chunk")
        chosen = [by_id[int(i)] for i in staged["selected"]]
        return chosen, dict(staged["metrics"])
    except (ValueError, KeyError, TypeError, OSError) as err:
        why = err.strerror if isinstance(err, OSError) else err
        log(f"warning: {f} is unusable ({why}); redoing the round's rollouts and scoring")
        return None


def bad_share(cfg: Config, history: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean share over rounds of the selected problems that the regime made bad
    (corrupted / filler) or, for `imbalance`, that come from the minority family; None for
    problem files, which carry no such labels."""
    if cfg.data.pool_files:
        return None
    if not history:
        return {}
    out = {
        "corrupted": float(np.mean([m["select/corrupted_share"] for m in history])),
        "low_utility": float(np.mean([m["select/low_utility_share"] for m in history])),
    }
    if cfg.data.regime == "imbalance" and not cfg.data.pool_files:
        out["minority"] = float(
            np.mean(
                [
                    m["select/source_mix"].get(cfg.data.minority, 0) / max(m["select/n"], 1)
                    for m in history
                ]
            )
        )
    return out


def source_shares(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each problem source's share of all the problems selected over the rounds (a mode
    that trains on one source only shows it here first)."""
    counts: dict[str, int] = {}
    for m in history:
        for source, c in (m.get("select/source_mix") or {}).items():
            counts[source] = counts.get(source, 0) + c
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items())} if total else {}


def write_stage(
    path: Path,
    r: int,
    chunk: list[Problem],
    scored: RoundScores,
    sel: Selection,
    metrics: dict[str, Any],
    by_id: dict[int, Problem] | None = None,
) -> None:
    """Rollouts, scores, selection and features of a round; selection.json, written last,
    marks the stage complete. `by_id` (the pool) gives the selected rows' provenance."""
    roles = ("candidate", "validation")
    write_jsonl(
        path / "rollouts.jsonl",
        [row for ro, role in zip(scored.rollouts, roles) for row in ro.records(role)],
    )
    crash_point("writing", r)
    write_jsonl(path / "scores.jsonl", score_rows(chunk, scored.candidates, sel))
    by_id = by_id or {p.id: p for p in chunk}
    write_jsonl(path / "selected.jsonl", selected_rows(sel.ids, by_id))
    if scored.features is not None:  # rows in chunk order, as scores.jsonl
        write_npy(path / "features.npy", scored.features)
    (path / "metrics.json").unlink(missing_ok=True)  # a stale one from an abandoned attempt
    stage = {"round": r + 1, "chunk": [p.id for p in chunk], "selected": [int(i) for i in sel.ids]}
    write_json(path / "selection.json", stage | {"metrics": metrics})


def write_summary(cfg: Config, out: Path, state: dict[str, Any], extra_wall: float) -> dict:
    history, initial = state["history"], state["initial"]
    summary = {
        "mode": cfg.select.mode,
        "rounds": cfg.rounds,
        "initial_eval_accuracy": initial["eval/accuracy"],
        "final_eval_accuracy": history[-1]["eval/accuracy"] if history else None,
        "eval_accuracy": [m["eval/accuracy"] for m in history],
        "initial_eval_mean_at_k": initial.get("eval/mean_at_k"),
        "final_eval_mean_at_k": history[-1].get("eval/mean_at_k") if history else None,
        "selected_share": bad_share(cfg, history),
        "selected_sources": source_shares(history),
        "final_eval_accuracy_by_source": {
            k.split("/", 2)[2]: v
            for k, v in (history[-1] if history else {}).items()
            if k.startswith("eval/accuracy/")
        },
        "wall_s": state["wall_s"] + extra_wall,
        "time_totals": {
            k: sum(m.get(k) or 0.0 for m in history)
            for k in sorted({k for m in history for k in m if k.startswith("time/")})
        },
    }
    if ranks.is_main():
        write_json(out / "summary.json", summary)
    return summary


def round_line(cfg: Config, r: int, m: dict[str, Any]) -> str:
    t = {k.split("/")[1][:-2]: v for k, v in m.items() if k.startswith("time/")}
    times = " ".join(f"{k} {v:.1f}s" for k, v in t.items() if v >= 0.05)
    mix = ", ".join(f"{k} {v}" for k, v in m["select/source_mix"].items())
    auc = m.get("select/auc_clean")
    quality = f" | auc clean {auc:.2f}" if auc is not None else ""
    split = m.get("val/split_half_cos")
    quality += f" | val split {split:+.2f}" if split is not None and split == split else ""
    return (
        f"[{cfg.select.mode}] round {r + 1}/{cfg.rounds}: eval {m['eval/accuracy']:.3f} "
        f"| selected {m['select/n']} ({mix}){quality} | {times}"
    )
