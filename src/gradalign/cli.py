"""Command line: `gradalign demo`, `gradalign run CONFIG.yaml`, `gradalign fields`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gradalign.config import Config, ConfigError, field_docs, load_config
from gradalign.progress import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="GradAlign: gradient-aligned problem selection for GRPO.",
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="override a config field, e.g. --set select.mode=dot (repeatable); "
        "`gradalign fields` lists them",
    ),
]


def _load(path: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config (defaults when omitted)")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Run one configuration: rounds of score → select → GRPO steps → eval."""
    from gradalign.loop import run as run_loop

    cfg = _load(config, set_)
    summary = run_loop(cfg)
    console.print(comparison_table({cfg.select.mode: summary}))
    console.print(f"run directory: {cfg.out_dir}  (wall time {summary['wall_s']:.0f} s)")


@app.command()
def demo(
    modes: Annotated[
        str, typer.Option(help="comma-separated modes, same training budget each")
    ] = "sim,rand,accgreedy",
    out: Annotated[Path, typer.Option(help="parent of one run directory per mode")] = Path(
        "runs/demo"
    ),
    config: Annotated[Path | None, typer.Option(help="YAML config to start from")] = None,
    set_: SetOpt = None,
) -> None:
    """GradAlign (sim) against baselines on the built-in task, with a comparison table."""
    from gradalign.loop import build_setup
    from gradalign.loop import run as run_loop

    t0 = time.perf_counter()
    base = _load(config, set_)
    names = [m.strip() for m in modes.split(",") if m.strip()]
    summaries = {}
    for mode in names:
        cfg = _load(config, (set_ or []) + [f"select.mode={mode}", f"out_dir={out / mode}"])
        console.rule(f"mode {mode}")
        summaries[mode] = run_loop(cfg, build_setup(cfg))
    console.print(comparison_table(summaries))
    wall = time.perf_counter() - t0
    console.print(
        f"demo wall time {wall:.0f} s · {base.rounds} rounds × {base.train.steps_per_round} GRPO "
        f"steps per mode · run directories under {out}/"
    )


@app.command()
def fields() -> None:
    """List every configuration field with its default and meaning."""
    table = Table("field", "default", "meaning", box=None)
    for name, default, help_ in field_docs():
        table.add_row(name, default, help_)
    console.print(table)


def comparison_table(summaries: dict[str, dict]) -> Table:
    """Eval accuracy per round and final, with the time spent selecting and training."""
    rounds = max(len(s["eval_accuracy"]) for s in summaries.values())
    table = Table(title="greedy eval accuracy (pass@1) after each round", box=None)
    for col in (
        ["mode", "start"]
        + [f"r{i + 1}" for i in range(rounds)]
        + ["final", "Δ", "select s", "train s", "wall s"]
    ):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for mode, s in summaries.items():
        t = s["time_totals"]
        select_s = sum(v for k, v in t.items() if k not in ("time/training_s", "time/eval_s"))
        table.add_row(
            mode,
            f"{s['initial_eval_accuracy']:.3f}",
            *[f"{a:.3f}" for a in s["eval_accuracy"]],
            f"{s['final_eval_accuracy']:.3f}",
            f"{s['final_eval_accuracy'] - s['initial_eval_accuracy']:+.3f}",
            f"{select_s:.0f}",
            f"{t.get('time/training_s', 0):.0f}",
            f"{s['wall_s']:.0f}",
        )
    return table
