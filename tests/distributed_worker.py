"""Distributed scoring cases, run in one process (the reference) or under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT

writes OUT/rank<r>.pkl with every case's gathered scores and the selection each rank got
(`tests/test_distributed.py` runs it and compares with `run_cases()` in one process).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scoring_batches import make_batch

from gradalign import ranks
from gradalign.config import SelectConfig
from gradalign.core.selection import Candidates, select
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.engine.round_scoring import direction_with_split_half
from gradalign.scoring import distributed as dd
from gradalign.scoring import fastscore, output_features
from gradalign.scoring.pieces import unit_pieces

# 7 candidate groups (uneven shards: 4 + 3) of sizes 3..8; group 3 has zero variance
CAND_REWARDS = [
    [1, 0, 0],
    [1, 1, 0, 1, 0],
    [0, 0, 1, 1],
    [1] * 6,
    [0, 1, 0, 0, 0, 0, 1, 1],
    [0.5, 0, 1],
    [1, 0, 1, 1],
]
# 5 validation groups (3 + 2); group 1 has zero variance (its unit(g_v) is 0 too)
VAL_REWARDS = [[1, 0, 1, 0], [0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 1]]
CASES = ["sum", "mean_of_unit", "sum_no_chunk", "two_pass", "adam", "one_group"]


def candidates(rewards: list[list[float]], al: Any) -> Candidates:
    pass_rate = np.array([np.mean(r) for r in rewards])
    zero_variance = np.array([len(set(r)) == 1 for r in rewards])
    return Candidates(
        np.arange(100, 100 + len(rewards)), pass_rate, zero_variance,
        al.dot_val, al.dot_chunk, al.norm,
    )  # fmt: skip


def run_case(name: str, model: torch.nn.Module) -> dict[str, Any]:
    """Gathered scores, this rank's group count and the (broadcast) selection of one case."""
    params = scored_parameters(model)
    rewards = CAND_REWARDS[:1] if name == "one_group" else CAND_REWARDS
    cand, val = make_batch(rewards, seed=1), make_batch(VAL_REWARDS, seed=2)
    aggregate = "mean_of_unit" if name == "mean_of_unit" else "sum"
    exp_avg_sq = None
    if name == "adam":  # a seeded stand-in for Adam's second moment, the same on every rank
        gen = torch.Generator().manual_seed(7)
        exp_avg_sq = {p: torch.rand(p.shape, generator=gen) * 1e-4 + 1e-6 for p in params}
    keep = fastscore.MAX_KEEP_BYTES
    fastscore.MAX_KEEP_BYTES = 0 if name == "two_pass" else keep  # g_C reduced before the scan
    done: list[int] = []
    try:
        # the loop's path: g^_V from the validation set's two halves, then the candidates
        s = SelectConfig(val_aggregate=aggregate, groups_per_micro=2)
        direction, _ = direction_with_split_half(model, params, val, s)
        al = dd.distributed_group_alignment(
            model, params, cand, list(direction), 2, name != "sum_no_chunk", exp_avg_sq,
            done.append,
        )  # fmt: skip
    finally:
        fastscore.MAX_KEEP_BYTES = keep
    mode = {"sum": "sim", "mean_of_unit": "sim", "sum_no_chunk": "dot"}.get(name, "align")
    n = 1 if name == "one_group" else 3
    rng = np.random.default_rng(0)
    sel = ranks.broadcast_object(
        select(mode, candidates(rewards, al), n, rng) if ranks.is_main() else None
    )
    return {"al": al, "groups": sum(done), "selected": sel.ids.tolist()}


def run_cases() -> dict[str, Any]:
    model = build_model(build_tokenizer(), "tiny", seed=3).eval()
    out: dict[str, Any] = {name: run_case(name, model) for name in CASES}
    cand = make_batch(CAND_REWARDS, seed=1)
    out["projection"] = dd.distributed_projected_gradients(
        model, scored_parameters(model), cand, project_dim=16, seed=5, groups_per_micro=2
    )
    # every rank draws with its own seed here, and still gets rank 0's draw
    drawn = select("rand", Candidates(np.arange(50)), 5, np.random.default_rng(ranks.world()[0]))
    out["rand"] = ranks.broadcast_object(drawn).ids.tolist()
    val, params = make_batch(VAL_REWARDS, seed=2), scored_parameters(model)
    for aggregate in ("sum", "mean_of_unit"):  # halves across the shards (3 + 2): 0-1 | 2-4
        halves = dd.distributed_validation_halves(
            model, params, val, [range(2), range(2, 5)], aggregate, groups_per_micro=2
        )
        out[f"halves_{aggregate}"] = [[t.clone() for t in h] for h in halves]
    for name, dims in (("output_exact", None), ("output_8x4", (8, 4))):  # select.features=output
        feature = output_features.HeadFeature(dims, seed=5, chunk=7)
        halves = output_features.distributed_feature_halves(
            model, val, [range(2), range(2, 5)], feature, "sum", groups_per_micro=2
        )
        direction = unit_pieces([a + b for a, b in zip(*halves)])
        done: list[int] = []
        al = output_features.distributed_feature_alignment(
            model, cand, direction, feature, 2, chunk=True, progress=done.append
        )
        kept = [[t.clone() for t in h] for h in halves]
        out[name] = {"al": al, "groups": sum(done), "halves": kept}
    out["world"] = ranks.world()
    return out


if __name__ == "__main__":
    rank, size = ranks.init_from_env("cpu")
    torch.set_num_threads(1)
    result = run_cases()
    Path(sys.argv[1], f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while another still talks
        torch.distributed.destroy_process_group()
    # Skip interpreter finalisation: about 1 run in 12 here, a rank aborted there ("terminate
    # called without an active exception", a C++ thread still joinable at exit) after
    # everything, destroy_process_group included, had finished.
    os._exit(0)
