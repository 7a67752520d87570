"""`gradalign bench regimes`: selection modes × data regimes × seeds, one process per run.

Every run is its own process (``python -m gradalign.cli run --set ...``) writing its own run
directory ``OUT/<regime>/<mode>/seed<k>``, so a failing run loses nothing else: its exit code,
wall time and stderr tail (stdout's when stderr is empty, as after a config error) go to
``bench-run.json`` there (the full output to ``stdout.log`` / ``stderr.log``) and into the
report; ``OUT/bench.json`` records the latest invocation. A run whose directory already
holds ``summary.json`` with the same resolved config is skipped, so a re-run resumes an
interrupted bench, and ``--seeds 5`` after ``--seeds 3`` adds seeds 3 and 4 only.

Seeds: seed k sets ``seed=k`` (rollouts, chunk order, training) and, by default
(``data_seed=None``, the CLI's `--vary-data`), ``data.seed=k`` too (pool, corruption,
validation and eval sets), so the spread over seeds covers the data draw; ``data_seed`` pins
``data.seed`` for every seed (`--fixed-data --data-seed N`). The warm start is drawn from its
own partition of the task's prompts with ``model.warmstart_seed``, so every run of a bench
shares one, cached: only the first run pays it (~7 min on 2 cores for the default's 1,000
steps).

Same budget for every mode: ``rounds × train.steps_per_round`` GRPO steps of
``train.batch_size`` problems × ``train.num_generations`` completions (the report checks it
from the saved metrics); the eval set is disjoint from the validation set (the loop checks).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from gradalign.config import (
    BENCH_FIELDS,
    LOCATION_FIELDS,
    ConfigError,
    differing_fields,
    load_config,
    upgrade_saved,
)
from gradalign.progress import bar, console
from gradalign.storage import read_json, write_json

BENCH_REGIMES = ("noisy", "imbalance", "lowutility")
BENCH_MODES = ("sim", "dot", "align", "accgreedy", "rand", "none")
# --quick: a smoke test of the whole bench (3 warm starts + 18 short runs: ~4 min on 2 idle
# cores); the policy is too weak and trains too briefly for the numbers to mean much
QUICK = (
    "rounds=3",
    "train.steps_per_round=2",
    "train.batch_size=4",
    "model.warmstart_steps=150",
    "data.pool_size=128",
    "data.val_size=8",
    "data.eval_size=64",
    "select.chunk_size=32",
    "select.k=4",
)
QUICK_SEEDS = 1
SEEDS = 5  # the default: enough for a t-interval that is not all width
CONTROLLED = (*BENCH_FIELDS, "out_dir")  # set per run
TAIL_LINES = 30
Status = Literal["done", "skipped", "failed"]


class BenchError(ValueError):
    """The bench cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the bench: a (regime, mode, seed) cell and its `--set` overrides."""

    regime: str
    mode: str
    seed: int
    data_seed: int
    out_dir: Path
    overrides: tuple[str, ...]  # shared overrides first, this run's own last
    config: Path | None = None  # YAML the overrides apply to

    @property
    def name(self) -> str:
        return f"{self.regime}/{self.mode}/seed{self.seed}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gradalign.cli", "run"]
        cmd += [str(self.config)] if self.config else []
        for item in self.overrides:
            cmd += ["--set", item]
        return cmd


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    status: Status
    wall_s: float  # this invocation's wall time; for a skipped run, its recorded wall time
    returncode: int | None = None
    stderr_tail: str = ""


def plan_runs(
    out: Path,
    regimes: Sequence[str],
    modes: Sequence[str],
    seeds: int,
    overrides: Sequence[str] = (),
    data_seed: int | None = None,
    config: Path | None = None,
) -> list[RunSpec]:
    """Runs in the order regime → seed → mode, so an interrupted bench leaves whole seeds."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in CONTROLLED:
            raise BenchError(
                f"--set {item}: the bench sets {key} per run; use --regimes, --modes, --seeds, "
                "--data-seed or --out"
            )
    specs = []
    for regime in regimes:
        for seed in range(seeds):
            ds = seed if data_seed is None else data_seed
            for mode in modes:
                run_dir = out / regime / mode / f"seed{seed}"
                own = (
                    f"data.regime={regime}",
                    f"select.mode={mode}",
                    f"seed={seed}",
                    f"data.seed={ds}",
                    f"out_dir={run_dir}",
                )
                specs.append(RunSpec(regime, mode, seed, ds, run_dir, (*overrides, *own), config))
    return specs


def config_changes(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every field of `old` whose value differs in `new`
    (`config.LOCATION_FIELDS` ignored).

    Fields missing from `old` (added to the code since that run) count as unchanged."""
    diffs = differing_fields([upgrade_saved(old), new], LOCATION_FIELDS, absent=_ABSENT)
    return [
        f"{name}: {a!r} there, {b!r} now"
        for name, (a, b) in diffs.items()
        if a is not _ABSENT and b is not _ABSENT
    ]


_ABSENT = object()


def is_finished(spec: RunSpec) -> bool:
    """True when the run directory holds a finished run of this very config.

    Raises `BenchError` when it holds a finished run of a different config (reusing --out
    across settings, or across code whose defaults changed, would silently mix results)."""
    saved = spec.out_dir / "config.yaml"
    if not (spec.out_dir / "summary.json").is_file() or not saved.is_file():
        return False
    try:
        wanted = load_config(spec.config, list(spec.overrides)).to_dict()
    except ConfigError:
        return False  # it will fail again, and be recorded
    changes = config_changes(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, wanted)
    if changes:
        raise BenchError(
            f"{spec.out_dir} holds a finished run of a different config ({'; '.join(changes)}); "
            "use another --out, delete that directory, or --set the old values"
        )
    return True


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_one(spec: RunSpec, threads: int | None = None) -> RunResult:
    """Run one spec as its own process; record how it ended in `bench-run.json`."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    env = {"COLUMNS": "200", **os.environ}  # rich in the child: unwrapped lines in the logs
    if threads is not None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)  # parallel jobs share the cores
    t0 = time.perf_counter()
    with (
        open(spec.out_dir / "stdout.log", "w", encoding="utf-8") as out,
        open(spec.out_dir / "stderr.log", "w", encoding="utf-8") as err,
    ):
        rc = subprocess.run(spec.command(), stdout=out, stderr=err, env=env).returncode
    wall = time.perf_counter() - t0
    ok = rc == 0 and (spec.out_dir / "summary.json").is_file()
    tail = "" if ok else (_tail(spec.out_dir / "stderr.log") or _tail(spec.out_dir / "stdout.log"))
    result = RunResult(spec, "done" if ok else "failed", wall, rc, tail)
    write_json(
        spec.out_dir / "bench-run.json",
        {
            "regime": spec.regime,
            "mode": spec.mode,
            "seed": spec.seed,
            "data_seed": spec.data_seed,
            "status": result.status,
            "returncode": rc,
            "wall_s": wall,
            "command": spec.command(),
            "stderr_tail": tail,
        },
    )
    return result


def _skipped(spec: RunSpec) -> RunResult:
    return RunResult(spec, "skipped", float(read_json(spec.out_dir / "summary.json")["wall_s"]))


def run_bench(
    specs: Sequence[RunSpec],
    jobs: int = 1,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run every unfinished spec (`jobs` at a time); results in the order of `specs`.

    With jobs > 1 the first run of each warm start (`warmstart_group`) goes first, alone in
    its group, so that parallel runs do not redo the same warm start."""
    finished = {spec for spec in specs if is_finished(spec)}  # may raise BenchError first
    results: dict[RunSpec, RunResult] = {}

    def one(spec: RunSpec) -> None:
        threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
        results[spec] = _skipped(spec) if spec in finished else run_one(spec, threads)
        if on_result is not None:
            on_result(results[spec])

    if jobs <= 1:
        for spec in specs:
            one(spec)
    else:
        first: dict[str, RunSpec] = {}
        for spec in specs:
            if spec not in finished:
                first.setdefault(warmstart_group(spec), spec)
        waves = [list(first.values()), [s for s in specs if s not in first.values()]]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for wave in waves:
                list(pool.map(one, wave))
    return [results[spec] for spec in specs]


def warmstart_group(spec: RunSpec) -> str:
    """What a built-in model's warm start depends on (its `model` section and the task
    families); a spec whose config does not load is a group of its own."""
    try:
        cfg = load_config(spec.config, list(spec.overrides))
    except ConfigError:
        return spec.name
    return repr((dataclasses.asdict(cfg.model), cfg.data.families))


def write_bench_record(out: Path, results: Sequence[RunResult], settings: dict) -> None:
    """`OUT/bench.json`: how the bench was invoked and how each run ended."""
    runs = [
        {"run": r.spec.name, "status": r.status, "wall_s": r.wall_s, "returncode": r.returncode}
        for r in results
    ]
    write_json(out / "bench.json", {**settings, "runs": runs})


def config_errors(specs: Sequence[RunSpec]) -> dict[RunSpec, str]:
    """The specs whose config does not load, with the error (checked in-process, cheaply)."""
    errors = {}
    for spec in specs:
        try:
            load_config(spec.config, list(spec.overrides))
        except ConfigError as err:
            errors[spec] = str(err)
    return errors


def run_regimes(
    out: Path,
    regimes: Sequence[str],
    modes: Sequence[str],
    seeds: int,
    overrides: Sequence[str] = (),
    data_seed: int | None = None,
    config: Path | None = None,
    jobs: int = 1,
) -> tuple[list[RunResult], float]:
    """Plan, run (with a progress bar and a line per run) and record the bench.

    Returns the results and the wall time; raises `BenchError` when nothing can run."""
    specs = plan_runs(out, regimes, modes, seeds, overrides, data_seed, config)
    errors = config_errors(specs)
    if len(errors) == len(specs):
        raise BenchError(f"no run has a valid config: {next(iter(errors.values()))}")
    console.print(f"bench: {len(specs)} runs under {out}/, {jobs} at a time")
    t0, count = time.perf_counter(), []
    with bar("bench runs", len(specs)) as advance:

        def show(r: RunResult) -> None:
            count.append(r)
            note = {"done": "done", "skipped": "skipped (finished earlier)"}.get(r.status)
            last = r.stderr_tail.splitlines()[-1:] or [""]
            note = note or f"FAILED (exit {r.returncode}): {last[0][:120]}"
            console.print(
                f"[{len(count):>3}/{len(specs)}] {r.spec.name:<28} {r.wall_s:7.1f} s  {note}",
                markup=False,
            )
            advance(1)

        results = run_bench(specs, jobs, show)
    wall = time.perf_counter() - t0
    settings = {
        "regimes": list(regimes),
        "modes": list(modes),
        "seeds": seeds,
        "data_seed": data_seed,
        "config": None if config is None else str(config),
        "overrides": list(overrides),
        "jobs": jobs,
        "wall_s": wall,
    }
    write_bench_record(out, results, settings)
    return results, wall
