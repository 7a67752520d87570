"""Command line: `gradalign demo`, `run CONFIG.yaml`, `score CONFIG.yaml`, `diagnose CONFIG.yaml`,
`export DIR`, `fields`, `bench regimes`, `report DIR`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from gradalign.config import Config, ConfigError, field_docs, field_help, load_config
from gradalign.progress import console
from gradalign.ranks import is_main, shutdown
from gradalign.storage import StorageError, describe

T = TypeVar("T")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="GradAlign: gradient-aligned problem selection for GRPO.",
)


@app.callback()
def _offline() -> None:
    """Every command runs without the model hub (`policy.use_offline_hub`), and shows Python
    warnings in one line each (`progress.one_line_warning`)."""
    import warnings

    from gradalign.engine.policy import use_offline_hub
    from gradalign.progress import one_line_warning

    use_offline_hub()
    warnings.formatwarning = one_line_warning


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="override a config field, e.g. --set select.mode=dot (repeatable); "
        "`gradalign fields` lists them",
    ),
]
ScorerOpt = Annotated[
    str | None,
    typer.Option(help=f"select.scorer: {field_help('select.scorer')}"),
]


RestartOpt = Annotated[
    bool,
    typer.Option(help="discard what the run directory holds and start over (default: resume it)"),
]


def _run_one(cfg: Config, restart: bool) -> dict:
    """loop.run with its expected failures as one-line messages: exit 2 for what the user
    gave (config, data, a locked or foreign run directory, a reward function that never
    works), 1 for what failed while running (a file the system cannot write or read, diverged
    training), 130 for Ctrl-C."""
    from gradalign.run.loop import run as run_loop

    return _guarded(run_loop, cfg, restart=restart)


RESUMES = "interrupted; run the same command to resume"


def _guarded(
    call: Callable[..., T], *args: Any, interrupted: str = RESUMES, directory: str = "run directory",
    **kwargs: Any,
) -> T:  # fmt: skip
    """`call(*args, **kwargs)` with the expected failures of loading and running as one-line
    messages (see `_run_one`); `interrupted` is the line Ctrl-C ends with, `directory` the
    label of a locked or foreign output directory."""
    from gradalign.data.problems import ProblemError
    from gradalign.data.rewards import RewardError, RewardFailed
    from gradalign.engine.training import TrainingDiverged
    from gradalign.run.checkpoint import ResumeError, RunLocked

    try:
        return call(*args, **kwargs)
    except (RunLocked, ResumeError) as err:
        _fail(directory, err, 2)
    except (ConfigError, ProblemError, RewardError) as err:  # found while loading data
        _fail("config error", err, 2)
    except RewardFailed as err:
        _fail("reward error", err, 2)
    except StorageError as err:
        _fail("storage error", err, 1)
    except TrainingDiverged as err:
        _fail("training diverged", err, 1)
    except OSError as err:  # one no writer above named: still the path and the cause
        where = f"{err.filename}: " if err.filename else ""
        _fail("storage error", f"{where}{describe(err)}", 1)
    except KeyboardInterrupt:
        console.print(interrupted, markup=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _fail(label: str, err: Exception | str, code: int) -> NoReturn:
    console.print(f"[red]{label}:[/red] {escape(' '.join(str(err).split()))}", soft_wrap=True)
    raise typer.Exit(code) from None


def _load(path: Path | None, overrides: list[str] | None) -> Config:
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        _fail("config error", err, 2)


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config (defaults when omitted)")
    ] = None,
    set_: SetOpt = None,
    scorer: ScorerOpt = None,
    restart: RestartOpt = False,
) -> None:
    """Run one configuration: rounds of score → select → GRPO steps → eval.

    Re-running the same command after a crash or kill resumes from the last finished round."""
    cfg = _load(config, (set_ or []) + ([f"select.scorer={scorer}"] if scorer else []))
    summary = _run_one(cfg, restart)
    shutdown()
    print_tables({cfg.select.mode: summary})
    console.print(
        f"run directory: {cfg.out_dir}  (wall time {summary['wall_s']:.0f} s)", soft_wrap=True
    )


@app.command("score")
def score_command(
    config: Annotated[Path | None, typer.Argument(help="YAML run config (defaults when omitted)")] = None,
    out: Annotated[Path, typer.Option(help="output directory: scores.jsonl, chunks/, selected.*")] = Path("runs/score"),
    top: Annotated[int | None, typer.Option(min=1, help="write the N best problems in the pool's own format")] = None,
    fraction: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="write this share of the pool (best first)")] = None,
    set_: SetOpt = None,
) -> None:  # fmt: skip
    """Score a whole pool once under the starting policy (no training): OUT/scores.jsonl
    with each problem's file and line or row; with --top / --fraction the chosen rows in
    the pool files' own format, for any trainer. Rerunning resumes from finished chunks."""
    from gradalign.run.score import score

    cfg = _load(config, set_)
    result = _guarded(score, cfg, out, top=top, fraction=fraction, directory="output directory")
    shutdown()
    written = ", ".join(str(p) for p in result.selected)
    console.print(
        f"scored {result.n_scored} problems: {result.scores}"
        + (f"; selected {result.n_selected}: {written}" if written else ""),
        markup=False,
        soft_wrap=True,
    )


@app.command()
def demo(
    modes: Annotated[
        str, typer.Option(help="comma-separated modes, same training budget each")
    ] = "sim,rand,accgreedy",
    out: Annotated[Path, typer.Option(help="parent of one run directory per mode")] = Path(
        "runs/demo"
    ),
    regime: Annotated[
        str, typer.Option(help="built-in data regime: noisy, imbalance, lowutility or clean")
    ] = "noisy",
    config: Annotated[Path | None, typer.Option(help="YAML config to start from")] = None,
    set_: SetOpt = None,
    scorer: ScorerOpt = None,
    restart: RestartOpt = False,
) -> None:
    """GradAlign (sim) against baselines on the built-in task, with a comparison table.

    The default regime gives half of the pool a coin-flip reward: the table shows how many
    corrupted problems each mode trained on, and what selecting cost in time.
    """
    t0 = time.perf_counter()
    common = [
        f"data.regime={regime}",
        *([f"select.scorer={scorer}"] if scorer else []),
        *(set_ or []),
    ]
    base = _load(config, common)
    names = [m.strip() for m in modes.split(",") if m.strip()]
    summaries = {}
    for mode in names:
        cfg = _load(config, common + [f"select.mode={mode}", f"out_dir={out / mode}"])
        console.rule(f"mode {mode}")
        summaries[mode] = _run_one(cfg, restart)
    shutdown()
    print_tables(summaries)
    wall = time.perf_counter() - t0
    console.print(
        f"demo wall time {wall:.0f} s · {base.rounds} rounds × {base.train.steps_per_round} GRPO "
        f"steps per mode · run directories under {out}/"
    )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    round_: Annotated[
        int | None,
        typer.Option("--round", help="the round whose checkpoint to export (default: the last)"),
    ] = None,
    merge: Annotated[
        bool, typer.Option(help="LoRA: write merged full weights instead of the adapter")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="destination (default RUN_DIR/final, RUN_DIR/final-round-NNNN)"),
    ] = None,
) -> None:
    """Save a run's trained policy with save_pretrained (model + tokenizer, or LoRA adapter)."""
    from gradalign.data.problems import ProblemError
    from gradalign.run.checkpoint import ResumeError
    from gradalign.run.export import ExportError, export_run

    try:
        dest, what = export_run(run_dir, round_, merge, out)
    except (ExportError, ConfigError, ProblemError, ResumeError) as err:
        _fail("export error", err, 2)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        _fail("storage error", f"{where}{describe(err)}", 1)
    console.print(f"{what}: {dest}", markup=False, soft_wrap=True)


@app.command()
def diagnose(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config (defaults when omitted)")
    ] = None,
    set_: SetOpt = None,
    chunks: Annotated[
        int, typer.Option(min=1, help="pool chunks to score (select.chunk_size candidates each)")
    ] = 4,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the measures to this JSON file")
    ] = None,
) -> None:
    """Can gradient alignment select well here? Scores the first chunks of the pool on the
    starting policy (no training) and prints the split-half validation cosine, the transfer
    cosine between problems, the distribution of candidate cosines, the zero-variance share,
    the mean cosine per source and (built-in regimes) the AUC, with a one-line verdict."""
    from gradalign.run.diagnose import diagnose as run_diagnose

    cfg = _load(config, set_)
    result = _guarded(run_diagnose, cfg, chunks, interrupted="interrupted")
    console.print(diagnosis_table(result))
    console.print(f"verdict: {result['verdict']}", markup=False, soft_wrap=True)
    if json_out is not None and is_main():  # under torchrun every rank holds the same result
        from gradalign.storage import write_json

        try:
            write_json(json_out, result)
        except StorageError as err:
            _fail("storage error", err, 1)
        console.print(f"measures: {json_out}", markup=False, soft_wrap=True)
    shutdown()


def diagnosis_table(d: dict) -> Table:
    """The measures of `gradalign diagnose`, one per row."""

    def num(x: float | None, signed: bool = True) -> str:
        if x is None or not math.isfinite(x):
            return "n/a"
        return f"{x:+.3f}" if signed else f"{x:.3f}"

    def series(xs: list) -> str:
        finite = [x for x in xs if x is not None and math.isfinite(x)]
        mean = f"mean {sum(finite) / len(finite):+.3f}" if finite else "n/a"
        return f"{mean}  (per chunk: {', '.join(num(x) for x in xs)})"

    table = Table(
        title=f"diagnosis of {d['model']} on {d['data']}: {d['candidates']} candidates in "
        f"{d['chunks']} chunks, k_r={d['k_r']}, k_v={d['k_v']}, starting policy",
        box=None,
    )
    table.add_column("measure")
    table.add_column("value")
    table.add_row("split-half validation cosine", series(d["split_half_cos"]))
    table.add_row("transfer cosine (chunk halves)", series(d["transfer_cos"]))
    table.add_row("zero-variance share", f"{d['zero_variance_share']:.0%}")
    rates = [("pool chunks", "chunk_pass_rate"), ("validation set", "val_pass_rate")]
    table.add_row("pass rate", ", ".join(f"{w} {num(d.get(k), signed=False)}" for w, k in rates))
    cut = [("candidate", "clipped_share"), ("validation", "val_clipped_share")]
    table.add_row(
        f"cut off at max_new_tokens={d.get('max_new_tokens')}",
        ", ".join(f"{w} {_share(d.get(k))}" for w, k in cut),
    )
    q = d["cos_quantiles"]
    if q:
        table.add_row(
            "candidate cos(g_p, g^_V)",
            "  ".join(f"{k} {num(v)}" for k, v in q.items())
            + f"   ({d['cos_positive_share']:.0%} > 0)",
        )
    for name, key in (("source", "cos_by_source"), ("label", "cos_by_label")):
        for k, v in d[key].items():
            table.add_row(f"mean cosine, {name} {k}", num(v))
    if d["auc_clean"] is not None:
        per = ", ".join(num(x, signed=False) for x in d["auc_clean_per_chunk"])
        table.add_row("AUC clean above corrupted", f"{d['auc_clean']:.3f}  (per chunk: {per})")
    return table


def _share(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.0%}"


@app.command()
def fields() -> None:
    """List every configuration field with its default and meaning. The defaults are sized
    for the built-in models; the last column says what a real model needs instead."""
    from gradalign.config import REAL_MODEL

    table = Table(
        "field", "default", "meaning", "for a local model (GPU)", box=None,
        caption="Defaults are sized for the built-in models (builtin:tiny on a CPU); the last "
        "column is a starting point for your own Hugging Face model "
        "(examples/qwen2.5-math-1.5b.yaml).",
    )  # fmt: skip
    for name, default, help_ in field_docs():
        table.add_row(name, default, help_, REAL_MODEL.get(name, ""))
    console.print(table)


SHARE_LABELS = {"corrupted": "corrupt sel", "minority": "minority sel", "low_utility": "filler sel"}


def comparison_table(summaries: dict[str, dict]) -> Table:
    """Eval accuracy per round and final, the share of selected problems that the regime
    made bad (or, for imbalance, that come from the minority family), and the time spent
    selecting and training."""
    rounds = max(len(s["eval_accuracy"]) for s in summaries.values())
    measured = {mode: s.get("selected_share") or {} for mode, s in summaries.items()}  # files: None
    shares = [
        k
        for k in SHARE_LABELS
        if any(k in m for m in measured.values())
        and (k == "minority" or any(m.get(k, 0) > 0 for m in measured.values()))
    ]
    sampled = all(s.get("final_eval_mean_at_k") is not None for s in summaries.values())
    table = Table(title="greedy eval accuracy (pass@1) after each round", box=None)
    columns = ["mode", "start", *[f"r{i + 1}" for i in range(rounds)], "final", "Δ"]
    columns += ["mean@k start", "final", "Δ@k"] if sampled else []
    columns += [SHARE_LABELS[k] for k in shares] + ["select s", "train s", "wall s"]
    for col in columns:
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
            *(_sampled_cells(s) if sampled else []),
            *[f"{100 * measured[mode][k]:.0f}%" if k in measured[mode] else "–" for k in shares],
            f"{select_s:.0f}",
            f"{t.get('time/training_s', 0):.0f}",
            f"{s['wall_s']:.0f}",
        )
    return table


def print_tables(summaries: dict[str, dict]) -> None:
    """The comparison table, and the per-source one when the pool has several sources."""
    console.print(comparison_table(summaries))
    if (by_source := source_table(summaries)) is not None:
        console.print(by_source)


def source_table(summaries: dict[str, dict]) -> Table | None:
    """Per problem source: its share of each mode's picks and its final greedy pass@1 on the
    eval set; None with fewer than two sources. A mode can pick fewer coin flips and still
    leave a whole source untrained: this is where it shows."""
    picks = {m: s.get("selected_sources") or {} for m, s in summaries.items()}
    finals = {m: s.get("final_eval_accuracy_by_source") or {} for m, s in summaries.items()}
    sources = sorted(
        {k for p in picks.values() for k in p} | {k for f in finals.values() for k in f}
    )
    if len(sources) < 2:
        return None
    table = Table(title="per source: share of the picks · final greedy pass@1", box=None)
    table.add_column("mode")
    for head in [f"{k} sel" for k in sources] + [f"{k} final" for k in sources]:
        table.add_column(head, justify="right")
    for mode in summaries:
        sel = [f"{100 * picks[mode][k]:.0f}%" if k in picks[mode] else "–" for k in sources]
        fin = [f"{finals[mode][k]:.3f}" if k in finals[mode] else "–" for k in sources]
        table.add_row(mode, *sel, *fin)
    return table


def _sampled_cells(s: dict) -> list[str]:
    start, final = s["initial_eval_mean_at_k"], s["final_eval_mean_at_k"]
    return [f"{start:.3f}", f"{final:.3f}", f"{final - start:+.3f}"]


# ---------------------------------------------------------------- bench and report

# light (config, storage); its constants feed the help
from gradalign.analysis import bench  # noqa: E402

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks over modes, regimes and seeds.")
app.add_typer(bench_app, name="bench")


def _names(value: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        console.print(f"[red]{what}:[/red] {unknown or value!r} not in {', '.join(known)}")
        raise typer.Exit(2)
    return names


@bench_app.command("regimes")
def bench_regimes(
    regimes: Annotated[str, typer.Option(help="comma-separated data regimes")] = ",".join(bench.BENCH_REGIMES),
    modes: Annotated[str, typer.Option(help="comma-separated selection modes")] = ",".join(bench.BENCH_MODES),
    seeds: Annotated[int | None, typer.Option(min=1, help=f"seeds 0..N-1 per cell (default {bench.SEEDS}; {bench.QUICK_SEEDS} with --quick)")] = None,
    out: Annotated[Path | None, typer.Option(help="bench directory (default runs/bench; runs/bench-quick with --quick)")] = None,
    quick: Annotated[bool, typer.Option(help=f"smoke-size runs: --set {' '.join(bench.QUICK)}")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="runs in parallel (each its own process, CPU threads shared out)")] = 2,
    vary_data: Annotated[bool, typer.Option("--vary-data/--fixed-data", help="data.seed = seed: each seed draws its own pool, corruption, validation and eval sets (the warm start is shared); --fixed-data pins data.seed to --data-seed")] = True,
    data_seed: Annotated[int, typer.Option(help="data.seed of every run with --fixed-data")] = 0,
    config: Annotated[Path | None, typer.Option(help="YAML config every run starts from")] = None,
    set_: SetOpt = None,
) -> None:  # fmt: skip
    """Every mode on every regime over seeds, one process and run directory per run
    (OUT/<regime>/<mode>/seed<k>; finished runs are skipped), then OUT/report/."""
    from typing import get_args, get_type_hints

    from gradalign.analysis.report import build_report
    from gradalign.config import DataConfig
    from gradalign.core.selection import MODES

    out = out or Path("runs/bench-quick" if quick else "runs/bench")
    try:
        results, wall = bench.run_regimes(
            out,
            _names(regimes, get_args(get_type_hints(DataConfig)["regime"]), "--regimes"),
            _names(modes, MODES, "--modes"),
            seeds if seeds is not None else (bench.QUICK_SEEDS if quick else bench.SEEDS),
            [*(bench.QUICK if quick else ()), *(set_ or [])],
            None if vary_data else data_seed,
            config,
            jobs,
        )
    except bench.BenchError as err:
        console.print(f"[red]bench error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(results_table(build_report(out)))
    failed = sum(r.status == "failed" for r in results)
    console.print(
        f"bench wall time {wall:.0f} s ({failed} failed, "
        f"{sum(r.status == 'skipped' for r in results)} skipped) · report: {out}/report/report.md"
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="bench directory or one run directory")],
) -> None:
    """Rebuild DIR/report/ (report.md, results.json, plots) from the saved runs; runs nothing."""
    from gradalign.analysis.report import build_report

    try:
        res = build_report(directory)
    except FileNotFoundError as err:
        console.print(f"[red]report error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(round_table(res["rounds"]) if "rounds" in res else results_table(res))
    console.print(f"report: {directory / 'report' / 'report.md'}")


def round_table(rows: list[dict]) -> Table:
    """One run's rounds (`analysis.run_report`): eval accuracy, pass rates, split-half cosine,
    fallbacks."""
    from gradalign.analysis.run_report import cells

    header, body = cells(rows)
    table = Table(title="one run, per round", box=None)
    for col in header:
        table.add_column(col, justify="right")
    for line in body:
        table.add_row(*line)
    return table


def results_table(res: dict) -> Table:
    """Final accuracy and the paired difference to rand, mean ± 95% CI, per regime and mode."""
    from gradalign.analysis.report import fmt_ci

    def cell(stat: dict | None, signed: bool = False) -> str:
        return fmt_ci(stat, signed).split(" (n=")[0]

    table = Table(title="final eval accuracy, mean ± 95% CI over seeds", box=None)
    cols = ("regime", "mode", "seeds", "greedy", "Δ vs rand (paired)", "mean@k", "Δ@k vs rand")
    for col in cols:
        table.add_column(col, justify="left" if col in ("regime", "mode") else "right")
    sampled = res.get("final_mean_at_k", {})
    for regime, by_mode in res["final_accuracy"].items():
        for mode, stat in by_mode.items():
            diff = res["vs_rand"].get(regime, {}).get(mode)
            at_k = sampled.get(regime, {}).get(mode)
            diff_k = res.get("mean_at_k_vs_rand", {}).get(regime, {}).get(mode)
            table.add_row(
                regime, mode, str(stat["n"]), cell(stat), cell(diff, signed=True),
                cell(at_k), cell(diff_k, signed=True),
            )  # fmt: skip
    return table


if __name__ == "__main__":
    app()
