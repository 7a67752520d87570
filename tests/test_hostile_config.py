"""Hostile configs, rewards, records and checkpoints: each case ends in a one-line message
naming the file, line or field and the cause (exit 2 from the command line, `ConfigError`
from Python), never in a traceback or a hang; what was valid around it is kept."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from problem_records import read_problems
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    RolloutConfig,
    SelectConfig,
    TrainConfig,
    load_config,
)
from gradalign.data import problems
from gradalign.data.files import FileSpec, load_file
from gradalign.data.problems import MAX_LINE_BYTES, Problem, ProblemError
from gradalign.data.rewards import checked_reward
from gradalign.data.tasks import make_regime
from gradalign.run.checkpoint import latest_checkpoint, save_checkpoint

runner = CliRunner()


def cli(*args: str) -> tuple[int, list[str]]:
    """Exit code and error lines of an in-process `gradalign` call, which must end in an
    exit, not in an uncaught exception (a traceback)."""
    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("config error: ")]
    return res.exit_code, errors


# --- config files given to `gradalign run` ---------------------------------------------------

LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)

# (case, YAML text, message after "config error: {path}: "); every one refused before the
# run directory is created
BAD_FILES = [
    ("alias bomb", LAUGHS, "invalid YAML (alias *a (write the value out instead), line 2 column 8)"),
    ("one alias", "select: {mode: &m sim}\ntrain: {loss_type: *m}\n", "invalid YAML (alias *m (write the value out instead), line 2 column 20)"),
    ("duplicate top-level key", "rounds: 2\nseed: 1\nrounds: 3\n", "rounds: given twice (lines 1 and 3); keep one"),
    ("duplicate field", "select:\n  k: 2\n  mode: sim\n  k: 4\n", "select.k: given twice (lines 2 and 4); keep one"),
    ("duplicate section", "select:\n  k: 2\nselect:\n  mode: dot\n", "select: given twice (lines 1 and 3); keep one"),
    ("duplicate key in a file entry", "data:\n  pool_files:\n    - path: a.jsonl\n      path: b.jsonl\n", "data.pool_files[0].path: given twice (lines 3 and 4); keep one"),
    ("nested too deeply", "rounds: " + "[" * 100_000 + "\n", "invalid YAML (nested too deeply)"),
    ("5000-digit integer", "rounds: 1" + "0" * 5000 + "\n", "invalid YAML (Exceeds the limit (4300 digits) for integer string conversion: value has 5001 digits; use sys.set_int_max_str_digits() to increase the limit)"),
]  # fmt: skip

# (case, YAML text, the whole message after "config error: ")
BAD_VALUES = [
    ("seed above 2**32-1", "seed: 4294967296\n", "seed: must be in 0 .. 2**32-1 (= 4294967295, what numpy and torch both accept), got 4294967296"),
    ("data.seed negative", "data:\n  seed: -1\n", "data.seed: must be >= 0, got -1"),
    ("data.seed above 2**32-1", "data:\n  seed: 1099511627776\n", "data.seed: must be in 0 .. 2**32-1 (= 4294967295, what numpy and torch both accept), got 1099511627776"),
    ("rounds above int64", "rounds: 100000000000000000000\n", "rounds: must be at most 2**63 - 1, got 100000000000000000000"),
    ("learning rate 10**400", "train:\n  learning_rate: 1" + "0" * 400 + "\n", "train.learning_rate: <a 1329-bit integer> is too large for a float"),
    ("seed is a list", "seed: [1, 2]\n", "seed: expected int, got [1, 2]"),
    ("params last:x", "select:\n  params: last:x\n", "select.params: 'last:x': N in 'last:N' must be a whole number >= 1 (the last N transformer blocks)"),
    ("params last:0", "select:\n  params: last:0\n", "select.params: 'last:0': N in 'last:N' must be a whole number >= 1 (the last N transformer blocks)"),
    ("params last:-1", "select:\n  params: last:-1\n", "select.params: 'last:-1': N in 'last:N' must be a whole number >= 1 (the last N transformer blocks)"),
    ("imbalance with one family", "data:\n  regime: imbalance\n  families: [countdown2]\n", "data.families: regime 'imbalance' needs two or more families (the minority 'countdown2' and a majority), got ['countdown2']; add one or change data.regime"),
    ("a family twice", "data:\n  families: [addition, countdown, addition]\n", "data.families: 'addition' is listed twice; list each family once"),
    ("device garbage", "model:\n  device: garbage\n", "model.device: 'garbage' is not 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("device cuda:x", "model:\n  device: cuda:x\n", "model.device: 'cuda:x' is not 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("corrupt_frac above 1", "data:\n  corrupt_frac: 1.5\n", "data.corrupt_frac: must be in [0, 1], got 1.5"),
    ("warm-start seed above 2**32-1", "model:\n  warmstart_seed: 4294967296\n", "model.warmstart_seed: must be in 0 .. 2**32-1 (= 4294967295, what numpy and torch both accept), got 4294967296"),
    ("flaw share above 1", "model:\n  warmstart_flaw_frac: 1.5\n", "model.warmstart_flaw_frac: must be in [0, 1], got 1.5"),
    ("eval samples negative", "rollout:\n  eval_samples: -1\n", "rollout.eval_samples: must be >= 0, got -1"),
    ("per-family flaw written with =", "model:\n  warmstart_family_flaws: ['addition=junk']\n", "model.warmstart_family_flaws: 'addition=junk': unknown family 'addition=junk' (known: addition, countdown, countdown2, addition_steps); write each item as 'family:flaw' or 'family:flaw:share'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "message"), BAD_FILES, ids=[c for c, _, _ in BAD_FILES])
def test_a_hostile_config_file_is_refused_naming_file_and_cause(
    tmp_path: Path, case: str, text: str, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"{text}")
    out = tmp_path / "run"
    assert cli("run", str(path), "--set", f"out_dir={out}") == (
        2,
        [f"config error: {path}: {message}"],
    )
    assert not out.exists()
    assert path.read_text() == text  # the user's file is left as it was


@pytest.mark.parametrize(("case", "text", "message"), BAD_VALUES, ids=[c for c, _, _ in BAD_VALUES])
def test_a_value_no_stage_can_use_is_refused_naming_the_field(
    tmp_path: Path, case: str, text: str, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text + f"out_dir: {tmp_path / 'run'}\n")
    assert cli("run", str(path)) == (2, [f"config error: {message}"])
    assert not (tmp_path / "run").exists()


def test_a_key_given_twice_in_an_override_is_refused(tmp_path: Path) -> None:
    override = "data.pool_files=[{path: a.jsonl, path: b.jsonl}]"
    assert cli("run", "--set", override, "--set", f"out_dir={tmp_path / 'run'}") == (
        2,
        [f"config error: data.pool_files[0].path: given twice in the override {override!r}; keep one"],
    )  # fmt: skip


@pytest.mark.parametrize("frac", ["0", "0.0", "1"])
def test_corrupt_frac_zero_and_one_are_allowed_as_documented(frac: str) -> None:
    cfg = load_config(None, [f"data.corrupt_frac={frac}", "data.pool_size=64"])
    sets = make_regime("noisy", cfg.data.families, 64, 8, 8, 0, cfg.data.corrupt_frac)
    corrupted = sum("corruption" in p.meta for p in sets.pool)
    assert cfg.data.corrupt_frac == float(frac) and corrupted == 64 * int(float(frac))


# --- the same rules for a Config built in Python ---------------------------------------------

BAD_OBJECTS: list[tuple[str, Callable[[], Config], str]] = [
    ("rounds is text", lambda: Config(rounds="many"), "rounds: expected int, got 'many'"),
    ("seed is a bool", lambda: Config(seed=True), "seed: expected int, got True"),
    ("seed above 2**32-1", lambda: Config(seed=2**32), "seed: must be in 0 .. 2**32-1 (= 4294967295, what numpy and torch both accept), got 4294967296"),
    ("a section given as a dict", lambda: Config(select={"k": 3}), "select: expected a SelectConfig, got {'k': 3}"),
    ("k leaves nothing", lambda: Config(select=SelectConfig(k=100)), "select.k (100) leaves 0 problems from chunk_size 64; lower k or raise chunk_size"),
    ("params last:x", lambda: Config(select=SelectConfig(params="last:x")), "select.params: 'last:x': N in 'last:N' must be a whole number >= 1 (the last N transformer blocks)"),
    ("unknown mode", lambda: Config(select=SelectConfig(mode="best")), "select.mode: 'best' is not one of sim, dot, norm, align, negsim, simacc, accgreedy, acc, rand, none"),
    ("device gpu", lambda: Config(model=ModelConfig(device="gpu")), "model.device: 'gpu' is not 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("NaN learning rate", lambda: Config(train=TrainConfig(learning_rate=float("nan"))), "train.learning_rate: expected a finite number, got nan"),
    ("k_r is a bool", lambda: Config(rollout=RolloutConfig(k_r=True)), "rollout.k_r: expected int, got True"),
    ("imbalance with one family", lambda: Config(data=DataConfig(regime="imbalance", families=["countdown2"])), "data.families: regime 'imbalance' needs two or more families (the minority 'countdown2' and a majority), got ['countdown2']; add one or change data.regime"),
    ("families not a list", lambda: Config(data=DataConfig(families=3)), "data.families: expected a list, got 3"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "build", "message"), BAD_OBJECTS, ids=[c for c, _, _ in BAD_OBJECTS]
)
def test_a_config_built_in_python_is_checked_as_a_file_is(
    case: str, build: Callable[[], Config], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value) == message


def test_python_values_are_coerced_like_yaml_ones() -> None:
    cfg = Config(rounds=np.int64(3), train=TrainConfig(learning_rate=1), seed=2**32 - 1)
    assert (cfg.rounds, cfg.train.learning_rate, cfg.seed) == (3, 1.0, 2**32 - 1)
    assert type(cfg.rounds) is int and type(cfg.train.learning_rate) is float
    assert Config(data=DataConfig(corrupt_frac=0)).data.corrupt_frac == 0.0
    assert Config(rollout=RolloutConfig(eval_samples=0)).rollout.eval_samples == 0  # as documented


def test_a_config_changed_after_it_was_built_is_checked_when_run(tmp_path: Path) -> None:
    from gradalign.run.loop import run

    cfg = Config(out_dir=str(tmp_path / "run"))
    cfg.select.k = 100
    with pytest.raises(ConfigError, match=r"^select\.k \(100\) leaves 0 problems"):
        run(cfg)
    assert not (tmp_path / "run").exists()


# --- over-long JSONL lines: rejected by line, in bounded memory -------------------------------


def good(i: int) -> bytes:
    return b'{"question": "what is %d + 1?", "answer": "%d"}\n' % (i, i + 1)


def sized(n: int) -> bytes:
    """A valid record of exactly n bytes (newline not counted)."""
    head, tail = b'{"question": "', b'", "answer": "7"}'
    return head + b"q" * (n - len(head) - len(tail)) + tail


def test_a_50_mb_line_is_rejected_unread_and_its_neighbours_kept(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    with path.open("wb") as fh:
        fh.write(good(0) + sized(50 * 2**20) + b"\n" + good(1))
    tracemalloc.start()
    try:
        result = load_file(FileSpec(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE_BYTES  # a whole-line read would hold 50 MB (twice, decoded)
    assert [(p.answer, p.meta["line"]) for p in result.problems] == [("1", 1), ("2", 3)]
    assert [str(r) for r in result.rejected] == [
        f"{path}:2: line longer than 8 MiB (MAX_LINE_BYTES); not read"
    ]


@pytest.mark.parametrize(
    ("size", "newline", "kept"),
    [
        (MAX_LINE_BYTES, True, True),
        (MAX_LINE_BYTES, False, True),
        (MAX_LINE_BYTES + 1, True, False),
        (MAX_LINE_BYTES + 1, False, False),
    ],
    ids=["at the limit", "at the limit, last line", "one byte over", "one byte over, last line"],
)
def test_the_line_limit_is_exact(tmp_path: Path, size: int, newline: bool, kept: bool) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_bytes(good(0) + sized(size) + (b"\n" if newline else b""))
    result = load_file(FileSpec(path))
    assert [p.meta["line"] for p in result.problems] == ([1, 2] if kept else [1])
    assert [str(r) for r in result.rejected] == (
        [] if kept else [f"{path}:2: line longer than 8 MiB (MAX_LINE_BYTES); not read"]
    )


def test_read_problems_refuses_an_over_long_line_by_number(tmp_path: Path) -> None:
    path = tmp_path / "problems.jsonl"
    rec = {"id": 1, "prompt": "p", "answer": "a", "source": "s"}
    path.write_bytes(json.dumps(rec).encode() + b"\n" + sized(MAX_LINE_BYTES + 5) + b"\n")
    with pytest.raises(ProblemError) as err:
        read_problems(path)
    assert str(err.value) == f"{path}:2: line longer than 8 MiB (MAX_LINE_BYTES); not read"


# --- user rewards that misbehave score 0 and are counted; the run goes on ---------------------

HOSTILE_REWARDS = """
import sys
from decimal import Decimal

import numpy as np

def huge(problem, completion):
    return 10**400

def exits(problem, completion):
    sys.exit(3)

def exits_plain(problem, completion):
    sys.exit()

def complex_(problem, completion):
    return 1 + 2j

def array(problem, completion):
    return np.array([1.0, 0.0])

class NoFloat:
    def __float__(self):
        raise RuntimeError("no")

    def __repr__(self):
        return "NoFloat()"

def no_float(problem, completion):
    return NoFloat()

def decimal(problem, completion):
    return Decimal("1e400")

class Mute(Exception):
    def __str__(self):
        raise RuntimeError("cannot say")

def mute(problem, completion):
    raise Mute()

def interrupted(problem, completion):
    raise KeyboardInterrupt
"""


@pytest.fixture
def hostile_rewards(reward_module) -> str:
    return reward_module("ga_hostile_rewards2", HOSTILE_REWARDS)


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("huge", "returned <a 1329-bit integer>, too large for a float"),
        ("exits", "raised SystemExit (sys.exit(3))"),
        ("exits_plain", "raised SystemExit (sys.exit(None))"),
        ("complex_", "returned (1+2j), not a number"),
        ("array", "returned array([1., 0.]), not a number"),
        ("no_float", "returned NoFloat(), not a number"),
        ("decimal", "returned inf, not a finite number"),
        ("mute", "raised Mute"),
    ],
)
def test_a_misbehaving_user_reward_scores_zero_with_the_reason(
    hostile_rewards: str, fn: str, why: str
) -> None:
    name = f"{hostile_rewards}:{fn}"
    p = Problem(3, "1+1", "2", "src", name)
    assert checked_reward(p, "2") == (0.0, f"problem 3 (source 'src'): reward '{name}' {why}")
    assert checked_reward(Problem(4, "2+2", "4", "src"), "4") == (1.0, None)  # others unharmed


def test_ctrl_c_inside_a_reward_still_stops(hostile_rewards: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        checked_reward(Problem(3, "1+1", "2", "src", f"{hostile_rewards}:interrupted"), "2")


# --- checkpoints whose state.json has the wrong shape are skipped like truncated ones --------

SHAPES: list[tuple[str, Callable[[dict], Any], str]] = [
    ("sha256 is a string", lambda s: s | {"sha256": "abc"}, "field 'sha256' should be an object of the sha256 of policy.pt and trainer.pt, got 'abc'"),
    ("a hash is a number", lambda s: s | {"sha256": {"policy.pt": 1, "trainer.pt": "x"}}, "field 'sha256' should be an object of the sha256 of policy.pt and trainer.pt, got {'policy.pt': 1, 'trainer.pt': 'x'}"),
    ("round is a string", lambda s: s | {"round": "1"}, "field 'round' should be a round number >= 0, got '1'"),
    ("round is a bool", lambda s: s | {"round": True}, "field 'round' should be a round number >= 0, got True"),
    ("round of another checkpoint", lambda s: s | {"round": 7}, "field 'round' is 7, but the checkpoint is round-0002"),
    ("history is an object", lambda s: s | {"history": {"0": 1}}, "field 'history' should be a list of metrics objects, got {'0': 1}"),
    ("an accuracy is text", lambda s: s | {"history": [{"eval/accuracy": "high"}]}, "field 'history[0].eval/accuracy' should be a number, got 'high'"),
    ("initial is a list", lambda s: s | {"initial": [0.5]}, "field 'initial' should be an object, got [0.5]"),
    ("wall_s is text", lambda s: s | {"wall_s": "1s"}, "field 'wall_s' should be a number, got '1s'"),
    ("config is missing", lambda s: {k: v for k, v in s.items() if k != "config"}, "field 'config' is missing"),
    ("top level is a list", lambda s: [s], "field '(top level)' should be an object, got [{"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "damage", "reason"), SHAPES, ids=[c for c, _, _ in SHAPES])
def test_a_checkpoint_of_the_wrong_shape_is_reported_and_skipped(
    tmp_path: Path, case: str, damage: Callable[[dict], Any], reason: str
) -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    state = {"config": {}, "initial": {"eval/accuracy": 0.5}, "history": [], "wall_s": 1.0}
    for r in range(2):
        save_checkpoint(tmp_path, r, model, opt, sched, state)
    newest = tmp_path / "checkpoints" / "round-0002" / "state.json"
    newest.write_text(json.dumps(damage(json.loads(newest.read_text()))))
    warnings: list[str] = []
    ckpt = latest_checkpoint(tmp_path, warnings.append)
    assert ckpt is not None and ckpt.round == 0  # the older, valid checkpoint
    assert torch.equal(ckpt.policy["weight"], model.weight.detach())
    assert len(warnings) == 1 and warnings[0].startswith(
        f"skipping checkpoint round-0002: {newest} is unreadable ({reason}"
    )
    assert warnings[0].endswith("; its round will be redone")


def test_a_checkpoint_file_that_fails_to_read_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    state = {"config": {}, "initial": {"eval/accuracy": 0.5}, "history": [], "wall_s": 1.0}
    for r in range(2):
        save_checkpoint(tmp_path, r, model, opt, sched, state)
    bad = tmp_path / "checkpoints" / "round-0002" / "policy.pt"
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == bad:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warnings.append).round == 0
    assert warnings == [
        f"skipping checkpoint round-0002: {bad} cannot be read (Input/output error); "
        "its round will be redone"
    ]


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(good(0) + b"\n" + good(1))
    assert list(problems.jsonl_lines(path)) == [(1, good(0)), (2, b"\n"), (3, good(1))]
