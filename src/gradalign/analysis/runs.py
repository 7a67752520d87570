"""The run directories a report reads: one `Run` record per directory (`load_run`, `collect`),
the 95% confidence interval the report and its plots share (`mean_ci`), and the order in
which regimes and modes are listed.

CI: mean ± t_{0.975, n-1} · s / √n with s the sample standard deviation (n-1 in the
denominator); undefined ("n/a") for n = 1. Only finished runs (``summary.json``) count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gradalign.config import BENCH_FIELDS, LOCATION_FIELDS, differing_fields, flatten_config
from gradalign.core.selection import MODES
from gradalign.storage import read_json

REGIME_ORDER = ("noisy", "imbalance", "lowutility", "clean")
# t_{0.975, df} for df = 1..30 (two-sided 95%); beyond, a Cornish-Fisher expansion
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
        2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
        2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
        2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)  # fmt: skip
Z975 = 1.959964
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


def mean_ci(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, 95% CI half-width or None when n < 2, n); a None counts as NaN."""
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
    cfg: dict[str, Any] = {}
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
        runs, key=lambda r: (order_key(r.regime, REGIME_ORDER), order_key(r.mode, MODES), r.seed)
    )


def order_key(name: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def mode_order(names: Iterable[str]) -> list[str]:
    """Mode names in the order of `selection.MODES` (unknown ones last)."""
    return sorted(set(names), key=lambda m: order_key(m, MODES))
