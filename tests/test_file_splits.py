"""One file feeding two sets: per-file offset / limit slices and seeded fraction splits;
`data.validation_files` and its deprecated name `val_files`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from gradalign.config import ConfigError, config_from_dict
from gradalign.data.files import FileSpec, load_file, split_hash
from gradalign.run.sources import file_specs, sets_from_files

# positions (from 0) of 40 records whose split_hash(7, position) < 0.25: `take: first`
FIRST_7 = [1, 10, 11, 14, 15, 19, 35, 37, 38]


def _write(path: Path, n: int, start: int = 0) -> str:
    rows = [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_hash_is_a_fixed_uniform_function_of_seed_and_position():
    assert split_hash(0, 0) == 0.8833108082136427
    assert split_hash(7, 3) == 0.9890473058078779
    assert [i for i in range(40) if split_hash(7, i) < 0.25] == FIRST_7
    shares = [split_hash(3, i) < 0.3 for i in range(10_000)]
    assert abs(sum(shares) / 10_000 - 0.3) < 0.02


def test_offset_and_limit_read_a_slice_of_the_records(tmp_path):
    path = _write(tmp_path / "all.jsonl", 40)
    result = load_file(FileSpec(path, reward="exact", offset=10, limit=5))
    assert [p.meta["line"] for p in result.problems] == [11, 12, 13, 14, 15]
    assert result.files[0].records == 5  # records outside the slice are not read
    tail = load_file(FileSpec(path, reward="exact", offset=38))
    assert [p.prompt for p in tail.problems] == ["38+38", "39+39"]


def test_validation_and_eval_from_one_file_without_overlap(tmp_path):
    both = _write(tmp_path / "heldout.jsonl", 40)
    pool = _write(tmp_path / "pool.jsonl", 16, start=100)
    data = {
        "pool_files": [{"path": pool, "reward": "exact"}],
        "validation_files": [{"path": both, "reward": "exact", "fraction": 0.25, "seed": 7}],
        "eval_files": [{"path": both, "reward": "exact", "fraction": 0.25, "seed": 7,
                        "take": "rest"}],
    }  # fmt: skip
    cfg = config_from_dict({"data": data, "select": {"chunk_size": 8, "k": 1}})
    logs: list[str] = []
    sets = sets_from_files(cfg, logs.append)
    assert [p.meta["line"] - 1 for p in sets.validation] == FIRST_7
    assert [p.meta["line"] - 1 for p in sets.eval] == sorted(set(range(40)) - set(FIRST_7))
    assert not any("share" in line or line.startswith("pool: dropped") for line in logs)
    assert len(logs) == 3  # one load summary per set
    again = sets_from_files(cfg, lambda _: None)  # deterministic with the seed
    assert [p.prompt for p in again.validation] == [p.prompt for p in sets.validation]
    other = {**data, "validation_files": [{**data["validation_files"][0], "seed": 8}]}
    cfg8 = config_from_dict({"data": other, "select": {"chunk_size": 8, "k": 1}})
    with pytest.raises(ConfigError, match=r"^data.validation_files and data.eval_files: the "
                       r"validation and eval sets share \d+ prompt\(s\)"):  # fmt: skip
        sets_from_files(cfg8, lambda _: None)  # another seed: the sets overlap


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"fraction": 1.5}, "data.validation_files[0]: {path}: fraction (1.5) must be in [0, 1]"),
        ({"take": "rest"}, "data.validation_files[0]: {path}: take: rest needs a fraction"),
        ({"fraction": 0.5, "take": "last"},
         "data.validation_files[0]: {path}: take 'last' is not first or rest"),
        ({"offset": -1}, "data.validation_files[0]: {path}: offset (-1) and limit (None) must be >= 0"),
        ({"offset": "a"}, "data.validation_files[0].offset: expected an integer, got 'a'"),
        ({"limit": 2.5}, "data.validation_files[0].limit: expected an integer, got 2.5"),
        ({"fraction": "half"}, "data.validation_files[0].fraction: expected a number in [0, 1], got 'half'"),
        ({"seed": None}, "data.validation_files[0].seed: expected an integer, got None"),
    ],
)  # fmt: skip
def test_bad_split_values_name_the_entry(tmp_path, entry, message):
    path = _write(tmp_path / "v.jsonl", 4)
    with pytest.raises(ConfigError) as err:
        file_specs([{"path": path, **entry}], "data.validation_files")
    assert str(err.value) == message.format(path=path)


def test_val_files_is_a_deprecated_alias(tmp_path):
    path = _write(tmp_path / "v.jsonl", 4)
    files = [{"path": path}]
    with pytest.warns(
        FutureWarning, match=r"^data.val_files is deprecated: .*data.validation_files"
    ):
        cfg = config_from_dict(
            {"data": {"pool_files": files, "val_files": files, "eval_files": files}}
        )
    assert (cfg.data.validation_files, cfg.data.val_files) == (files, [])
    with pytest.raises(ConfigError) as err, warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict({"data": {"val_files": files, "validation_files": files}})
    assert str(err.value) == (
        "data.val_files and data.validation_files: both given; keep validation_files "
        "(val_files is its deprecated name)"
    )
