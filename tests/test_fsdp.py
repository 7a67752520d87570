"""Scoring an FSDP2-sharded policy (`gradalign.scoring.sharded`): the tiny model
`fully_shard`-ed over 2 gloo ranks scores and selects as one unsharded process, while each
rank holds half of the directions.

The cases live in `fsdp_worker.py`: modes `align` (g^_C), `sim` with `mean_of_unit`, `dot`,
Adam-preconditioned `align`, one candidate group (rank 1 holds none), projection features.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsdp_worker as worker
import numpy as np
import pytest
import torch
from gradalign_runs import SCORED

from gradalign.scoring import sharded
from gradalign.storage import read_jsonl

WORKER = Path(__file__).with_name("fsdp_worker.py")
STATE_WORKER = Path(__file__).with_name("fsdp_state_worker.py")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    return worker.reference()


def run_ranks(out: Path, nproc: int) -> list[dict[str, Any]]:
    """`torchrun --standalone` (a free port) with `nproc` gloo ranks, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    done = subprocess.run(
        [*cmd, str(nproc), str(WORKER), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(nproc)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("fsdp2"), 2)


@pytest.mark.parametrize("case", worker.CASES)
def test_sharded_scores_and_selection_equal_one_process(
    one_process: dict[str, Any], two_ranks: list[dict[str, Any]], case: str
) -> None:
    want = one_process[case]
    scale = want["al"].norm.max()
    assert scale > 0 and np.any(want["al"].dot_val != 0)
    assert [ranked[case]["groups"] for ranked in two_ranks] == (
        [1, 0] if case == "one_group" else [4, 3]
    )
    for rank, ranked in enumerate(two_ranks):
        assert ranked["world"] == (rank, 2) and ranked["is_sharded"]
        got = ranked[case]
        for f in ("dot_val", "dot_chunk", "norm"):
            np.testing.assert_allclose(
                getattr(got["al"], f), getattr(want["al"], f),
                rtol=1e-6, atol=1e-7 * scale, err_msg=f"{case} rank {rank} {f}",
            )  # fmt: skip
        assert got["selected"] == want["selected"], f"{case} rank {rank}"
        assert got["split"] == pytest.approx(want["split"], rel=1e-6)
        assert got["al"].val_norm == pytest.approx(want["al"].val_norm, rel=1e-6)
    chunk = want["al"].dot_chunk
    assert np.isnan(chunk).all() if worker.MODE[case] != "align" else not np.isnan(chunk).any()


def test_each_rank_holds_half_of_the_directions(two_ranks: list[dict[str, Any]]) -> None:
    """The tiny model's D = 535,808 fp32 entries: g^_V is 2,143,232 bytes whole; the two ranks
    hold 1,071,872 + 1,071,360 (the 85-row embedding splits 43 + 42), and so for the weights.
    While a parameter is scored its whole piece is gathered: the largest, a 128 x 512 MLP
    matrix, 262,144 bytes a direction."""
    dims = 535_808 * 4
    held = [ranked["mean_of_unit"]["meter"]["direction_held"] for ranked in two_ranks]
    assert held == [1_071_872, 1_071_360] and sum(held) == dims
    assert [ranked["params_held"] for ranked in two_ranks] == held
    for ranked in two_ranks:
        assert ranked["mean_of_unit"]["meter"]["direction_gathered"] == 128 * 512 * 4
        assert ranked["sum"]["meter"]["direction_held"] == 2 * ranked["params_held"]  # + g^_C


def test_projection_and_exact_refused(
    one_process: dict[str, Any], two_ranks: list[dict[str, Any]]
) -> None:
    want = one_process["projection"]
    assert want.shape == (7, 16) and np.abs(want).max() > 0
    for ranked in two_ranks:
        np.testing.assert_allclose(ranked["projection"], want, rtol=1e-6, atol=1e-7)
        assert ranked["refused"] == sharded.EXACT_REFUSED
    assert "select.scorer=batched" in sharded.EXACT_REFUSED


def test_whole_parameter_refused(two_ranks: list[dict[str, Any]]) -> None:
    """After a no-grad forward the FSDP2 root holds its weights whole: scoring them would read
    the wrong tensors, so it is refused until `sharded.reshard`."""
    for ranked in two_ranks:
        assert "call sharded.reshard(model)" in ranked["refused_whole"]


def test_consolidated_checkpoint_resumes_and_exports(tmp_path: Path) -> None:
    """`fsdp_state_worker.py`: whole weights and Adam state gathered from 2 ranks and loaded
    into a model of another seed give bit-identical weights after one more step; loaded
    unsharded (as `gradalign export` does), the whole weights give the sharded logits. The
    same through the run directory's files (checkpoints/round-0001, final/)."""
    state = STATE_WORKER
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    done = subprocess.run([*cmd, "2", str(state), str(tmp_path)], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    # the tiny model's 20 parameters (the tied embedding once), 535,808 values in all
    assert [ranked["held"] for ranked in ranks] == [267_968, 267_840]
    for ranked in ranks:
        assert len(ranked["names"]) == 20 and "lm_head.weight" not in ranked["names"]
        assert ranked["differed"]  # the second model started elsewhere ...
        for name in ranked["names"]:
            assert torch.equal(ranked["loaded"][name], ranked["before"][name])  # ... was loaded,
            assert torch.equal(ranked["after_copy"][name], ranked["after"][name])  # ... and stepped
        assert any(
            not torch.equal(ranked["after"][n], ranked["before"][n]) for n in ranked["names"]
        )
    assert torch.equal(ranks[0]["export_logits"], ranks[0]["sharded_logits"])
    assert torch.equal(ranks[1]["logits"], ranks[0]["logits"])
    # the loop's own files: save_checkpoint on rank 0, restore on every rank, final/
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "round-0001").iterdir())
    assert files == ["policy.pt", "state.json", "trainer.pt"]
    for ranked in ranks:
        for name in ranked["names"]:
            assert torch.equal(ranked["restored"][name], ranked["after"][name])
            assert torch.equal(ranked["restored_stepped"][name], ranked["stepped"][name])
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert torch.equal(ranks[0]["final_logits"], ranks[0]["sharded_logits"])


def test_round_scoring_routes_a_sharded_model_to_the_sharded_scorer(
    one_process: dict[str, Any], two_ranks: list[dict[str, Any]]
) -> None:
    """`round_scoring._sharded_scores` (mode sim, mean_of_unit, project_dim 16): the scores,
    split-half cosine and projection features of one unsharded process."""
    want = one_process["mean_of_unit"]
    scale = want["al"].norm.max()
    for ranked in two_ranks:
        al, split, features = ranked["round_scoring"]
        for f in ("dot_val", "norm"):
            np.testing.assert_allclose(
                getattr(al, f), getattr(want["al"], f), rtol=1e-6, atol=1e-7 * scale
            )
        assert np.isnan(al.dot_chunk).all()
        assert split == pytest.approx(want["split"], rel=1e-6)
        np.testing.assert_allclose(features, one_process["projection"], rtol=1e-6, atol=1e-7)


def test_every_rank_samples_every_batch_as_one_process(
    one_process: dict[str, Any], two_ranks: list[dict[str, Any]]
) -> None:
    """Generation on the sharded model (2 prompt batches, each rank all of them, in step)
    samples the completions of the unsharded model."""
    want = one_process["rollouts"]
    assert len(want) == 15 and len({tuple(c) for c in want}) > 1
    for ranked in two_ranks:
        assert ranked["rollouts"] == want


@pytest.mark.parametrize("aggregate", ["sum", "mean_of_unit"])
def test_sharded_validation_sums_are_the_sums(
    one_process: dict[str, Any], two_ranks: list[dict[str, Any]], aggregate: str
) -> None:
    """g_V of each half, gathered whole from its shards, is the one-process sum itself (not
    FSDP2's mean over ranks: the scorer rescales it)."""
    want = one_process[f"halves_{aggregate}"]
    assert all(float(w.norm()) > 0 for h in want for w in h)
    for ranked in two_ranks:
        for h in range(2):
            for w, g in zip(want[h], ranked[f"halves_{aggregate}"][h], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def score_process(out: Path, cache: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = ["-m", "gradalign.cli"]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", *launcher]  # fmt: skip
    settings = [*SCORED, "rollout.prompts_per_batch=4", f"model.cache_dir={cache}", *extra]
    cmd = [sys.executable, *launcher, "score", *[f"--set={s}" for s in settings]]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_gradalign_score_sharded_over_two_ranks_scores_as_one_process(tmp_path: Path) -> None:
    """`gradalign score` with train.fsdp under torchrun (2 gloo ranks: the policy sharded,
    every rank sampling every batch, round scoring's sharded branch) writes the scores of one
    unsharded process: 3 chunks of 16 problems, mode sim."""
    one = score_process(tmp_path / "one", tmp_path / "cache", 1)
    assert one.returncode == 0, one.stdout + one.stderr
    two = score_process(tmp_path / "two", tmp_path / "cache", 2, "train.fsdp=true")
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (read_jsonl(tmp_path / d / "scores.jsonl") for d in ("one", "two"))
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 48
    assert [r["pass_rate"] for r in a] == [r["pass_rate"] for r in b]  # the same rollouts
    for key in ("score", "dot_val", "norm"):
        x, y = (np.array([r[key] for r in rows], dtype=float) for rows in (a, b))
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7 * np.abs(x).max())
