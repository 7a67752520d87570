"""The report's plots (matplotlib, Agg): eval accuracy against GRPO steps, the selected shares
per round, and the per-round AUC of the mode's score, clean above corrupted or filler; each a
mean over seeds with a 95% CI band."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradalign.analysis.runs import REGIME_ORDER, SHARES, Run, mean_ci, mode_order, order_key


def _band(ax, x: list[int], rows: Sequence[Sequence[float | None]], label: str) -> None:
    """Mean over rows (seeds) of the finite values at each point, with a 95% CI band where
    n >= 2 (values in [0, 1])."""
    length = min(len(x), *map(len, rows))
    stats = [mean_ci([row[j] for row in rows if row[j] is not None]) for j in range(length)]
    mean = np.array([np.nan if m is None else m for m, _, _ in stats])
    (line,) = ax.plot(x[:length], mean, marker=".", label=label)
    half = np.array([np.nan if h is None else h for _, h, _ in stats])
    if np.isfinite(half).any():
        low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)
        ax.fill_between(x[:length], low, high, color=line.get_color(), alpha=0.15)


def plot(runs: list[Run], out: Path) -> list[Path]:
    """accuracy.png, and shares.png and auc.png when those were measured; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.status == "done"]
    regimes = sorted({r.regime for r in done}, key=lambda g: order_key(g, REGIME_ORDER))
    paths = []
    panels = regimes or ["no finished runs"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], panels):
        for mode in mode_order(r.mode for r in done if r.regime == regime):
            sel = [r for r in done if r.regime == regime and r.mode == mode]
            _band(ax, [0, *sel[0].steps], [[r.initial, *r.accuracy] for r in sel], mode)
        ax.set(title=regime, xlabel="cumulative GRPO steps", ylabel="eval accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy.png"))
    share_panels = [
        (n, g, t)
        for n, (g, t, _) in SHARES.items()
        if any(r.shares.get(n) for r in done if r.regime == g)
    ]
    if share_panels:
        fig, axes = plt.subplots(
            1, len(share_panels), figsize=(4.5 * len(share_panels), 3.6), squeeze=False
        )
        for ax, (name, regime, title) in zip(axes[0], share_panels):
            sel = [r for r in done if r.regime == regime and r.shares.get(name)]
            for mode in mode_order(r.mode for r in sel):
                rows = [r.shares[name] for r in sel if r.mode == mode]
                _band(ax, list(range(1, len(rows[0]) + 1)), rows, mode)
            if sel[0].pool_shares:
                ax.axhline(sel[0].pool_shares[name], color="grey", ls="--", lw=1, label="pool")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set(
                title=f"{regime}: {title}", xlabel="round", ylabel="share of selected", ylim=(0, 1)
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(_save(fig, out / "shares.png"))
    auc = _auc_plot(done, regimes)
    if auc is not None:
        paths.append(_save(auc, out / "auc.png"))
    return paths


def _auc_plot(done: list[Run], regimes: list[str]):
    """Per regime with labelled problems, the AUC of each scoring mode per round (None when
    no run recorded one)."""
    import matplotlib.pyplot as plt

    panels = [g for g in regimes if any(_has(r.auc) for r in done if r.regime == g)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, regime in zip(axes[0], panels):
        sel = [r for r in done if r.regime == regime and _has(r.auc)]
        for mode in mode_order(r.mode for r in sel):
            rows = [r.auc for r in sel if r.mode == mode]
            _band(ax, list(range(1, len(rows[0]) + 1)), rows, mode)
        ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(title=f"{regime}: AUC clean above bad", xlabel="round", ylabel="AUC", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _has(values: list[float | None]) -> bool:
    return any(v is not None for v in values)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
