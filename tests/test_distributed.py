"""Distributed scoring (`gradalign.scoring.distributed`): 2 gloo processes on CPU give the scores and
the selection of 1 process.

The cases live in `distributed_worker.py`: 7 candidate groups (shards of 4 + 3, one
zero-variance group) and 5 validation groups (3 + 2, one zero-variance group) on the tiny
model at random init; val_aggregate `sum` and `mean_of_unit`, g^_C (mode `align`) from the
kept g_p and from a plain backward first, Adam-preconditioned scores, one candidate group
(rank 1 holds none), projection features and a broadcast random draw.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import distributed_worker as worker
import numpy as np
import pytest
import torch

from gradalign import ranks
from gradalign.core.diagnostics import split_halves
from gradalign.core.selection import Candidates, select
from gradalign.engine.policy import scored_parameters
from gradalign.scoring import distributed as dd
from gradalign.scoring import fastscore
from gradalign.scoring.pieces import flatten_pieces, unit_pieces

WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    assert ranks.world() == (0, 1)
    return worker.run_cases()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`torchrun --standalone` (a free port) with 2 gloo ranks, one thread each."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_shard_is_balanced_contiguous_and_complete() -> None:
    assert [ranks.shard(7, r, 2) for r in range(2)] == [range(0, 4), range(4, 7)]
    assert [len(ranks.shard(10, r, 4)) for r in range(4)] == [3, 3, 2, 2]
    assert [len(ranks.shard(2, r, 3)) for r in range(3)] == [1, 1, 0]
    for n in range(12):
        for size in range(1, 6):
            parts = [ranks.shard(n, r, size) for r in range(size)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2 outside"):
        ranks.shard(5, 2, 2)


def test_shard_batch_keeps_the_groups_rows() -> None:
    batch = worker.make_batch(worker.CAND_REWARDS, seed=1)
    part = dd.shard_batch(batch, range(4, 7))
    assert part is not None and part.num_groups == 3
    rows = (batch.group >= 4).nonzero().squeeze(1)
    assert torch.equal(part.group, batch.group[rows] - 4)
    assert torch.equal(part.advantages, batch.advantages[rows])
    assert dd.shard_batch(batch, range(3, 3)) is None


def test_one_process_is_the_fastscore_path(one_process: dict[str, Any]) -> None:
    """Without a process group: g^_V = unit(sum of the validation halves'
    batched_validation_sum), then batched_alignment, bit for bit."""
    model = worker.build_model(worker.build_tokenizer(), "tiny", seed=3).eval()
    params = scored_parameters(model)
    cand = worker.make_batch(worker.CAND_REWARDS, seed=1)
    val = worker.make_batch(worker.VAL_REWARDS, seed=2)
    a, b = (
        fastscore.batched_validation_sum(model, params, val.take_groups(h), "mean_of_unit", 2)
        for h in split_halves(val.num_groups)
    )
    direction = unit_pieces([x + y for x, y in zip(a, b)])
    want = fastscore.batched_alignment(model, params, cand, direction, 2)
    got = one_process["mean_of_unit"]["al"]
    for f in ("dot_val", "dot_chunk", "norm"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert one_process["mean_of_unit"]["groups"] == 7


@pytest.mark.parametrize("case", worker.CASES)
def test_two_processes_score_and_select_as_one(
    one_process: dict[str, Any], two_processes: list[dict[str, Any]], case: str
) -> None:
    want = one_process[case]
    scale = want["al"].norm.max()
    assert scale > 0 and np.any(want["al"].dot_val != 0)
    groups = [len(worker.CAND_REWARDS[:1] if case == "one_group" else worker.CAND_REWARDS)]
    assert want["groups"] == groups[0]
    expect_split = [1, 0] if case == "one_group" else [4, 3]
    assert [ranked[case]["groups"] for ranked in two_processes] == expect_split
    for rank, ranked in enumerate(two_processes):
        got = ranked[case]
        assert ranked["world"] == (rank, 2)
        for f in ("dot_val", "dot_chunk", "norm"):
            np.testing.assert_allclose(
                getattr(got["al"], f), getattr(want["al"], f),
                rtol=1e-6, atol=1e-7 * scale, err_msg=f"{case} rank {rank} {f}",
            )  # fmt: skip
        assert got["selected"] == want["selected"], f"{case} rank {rank}"
        assert got["al"].val_norm == pytest.approx(want["al"].val_norm, rel=1e-6)
        assert want["al"].val_norm == pytest.approx(1.0, rel=1e-4)  # ||unit(g_V)||, not 0
    chunk = want["al"].dot_chunk
    assert np.isnan(chunk).all() if case == "sum_no_chunk" else not np.isnan(chunk).any()


@pytest.mark.parametrize("aggregate", ["sum", "mean_of_unit"])
def test_validation_halves_add_up_on_every_rank(
    one_process: dict[str, Any], two_processes: list[dict[str, Any]], aggregate: str
) -> None:
    """Each half summed over both ranks' shards is the one-process half, and the two halves add
    up to the one-process g_V (`batched_validation_sum` of the whole set)."""
    model = worker.build_model(worker.build_tokenizer(), "tiny", seed=3).eval()
    params = scored_parameters(model)
    val = worker.make_batch(worker.VAL_REWARDS, seed=2)
    whole = fastscore.batched_validation_sum(model, params, val, aggregate, 2)  # type: ignore[arg-type]
    want = one_process[f"halves_{aggregate}"]
    for w, a, b in zip(whole, *want):
        torch.testing.assert_close(a + b, w, rtol=1e-5, atol=1e-7)
    first = fastscore.batched_validation_sum(model, params, val.take_groups(range(2)), aggregate, 2)  # type: ignore[arg-type]
    for w, a in zip(first, want[0]):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    for ranked in two_processes:
        for h in range(2):
            for w, g in zip(want[h], ranked[f"halves_{aggregate}"][h]):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_two_processes_projection_and_broadcast(
    one_process: dict[str, Any], two_processes: list[dict[str, Any]]
) -> None:
    want = one_process["projection"]
    assert want.shape == (7, 16) and np.abs(want).max() > 0
    own_draw = select("rand", Candidates(np.arange(50)), 5, np.random.default_rng(1))
    assert own_draw.ids.tolist() != one_process["rand"]  # rank 1's own draw differs ...
    for got in two_processes:
        np.testing.assert_allclose(got["projection"], want, rtol=1e-6, atol=1e-7)
        assert got["rand"] == one_process["rand"]  # ... yet it gets rank 0's


@pytest.mark.parametrize("case", ["output_exact", "output_8x4"])
def test_two_processes_output_features_as_one(
    one_process: dict[str, Any], two_processes: list[dict[str, Any]], case: str
) -> None:
    """select.features=output under torchrun: each rank scores its shard (4 + 3 groups), the
    validation halves and the chunk direction are summed over ranks, every rank gets all."""
    want = one_process[case]
    scale = want["al"].norm.max()
    assert scale > 0 and want["groups"] == 7 and np.all(np.isfinite(want["al"].dot_chunk))
    assert want["al"].norm[3] == 0  # the zero-variance group
    assert [ranked[case]["groups"] for ranked in two_processes] == [4, 3]
    for ranked in two_processes:
        got = ranked[case]
        for f in ("dot_val", "dot_chunk", "norm"):
            np.testing.assert_allclose(
                getattr(got["al"], f), getattr(want["al"], f), rtol=1e-5, atol=1e-6 * scale
            )
        for h in range(2):
            for w, g in zip(want["halves"][h], got["halves"][h]):  # sums in another order
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("keep", [True, False])
def test_reduce_chunk_is_called_once_on_the_batch_sum(
    keep: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook `distributed` sums g_C over ranks with: one call, on this batch's sum_p g_p,
    whether the g_p are kept (after the scan) or summed by a plain backward (before it)."""
    if not keep:
        monkeypatch.setattr(fastscore, "MAX_KEEP_BYTES", 0)
    model = worker.build_model(worker.build_tokenizer(), "tiny", seed=3).eval()
    params = scored_parameters(model, "last:1")
    cand = worker.make_batch(worker.CAND_REWARDS, seed=1)
    summed = flatten_pieces(fastscore.batched_summed_gradient(model, params, cand, 2))
    seen: list[torch.Tensor] = []

    def reduce(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(flatten_pieces(pieces))
        return [-p for p in pieces]  # the "other ranks" flip g_C

    plain = fastscore.batched_alignment(model, params, cand, summed, 2)
    flipped = fastscore.batched_alignment(model, params, cand, summed, 2, reduce_chunk=reduce)
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0].numpy(), summed.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flipped.dot_chunk, -plain.dot_chunk, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(flipped.dot_val, plain.dot_val)
