"""FSDP2 checkpoints, consolidated (`gradalign.run.sharded_state`), under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_state_worker.py OUT

An FSDP2-sharded tiny model takes one AdamW step; its whole weights and Adam state are
gathered to rank 0, broadcast, and loaded into a second sharded model built from another
seed; both take one more identical step. Rank 0 also loads the whole weights into an
unsharded model (what `gradalign export` does with policy.pt). OUT/rank<r>.pkl holds the
weights and logits each side ends with (`tests/test_fsdp.py`).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from scoring_batches import make_batch

from gradalign.core.grpo import group_losses, token_logprobs
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.run import sharded_state
from gradalign.scoring import distributed as dd
from gradalign.scoring import sharded

BATCH = make_batch([[1, 0, 1], [0, 1, 1, 0]], seed=4)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    logp = token_logprobs(model, BATCH.input_ids, BATCH.attention_mask)
    loss = group_losses(logp, BATCH.completion_mask, BATCH.advantages, BATCH.group, 2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH.input_ids, attention_mask=BATCH.attention_mask).logits


def whole(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def sharded_pair(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = sharded.shard_model(build_model(build_tokenizer(), "tiny", seed=seed))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def main() -> dict:
    model, opt = sharded_pair(3)
    step(model, opt)
    full = sharded_state.full_state(model, opt)
    assert full is not None
    weights, optim = dd.broadcast_object(full)  # rank 0's, as a resumed run reads it
    copy, copy_opt = sharded_pair(4)
    differed = any(
        not torch.equal(a, b) for a, b in zip(whole(model).values(), whole(copy).values())
    )
    sharded_state.load_full_state(copy, weights, copy_opt, optim)
    loaded = whole(copy)
    step(model, opt)
    step(copy, copy_opt)
    out = {
        "names": sorted(weights),
        "differed": differed,
        "loaded": loaded,
        "before": {n: t for n, t in weights.items()},
        "after": whole(model),
        "after_copy": whole(copy),
        "logits": logits(model),
    }
    sharded.reshard(model)  # the root's weights, whole after the no-grad forward, sharded again
    out["held"] = sum(p.to_local().numel() for p in model.parameters())
    if dd.is_main():  # export: whole weights into an unsharded model
        plain = build_model(build_tokenizer(), "tiny", seed=5)
        plain.load_state_dict(sharded_state.full_weights(model) or weights, strict=False)
        out["export_logits"] = logits(plain)
    else:
        sharded_state.full_weights(model)  # every rank takes part in the gather
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = main()
    Path(sys.argv[1], f"rank{dist.get_rank()}.pkl").write_bytes(pickle.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
