"""`gradalign score`: score a whole pool once under the starting policy, for any trainer.

The pool of a run config (its problem files or built-in regime, model, mode, k_r, k_v,
scored parameters, LoRA, device) is scored in consecutive chunks of ``select.chunk_size``
problems (pool order; the last chunk may be smaller) by the loop's one chunk-scoring path
(`engine.round_scoring.ChunkScorer`), with no training in between. Chunk c samples its
candidate rollouts with `round_seed(seed, c, Stream.CANDIDATES)`; every chunk uses the same
validation rollouts, sampled once with `round_seed(seed, 0, Stream.VALIDATION)`, so the
validation direction g^_V is the same for the whole pool.

The output directory::

    OUT/chunks/manifest.json   the config and the chunks' problem ids
    OUT/chunks/NNNN.jsonl      one finished chunk's statistics (kept: a rerun resumes)
    OUT/chunks/NNNN.metrics.json  its metrics, named as a run's (`round_scoring`)
    OUT/scores.jsonl           one row per pool problem, in pool order
    OUT/selected.parquet       with --top / --fraction: the chosen Parquet rows (`export`)
    OUT/selected.jsonl         ... or the chosen JSONL lines, byte for byte

Scores are the mode's over the whole pool (`core.selection.select`, its zero-variance rule
and tie-breaks by id); ``rank`` is each problem's place in that order (sampled modes: the
draw order, seeded by `round_seed(seed, 0, Stream.SELECT)`). Under torchrun every rank
scores its share of each chunk's groups and rank 0 writes, as in `gradalign run`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradalign import ranks
from gradalign.config import RESUMABLE_FIELDS, Config, ConfigError, differing_fields, load_config
from gradalign.core.selection import STATS, Candidates, SelectionWarning, select
from gradalign.data.problems import Problem, Stream, provenance, round_seed
from gradalign.engine.policy import resolve_device
from gradalign.engine.rollout import Rollouts
from gradalign.engine.round_scoring import ChunkScorer
from gradalign.progress import bar, log
from gradalign.run import sharded_state
from gradalign.run.checkpoint import ResumeError, RunLock, from_main
from gradalign.run.original_rows import write_selected
from gradalign.run.setup import Setup, build_setup
from gradalign.storage import read_json, read_jsonl, write_json, write_jsonl


@dataclass(frozen=True)
class ScoreResult:
    """What `score` wrote."""

    out_dir: Path
    scores: Path  # OUT/scores.jsonl
    selected: list[Path]  # OUT/selected.parquet and / or OUT/selected.jsonl (empty: no --top)
    n_scored: int  # pool problems scored
    n_selected: int  # rows chosen (0 without --top / --fraction)


def score(
    config: Config | str | Path,
    out_dir: str | Path,
    top: int | None = None,
    fraction: float | None = None,
    overrides: Sequence[str] = (),
    setup: Setup | None = None,
) -> ScoreResult:
    """Score the pool of `config` (a `Config` or a YAML path, with ``section.field=value``
    `overrides`) into `out_dir`, and with `top` (N problems) or `fraction` (a share of the
    pool) write the chosen rows in the pool files' own format. A directory holding finished
    chunks of the same config is resumed; one of another config is refused (ResumeError)."""
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    if cfg.select.mode == "none":
        raise ConfigError("select.mode: 'none' selects nothing to score; choose a scored mode")
    if top is not None and fraction is not None:
        raise ConfigError("--top and --fraction: give one of them")
    if top is not None and top < 1:
        raise ConfigError(f"--top: expected at least 1 problem, got {top}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--fraction: expected a share in (0, 1], got {fraction}")
    out = Path(out_dir)
    ranks.init_from_env(resolve_device(cfg.model.device))
    with contextlib.ExitStack() as stack:
        setup = setup or build_setup(cfg)
        if cfg.train.fsdp:  # every rank holds 1/R of the policy (docs/fsdp.md)
            sharded_state.shard_policy(setup.model, resolve_device(cfg.model.device))
        pool, size = setup.sets.pool, cfg.select.chunk_size
        chunks = [pool[i : i + size] for i in range(0, len(pool), size)]

        def prepare() -> dict[int, dict]:
            stack.enter_context(RunLock(out))  # no other scorer or run in this directory
            return _finished(cfg, out, chunks)

        done = from_main(prepare)
        stats = _score_chunks(setup, out, chunks, done)
        n = len(pool) if fraction is None else round(fraction * len(pool))
        n = max(1, min(top if top is not None else n, len(pool)))
        scores, order = _rank(cfg, pool, stats, n)
        rank_of = {pos: r for r, pos in enumerate(order)}
        chosen = [pool[j] for j in order[:n]] if top is not None or fraction is not None else []
        selected: list[Path] = []
        if ranks.is_main():
            write_jsonl(
                out / "scores.jsonl",
                (_row(p, stats, scores, rank_of.get(j), j) for j, p in enumerate(pool)),
            )
            if chosen:
                selected = write_selected(out, chosen)
    log(f"[{cfg.select.mode}] scored {len(pool)} problems: {out / 'scores.jsonl'}")
    for path in selected:
        log(f"[{cfg.select.mode}] selected {len(chosen)} problems: {path}")
    return ScoreResult(out, out / "scores.jsonl", selected, len(pool), len(chosen))


def _manifest(cfg: Config, chunks: list[list[Problem]]) -> dict[str, Any]:
    return {"config": cfg.to_dict(), "chunks": [[p.id for p in c] for c in chunks]}


def _finished(cfg: Config, out: Path, chunks: list[list[Problem]]) -> dict[int, dict]:
    """The chunk statistics a previous `score` of this config left in `out` (a chunk file
    that is unreadable or of other problems is scored again); writes the manifest."""
    path, manifest = out / "chunks" / "manifest.json", _manifest(cfg, chunks)
    current = json.loads(json.dumps(manifest))  # as written
    if path.is_file():
        try:
            saved = read_json(path)
        except (ValueError, OSError):
            saved = None
        if isinstance(saved, dict):
            diffs = differing_fields([saved.get("config", {}), current["config"]], RESUMABLE_FIELDS)
            diffs = {k: v for k, v in diffs.items() if not k.startswith("train.")}  # not scored
            if diffs or saved.get("chunks") != current["chunks"]:
                why = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diffs.items())
                raise ResumeError(
                    f"{out} holds the scores of another config or pool "
                    f"({why or 'other chunks'}); choose another --out or remove {out / 'chunks'}"
                )
    write_json(path, manifest)
    done = {}
    for c, chunk in enumerate(chunks):
        f = out / "chunks" / f"{c:04d}.jsonl"
        if not f.is_file():
            continue
        try:
            rows = read_jsonl(f)
            if [r["id"] for r in rows] != [p.id for p in chunk]:
                raise ValueError("its problems are not this chunk's")
            done[c] = {name: [r[name] for r in rows] for name in (*STATS, "val_norm")}
        except (ValueError, KeyError, TypeError, OSError) as err:
            log(f"warning: {f} is unusable ({err}); scoring chunk {c + 1} again")
    return done


def _validation_once(sample: Any) -> Any:
    """`sample` with one set of validation rollouts for every chunk (the first chunk's seed):
    every chunk is scored against the same g^_V."""
    cache: dict[str, Rollouts] = {}

    def draw(items: Sequence[Problem], k: int, seed: int, what: str, config: Config) -> Rollouts:
        if what != "validation rollouts":
            return sample(items, k, seed, what)
        if "val" not in cache:
            cache["val"] = sample(items, k, round_seed(config.seed, 0, Stream.VALIDATION), what)
        return cache["val"]

    return draw


def _score_chunks(
    setup: Setup, out: Path, chunks: list[list[Problem]], done: dict[int, dict]
) -> dict[str, np.ndarray]:
    """Every chunk's statistics (finished ones read back), concatenated in pool order."""
    cfg = setup.cfg
    draw = functools.partial(_validation_once(setup.sample), config=cfg)
    scorer = ChunkScorer(
        setup.model, setup.tokenizer, setup.sets.validation, cfg.rollout, cfg.select,
        cfg.seed, draw, bar=bar,
    )  # fmt: skip
    parts = []
    shown: set[str] = set()  # one g^_V for every chunk: its warnings are shown once
    with bar("chunks", len(chunks)) as advance:
        for c, chunk in enumerate(chunks):
            if c not in done:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", SelectionWarning)
                    done[c] = _score_one(scorer, out, c, chunk)
                for text in dict.fromkeys(str(w.message) for w in caught):
                    if text not in shown:
                        shown.add(text)
                        log(f"warning: {text}")
                log(
                    f"[{cfg.select.mode}] chunk {c + 1}/{len(chunks)}: {len(chunk)} problems scored"
                )
            parts.append(done[c])
            advance(1)
    return {
        name: np.array([v for part in parts for v in part[name]], dtype=float)
        for name in (*STATS, "val_norm")
    }


def _score_one(scorer: ChunkScorer, out: Path, c: int, chunk: list[Problem]) -> dict:
    scored = scorer.score(chunk, np.array([p.id for p in chunk]), c)
    cand = scored.candidates
    stats = {
        name: [None] * len(chunk) if getattr(cand, name) is None else getattr(cand, name).tolist()
        for name in STATS
    }
    stats["val_norm"] = [cand.val_norm] * len(chunk)
    if ranks.is_main():  # the metrics first: the rows mark the chunk finished
        write_json(out / "chunks" / f"{c:04d}.metrics.json", scored.metrics)
        rows = [{"id": p.id, **{k: v[j] for k, v in stats.items()}} for j, p in enumerate(chunk)]
        write_jsonl(out / "chunks" / f"{c:04d}.jsonl", rows)
    return stats


def _rank(
    cfg: Config, pool: list[Problem], stats: dict[str, np.ndarray], n: int
) -> tuple[np.ndarray, list[int]]:
    """The mode's scores [P] over the whole pool and the pool positions in its order (the
    first n are chosen)."""

    def col(name: str) -> np.ndarray | None:  # None: the mode did not compute it
        values = stats[name]
        return None if np.isnan(values).all() else values

    ids = np.array([p.id for p in pool])
    zv, val_norm = col("zero_variance"), col("val_norm")
    cand = Candidates(
        ids,
        col("pass_rate"),
        None if zv is None else zv.astype(bool),
        col("dot_val"),
        col("dot_chunk"),
        col("norm"),
        None if val_norm is None else float(val_norm[0]),  # one g^_V for every chunk
    )
    rng = np.random.default_rng(round_seed(cfg.seed, 0, Stream.SELECT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SelectionWarning)
        full = select(cfg.select.mode, cand, len(pool), rng, cfg.select.zero_variance)
    for w in caught:
        log(f"warning: {w.message}")
    pos = {int(i): j for j, i in enumerate(ids)}
    return full.scores, [pos[int(i)] for i in full.ids]


def _row(
    p: Problem, stats: dict[str, np.ndarray], scores: np.ndarray, rank: int | None, j: int
) -> dict[str, Any]:
    """scores.jsonl: a problem's provenance, score, rank and statistics (`STATS`, named as a
    run's scores.jsonl names them)."""
    row: dict[str, Any] = {"id": p.id, "source": p.source, **provenance(p)}
    row |= {"score": scores[j], "rank": rank} | {name: stats[name][j] for name in STATS}
    zv = stats["zero_variance"][j]
    row["zero_variance"] = None if np.isnan(zv) else bool(zv)
    return row
