"""FSDP2 scoring cases: the tiny model `fully_shard`-ed over the ranks, scored by
`gradalign.scoring.sharded`, or unsharded in one process (the reference).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT

writes OUT/rank<r>.pkl (`tests/test_fsdp.py` compares it with `reference()` in one process).
The cases are `distributed_worker`'s: 7 candidate groups (4 + 3 a rank, one zero-variance),
5 validation groups (3 + 2), `sum` and `mean_of_unit`, mode `align`'s g^_C, Adam
preconditioning, one candidate group (rank 1 holds none) and projection features.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from distributed_worker import CAND_REWARDS, VAL_REWARDS, candidates
from scoring_batches import make_batch

from gradalign import ranks
from gradalign.config import SelectConfig
from gradalign.core.selection import select
from gradalign.data.problems import Problem
from gradalign.engine import round_scoring
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.engine.rollout import SamplingConfig, generate
from gradalign.scoring import fastscore, sharded

CASES = ["sum", "mean_of_unit", "sum_no_chunk", "adam", "one_group"]
MODE = {
    "sum": "align", "mean_of_unit": "sim", "sum_no_chunk": "dot", "adam": "align", "one_group": "align"
}  # fmt: skip


def _setup(name: str, params: list) -> tuple[Any, Any, dict | None, list]:
    rewards = CAND_REWARDS[:1] if name == "one_group" else CAND_REWARDS
    exp_avg_sq = None
    if name == "adam":  # a seeded stand-in for Adam's second moment, sharded like the weights
        gen = torch.Generator().manual_seed(7)
        exp_avg_sq = {}
        for p in params:
            v = torch.rand(tuple(p.shape), generator=gen) * 1e-4 + 1e-6
            if isinstance(p, torch.distributed.tensor.DTensor):
                v = torch.distributed.tensor.distribute_tensor(v, p.device_mesh, p.placements)
            exp_avg_sq[p] = v
    return make_batch(rewards, seed=1), make_batch(VAL_REWARDS, seed=2), exp_avg_sq, rewards


def _selected(name: str, rewards: list, al: Any) -> list[int]:
    n = 1 if name == "one_group" else 3
    chosen = select(MODE[name], candidates(rewards, al), n, np.random.default_rng(0))
    return ranks.broadcast_object(chosen if ranks.is_main() else None).ids.tolist()


def reference() -> dict[str, Any]:
    """One process, no FSDP: `round_scoring.direction_with_split_half` and group_alignment."""
    model = build_model(build_tokenizer(), "tiny", seed=3).eval()
    params = scored_parameters(model)
    out: dict[str, Any] = {}
    for name in CASES:
        cand, val, exp_avg_sq, rewards = _setup(name, params)
        agg = "mean_of_unit" if name == "mean_of_unit" else "sum"
        s = SelectConfig(mode=MODE[name], val_aggregate=agg, groups_per_micro=2)  # type: ignore[arg-type]
        direction, split = round_scoring.direction_with_split_half(model, params, val, s)
        done: list[int] = []
        al = round_scoring.group_alignment(
            model, params, cand, direction, s, exp_avg_sq, done.append
        )
        out[name] = {"al": al, "split": split, "selected": _selected(name, rewards, al)}
    out["projection"] = fastscore.projected_gradients(
        model, params, make_batch(CAND_REWARDS, seed=1), 16, 5, 2
    )
    out["rollouts"] = rollouts(model)
    val = make_batch(VAL_REWARDS, seed=2)
    for agg in ("sum", "mean_of_unit"):
        out[f"halves_{agg}"] = [
            fastscore.batched_validation_sum(model, params, val.take_groups(h), agg, 2)  # type: ignore[arg-type]
            for h in (range(2), range(2, 5))
        ]
    return out


ROUND = SelectConfig(mode="sim", val_aggregate="mean_of_unit", groups_per_micro=2, project_dim=16)


def rollouts(model: torch.nn.Module) -> list[list[int]]:
    """Sampled completions of 5 problems x 3 (2 prompt batches of 3 + 2)."""
    tok = build_tokenizer()
    problems = [Problem(j, f"{j}+{j + 1}=", str(2 * j + 1), "addition") for j in range(5)]
    sampling = SamplingConfig(max_new_tokens=6, prompts_per_batch=3)
    ro = generate(model, tok, problems, 3, sampling, seed=11)
    return [list(c) for c in ro.completion_ids]


def sharded_cases() -> dict[str, Any]:
    model = sharded.shard_model(build_model(build_tokenizer(), "tiny", seed=3)).eval()
    batch = make_batch(CAND_REWARDS, seed=1)
    with torch.no_grad():  # as generation leaves it: the root's weights whole
        model(input_ids=batch.input_ids[:2])
    try:
        sharded.group_alignment(model, scored_parameters(model), batch, [], 2, False)
    except ValueError as err:
        refused_whole = str(err)
    sharded.reshard(model)
    params = scored_parameters(model)
    out: dict[str, Any] = {"world": ranks.world(), "is_sharded": sharded.is_sharded(model)}
    out["refused_whole"] = refused_whole
    for name in CASES:
        cand, val, exp_avg_sq, rewards = _setup(name, params)
        agg = "mean_of_unit" if name == "mean_of_unit" else "sum"
        done: list[int] = []
        meter: dict = {}
        al, split = sharded.round_alignment(
            model, params, cand, val, agg, groups_per_micro=2,
            chunk=MODE[name] == "align", exp_avg_sq=exp_avg_sq,
            progress=done.append, meter=meter,
        )  # fmt: skip
        out[name] = {"al": al, "split": split, "groups": sum(done), "meter": meter}
        out[name]["selected"] = _selected(name, rewards, al)
    out["projection"] = sharded.projected_gradients(
        model, params, make_batch(CAND_REWARDS, seed=1), 16, 5, 2
    )
    out["params_held"] = sum(p.to_local().nbytes for p in params)
    # `round_scoring`'s own branch for a sharded model, projection features included
    cand, val = make_batch(CAND_REWARDS, seed=1), make_batch(VAL_REWARDS, seed=2)
    out["round_scoring"] = round_scoring._sharded_scores(
        model, params, cand, val, ROUND, 5, None, round_scoring.no_bar
    )
    out["rollouts"] = rollouts(model)  # every rank samples every batch, in step
    sharded.reshard(model)
    for agg in ("sum", "mean_of_unit"):  # g_V of halves across the shards (3 + 2): 0-1 | 2-4
        halves = sharded.validation_halves(model, params, val, [range(2), range(2, 5)], agg, 2)
        out[f"halves_{agg}"] = [[d.full_tensor() for d in h] for h in halves]
    sharded.reshard(model)
    try:
        sharded.refuse_exact(model, "exact")
    except ValueError as err:
        out["refused"] = str(err)
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")  # also with one process: fully_shard needs a group
    torch.set_num_threads(1)
    result = sharded_cases()
    Path(sys.argv[1], f"rank{dist.get_rank()}.pkl").write_bytes(pickle.dumps(result))
    dist.barrier()  # no rank tears down while another still talks
    dist.destroy_process_group()
    os._exit(0)  # as distributed_worker: skip interpreter finalisation
