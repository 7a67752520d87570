"""FSDP2 checkpoints, consolidated (`gradalign.run.sharded_state`), under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_state_worker.py OUT

An FSDP2-sharded tiny model takes one AdamW step; its whole weights and Adam state are
gathered to rank 0, broadcast, and loaded into a second sharded model built from another
seed; both take one more identical step. Rank 0 also loads the whole weights into an
unsharded model (what `gradalign export` does with policy.pt). Then the loop's own path:
a checkpoint written and restored into a third model, and final/ written and reloaded.
OUT/rank<r>.pkl holds the weights and logits each side ends with (`tests/test_fsdp.py`).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from scoring_batches import make_batch

from gradalign import ranks
from gradalign.config import Config
from gradalign.core.grpo import group_losses, token_logprobs
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.run import sharded_state
from gradalign.run.checkpoint import checkpoint_dir, read_checkpoint, restore, save_checkpoint
from gradalign.run.export import save_policy
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
    weights, optim = ranks.broadcast_object(full)  # rank 0's, as a resumed run reads it
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
    out |= through_the_run_directory(model, opt, Path(sys.argv[1]))
    if ranks.is_main():  # export: whole weights into an unsharded model
        plain = build_model(build_tokenizer(), "tiny", seed=5)
        plain.load_state_dict(sharded_state.full_weights(model) or weights, strict=False)
        out["export_logits"] = logits(plain)
    else:
        sharded_state.full_weights(model)  # every rank takes part in the gather
    return out


def through_the_run_directory(model: torch.nn.Module, opt: torch.optim.Optimizer, out: Path):
    """The loop's own path: `save_checkpoint` (rank 0) of the gathered state, `restore` into
    a third sharded model on every rank, `save_policy` (final/) of the gathered weights."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    initial = {"eval/accuracy": 0.0}
    state = {"config": Config().to_dict(), "initial": initial, "history": [], "wall_s": 0.0}
    whole_state = sharded_state.full_state(model, opt)  # every rank gathers
    if ranks.is_main():
        save_checkpoint(out / "run", 0, model, opt, sched, state, whole_state)
    dist.barrier()
    ckpt = read_checkpoint(checkpoint_dir(out / "run", 0))
    third, third_opt = sharded_pair(6)
    restore(ckpt, third, third_opt, torch.optim.lr_scheduler.LambdaLR(third_opt, lambda _: 1.0))
    restored = whole(third)
    step(model, opt)
    step(third, third_opt)
    final = sharded_state.full_weights(model)  # every rank gathers
    res = {"restored": restored, "restored_stepped": whole(third), "stepped": whole(model)}
    res["sharded_logits"] = logits(model)
    if ranks.is_main():
        save_policy(model, build_tokenizer(), out / "final", Config(), merge=False, whole=final)
        from transformers import AutoModelForCausalLM

        res["final_logits"] = logits(AutoModelForCausalLM.from_pretrained(out / "final"))
    sharded.reshard(model)
    return res


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = main()
    Path(sys.argv[1], f"rank{dist.get_rank()}.pkl").write_bytes(pickle.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
