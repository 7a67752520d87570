"""Benchmark: per-rank memory of FSDP2 scoring state at R = 1 and R = 2 (and more).

For each R it runs itself under ``torchrun --nproc_per_node R`` (gloo on CPU, NCCL with
``--device cuda``), `fully_shard`s a built-in model (`sharded.shard_model`), scores one
round of random rollouts with `sharded.round_alignment` (mode `align`: g^_V and g^_C) and
prints, per rank, the bytes it holds:

- weights:   its shards of the scored parameters;
- ĝ_V + ĝ_C: its shards of the two directions (`sharded.Gathered.held_bytes`);
- gathered:  the largest K = 2 pieces of one parameter all_gathered at once while scoring;
- on CUDA, torch.cuda.max_memory_allocated over the round (weights, directions, FSDP's
  gathered weights, one micro-batch's activations); on CPU, the process's peak RSS (it
  includes torch itself, ~0.5 GB, so the 1/R part is small against it).

    .venv/bin/python benchmarks/fsdp_memory.py --model small --ranks 1,2

The scores of every R are compared with the first R's (they must agree to 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gradalign.core.grpo import SequenceBatch, group_advantages, pack_sequences
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.scoring import sharded


def random_batch(groups: int, rollouts: int, seed: int, vocab: int) -> SequenceBatch:
    """Random prompts (8 tokens) and completions (6-16 tokens), Bernoulli(0.5) rewards."""
    rng = np.random.default_rng(seed)
    prompts, completions, rewards, group = [], [], [], []
    for p in range(groups):
        prompt = rng.integers(4, vocab, 8).tolist()
        for _ in range(rollouts):
            prompts.append(prompt)
            completions.append(rng.integers(4, vocab, int(rng.integers(6, 17))).tolist())
            rewards.append(float(rng.integers(0, 2)))
            group.append(p)
    ids, attn, comp = pack_sequences(prompts, completions, pad_id=0)
    g = torch.tensor(group)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), g, groups)
    return SequenceBatch(ids, attn, comp, adv, g, groups)


def worker(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    tok = build_tokenizer()
    model = build_model(tok, args.model, seed=0).to(args.device)
    model = sharded.shard_model(model).eval()
    params = scored_parameters(model)
    cand = random_batch(args.problems, args.rollouts, 1, len(tok)).to(args.device)
    val = random_batch(args.val_problems, args.rollouts, 2, len(tok)).to(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meter: dict = {}
    al, _ = sharded.round_alignment(
        model, params, cand, val, "sum", args.groups_per_micro, chunk=True, meter=meter
    )
    out = {
        "rank": rank,
        "world": dist.get_world_size(),
        "weights": sum(p.to_local().nbytes for p in params),
        "directions": meter["direction_held"],
        "gathered": meter["direction_gathered"],
        "peak": torch.cuda.max_memory_allocated() if cuda else None,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "scores": [al.dot_val.tolist(), al.dot_chunk.tolist(), al.norm.tolist()],
    }
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:8.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="small", help="built-in size: tiny | small")
    ap.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (NCCL, one GPU a rank)")
    ap.add_argument("--problems", type=int, default=8, help="candidate groups")
    ap.add_argument("--val-problems", type=int, default=4, help="validation groups")
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts per group")
    ap.add_argument("--groups-per-micro", type=int, default=4)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    reference = None
    print(f"builtin:{args.model}, {args.problems} + {args.val_problems} groups x {args.rollouts}")
    print("R rank   weights      ĝ_V + ĝ_C    gathered     peak (cuda)  peak RSS")
    for size in [int(r) for r in args.ranks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += ["--nproc_per_node", str(size), __file__, "--worker", tmp]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker"]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"R={size} failed:\n{done.stderr[-3000:]}")
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(size)]
        for r in ranks:
            print(
                f"{size} {r['rank']:4d} {mb(r['weights'])} {mb(r['directions'])} "
                f"{mb(r['gathered'])} {mb(r['peak'])} {mb(r['rss'])}"
            )
        scores = np.array(ranks[0]["scores"])
        if reference is None:
            reference = scores
        else:
            err = np.abs(scores - reference).max() / np.abs(reference).max()
            print(
                f"  scores vs R={args.ranks.split(',')[0]}: largest difference {err:.1e} (relative)"
            )
            if err > 1e-6:
                sys.exit("scores differ beyond 1e-6")


if __name__ == "__main__":
    main()
