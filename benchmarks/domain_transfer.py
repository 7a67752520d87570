"""Benchmark: do the built-in testbed's families differ in what RL must change?

On the warm-started policy (from the cache, or trained and cached), before any GRPO step:

- exact transfer: for each family, three disjoint sets A, B, C of `--size` clean problems from
  the held-out partition (never trained on); J_S = mean over S of P(reference solution + EOS
  | prompt), and ∇J_S by autograd over all parameters. Within a family: cos(∇J_A, ∇J_B) and
  cos(∇J_A, ∇J_C); across two families f, g: cos(∇J_A(f), ∇J_A(g)) and cos(∇J_B(f),
  ∇J_B(g)). The gate: within ≥ 0.5 and across at least 0.3 lower;
- per family: J, greedy pass@1, and with `--k` samples per problem at the run's temperature
  the mean pass rate and the share of problems whose samples got different rewards (a group
  with reward variance: a candidate GradAlign can score).

    .venv/bin/python benchmarks/domain_transfer.py --set data.families=[addition,countdown2] \\
        --set model.warmstart_family_flaws=[addition:lastdigit:0.4] --json runs/dt/x.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from gradalign.config import load_config
from gradalign.core.grpo import pack_sequences
from gradalign.data.tasks import draw_problems
from gradalign.engine.policy import format_prompt
from gradalign.engine.rollout import generate
from gradalign.engine.round_scoring import sampling_config
from gradalign.run.setup import build_policy, build_sets


def grad_j(model, tokenizer, problems, solutions) -> torch.Tensor:
    """∇ of J = mean_p P(solution_p + EOS | prompt_p), flattened over all parameters."""
    prompts = [format_prompt(tokenizer, p.prompt) for p in problems]
    answers = [
        tokenizer(s, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for s in solutions
    ]
    ids, attn, mask = pack_sequences(prompts, answers, tokenizer.pad_token_id)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]  # [N, T, V]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # [N, T]
    j = torch.exp((logp * mask).sum(1)).mean()
    j.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).detach().clone(), float(j.detach())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--size", type=int, default=48, help="problems per set (3 sets per family)")
    ap.add_argument("--k", type=int, default=8, help="samples per problem for the pass rates")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cfg = load_config(None, args.overrides)
    t0 = time.perf_counter()
    model, tokenizer = build_policy(cfg, build_sets(cfg))
    warm_s = time.perf_counter() - t0
    model.eval()
    rng = np.random.default_rng(args.seed)
    seen: set[str] = set()
    sets, fam_stats = {}, {}
    for fam in cfg.data.families:
        problems, solutions = draw_problems(fam, 3 * args.size, rng, 0, seen, partition="heldout")
        n = args.size
        for j, name in enumerate("ABC"):
            sl = slice(j * n, (j + 1) * n)
            sets[(fam, name)] = grad_j(model, tokenizer, problems[sl], solutions[sl])
        sampling = sampling_config(cfg.rollout)
        greedy = generate(model, tokenizer, problems, 1, sampling, args.seed, greedy=True)
        sampled = generate(model, tokenizer, problems, args.k, sampling, args.seed)
        rates = sampled.pass_rates()
        fam_stats[fam] = {
            "J": float(np.mean([sets[(fam, x)][1] for x in "ABC"])),
            "greedy": float(greedy.rewards.mean()),
            "sampled": float(rates.mean()),
            "variance_share": float(((rates > 0) & (rates < 1)).mean()),
            "samples": sampled.texts[: args.k],
        }
    within = {
        fam: [cos(sets[(fam, "A")][0], sets[(fam, x)][0]) for x in "BC"]
        for fam in cfg.data.families
    }
    across = {
        f"{f}|{g}": [cos(sets[(f, x)][0], sets[(g, x)][0]) for x in "AB"]
        for f, g in itertools.combinations(cfg.data.families, 2)
    }
    out = {
        "overrides": args.overrides,
        "warmstart_s": warm_s,
        "within": within,
        "across": across,
        "families": fam_stats,
    }
    for fam, c in within.items():
        s = fam_stats[fam]
        print(
            f"{fam:<15} within {c[0]:+.3f} / {c[1]:+.3f}   J {s['J']:.3f}  greedy "
            f"{s['greedy']:.2f}  sampled {s['sampled']:.2f}  with variance "
            f"{s['variance_share']:.0%}  e.g. {s['samples'][:4]}"
        )
    for pair, c in across.items():
        print(f"{pair:<30} across {c[0]:+.3f} / {c[1]:+.3f}")
    print(f"warm start (or cache load) {warm_s:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
