"""Benchmark: exact per-group scoring vs batched scoring vs the plain-backward floor.

On the same model and the same rollouts (P problems x k rollouts sampled from the randomly
initialised built-in model, completions cut to 10-24 tokens, rewards drawn from a seeded
Bernoulli(0.5) so that nearly every group has nonzero variance), prints per model size:

- floor:   one plain forward+backward of sum_p L_p, micro-batched by whole groups
           (`fastscore.batched_summed_gradient`);
- batched: `fastscore.batched_alignment` with chunk=False (dot_val + norm: modes sim, dot, norm,
           negsim, simacc) and chunk=True (adds dot_chunk for `align`: in the same pass while
           P x D x 4 bytes <= fastscore.MAX_KEEP_BYTES, else after one more floor pass);
- exact:   `alignment.exact_alignment` (one backward per group, plus its chunk pass);
- last:1:  the batched scorer on the last block (plus final norm and an untied head) only;
- output:  the LM head's gradient feature from the forward pass alone
           (`output_features`, ``select.features=output``), exact and projected
           (``--output-dims``, 64x128 by default), validation direction included;
- plain forward: the chunk's token log-probabilities without grad, the cost of reading h_t;

their wall-clock and process-CPU times, ratios to the floor, to a plain forward and to exact, peak memory (RSS above
the start of each step, sampled every 5 ms, on CPU; torch.cuda.max_memory_allocated on CUDA) and
the largest disagreement batched vs exact, and the Spearman correlation of each cheaper
scorer's cosines with the full gradient's. `--skip "exact per-group loop"` leaves out a step. On a CPU shared with other jobs, `--threads 1` gives
the steadiest figures (2 threads contending with other processes spin and slow down erratically).

    .venv/bin/python benchmarks/scoring.py --problems 256 --rollouts 8 --sizes tiny,small

`--sizes qwen2.5-0.5b,qwen2.5-1.5b --device cuda --dtype bfloat16` scores random-init models
of those shapes (`qwen_shapes.py`) on random token ids: `gpu_check.sh` runs it so.
"""

from __future__ import annotations

import argparse
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
from qwen_shapes import DTYPES, SHAPES, build_qwen, synthetic_rollouts

from gradalign.core.alignment import exact_alignment
from gradalign.core.common import parse_output_dims
from gradalign.core.diagnostics import split_halves
from gradalign.core.grpo import token_logprobs
from gradalign.data.tasks import draw_problems
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.engine.rollout import Rollouts, SamplingConfig, generate
from gradalign.scoring import micro
from gradalign.scoring.fastscore import (
    batched_alignment,
    batched_summed_gradient,
    batched_validation_direction,
)
from gradalign.scoring.output_features import (
    HeadFeature,
    distributed_feature_alignment,
    distributed_feature_halves,
)
from gradalign.scoring.pieces import flatten_pieces, unit_pieces


def measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, float, float]:
    """(result, wall seconds, process CPU seconds, peak MiB above the start)."""
    cpu = time.process_time()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return out, time.perf_counter() - start, time.process_time() - cpu, peak
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    out = fn()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    thread.join()
    peak = max(peak, proc.memory_info().rss)
    return out, elapsed, cpu, (peak - base) / 2**20


def make_rollouts(model, tok, n: int, k: int, seed: int, first_id: int) -> Rollouts:
    problems, _ = draw_problems("addition", n, np.random.default_rng(seed), first_id, set())
    ro = generate(
        model, tok, problems, k, SamplingConfig(max_new_tokens=24, prompts_per_batch=64), seed=seed
    )
    rng = np.random.default_rng(seed + 1)
    cut = [c[: int(rng.integers(10, 25))] for c in ro.completion_ids]  # 10-24 tokens
    rewards = rng.integers(0, 2, size=len(cut)).astype(np.float64)  # Bernoulli(0.5)
    return Rollouts(ro.problems, ro.prompt_ids, cut, ro.texts, rewards, ro.group)


def worst(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def model_and_rollouts(size: str, args: argparse.Namespace) -> tuple[Any, Rollouts, Rollouts, int]:
    """The model, chunk and validation rollouts, and the pad id: a built-in size samples
    its rollouts; a Qwen shape (`qwen_shapes`, random init) gets random token ids."""
    if size in SHAPES:
        model = build_qwen(size, args.dtype, args.device, args.seed)
        vocab = SHAPES[size][5]
        chunk = synthetic_rollouts(args.problems, args.rollouts, vocab, args.seed)
        val = synthetic_rollouts(args.val_problems, args.rollouts, vocab, args.seed + 7, 10**6)
        return model, chunk, val, 0
    tok = build_tokenizer()
    model = build_model(tok, size, seed=args.seed).to(args.device, DTYPES[args.dtype]).eval()
    chunk = make_rollouts(model, tok, args.problems, args.rollouts, args.seed, 0)
    val = make_rollouts(model, tok, args.val_problems, args.rollouts, args.seed + 7, 10**6)
    return model, chunk, val, tok.pad_token_id


def plain_forward(model, batch, gpm: int) -> None:
    """One forward of the chunk's rollouts without grad (token log-probs), by micro-batch."""
    with torch.no_grad():
        for start in range(0, batch.num_groups, gpm):
            sub = batch.take_groups(range(start, min(start + gpm, batch.num_groups)))
            token_logprobs(model, sub.input_ids, sub.attention_mask)


def bench(size: str, args: argparse.Namespace) -> None:
    model, chunk, val, pad = model_and_rollouts(size, args)
    params = scored_parameters(model, args.params)
    last1 = scored_parameters(model, "last:1")
    batch = chunk.to_batch(pad).to(args.device)
    vbatch = val.to_batch(pad).to(args.device)
    rows, length = args.rollouts, max(batch.input_ids.shape[1], vbatch.input_ids.shape[1])
    gpm = micro.groups_per_micro(model, params, rows, length, args.groups_per_micro)
    rule = " (the rule)" if args.groups_per_micro == 0 else ""
    n_par = sum(p.numel() for p in params)
    tokens = int(batch.attention_mask.sum())
    print(
        f"\n== {size}: {n_par / 1e6:.2f}M scored params, {batch.num_groups} problems x "
        f"{args.rollouts} rollouts, {tokens} tokens, {int(chunk.zero_variance().sum())} "
        f"zero-variance groups, {gpm} groups per micro-batch{rule}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, vocabulary {model.config.vocab_size}"
    )
    val_dir = flatten_pieces(batched_validation_direction(model, params, vbatch, "sum", gpm))
    val_dir = val_dir.to(args.device)
    last_dir = batched_validation_direction(model, last1, vbatch, "sum", gpm)
    dims = parse_output_dims(args.output_dims)
    exact_f, proj_f = HeadFeature(None, args.seed), HeadFeature(dims, args.seed)

    def output(feature: HeadFeature) -> Any:
        halves = split_halves(vbatch.num_groups)
        a, b = distributed_feature_halves(model, vbatch, halves, feature, "sum", gpm)
        direction = unit_pieces([x + y for x, y in zip(a, b)])
        return distributed_feature_alignment(model, batch, direction, feature, gpm)

    steps: dict[str, Callable[[], Any]] = {
        "plain forward": lambda: plain_forward(model, batch, gpm),
        "floor (plain fwd+bwd)": lambda: batched_summed_gradient(model, params, batch, gpm),
        "batched, chunk=False": lambda: batched_alignment(
            model, params, batch, val_dir, gpm, chunk=False
        ),
        "batched, chunk=True": lambda: batched_alignment(model, params, batch, val_dir, gpm),
        "last:1, chunk=False": lambda: batched_alignment(
            model, last1, batch, last_dir, gpm, chunk=False
        ),
        "output exact": lambda: output(exact_f),
        f"output {args.output_dims}": lambda: output(proj_f),
        "exact per-group loop": lambda: exact_alignment(model, params, batch, val_dir),
    }
    skip = {s.strip() for s in re.split(r",(?! )", args.skip) if s.strip()}  # "a, b": one name
    steps = {k: v for k, v in steps.items() if k not in skip}
    measure(steps["floor (plain fwd+bwd)"], args.device)  # warm-up
    res = {name: measure(fn, args.device) for name, fn in steps.items()}
    _, t_floor, c_floor, _ = res["floor (plain fwd+bwd)"]
    _, t_fwd, c_fwd, _ = res["plain forward"]
    t_ex, c_ex = (res["exact per-group loop"][1:3]) if "exact per-group loop" in res else (0, 0)
    print(f"{'':<23}{'-------------- wall clock --------------':>40}{'---- process CPU ----':>24}")
    print(
        f"{'step':<23}{'s':>8}{'x floor':>8}{'x fwd':>8}{'exact/x':>8}{'':>8}"
        f"{'s':>8}{'x floor':>8}{'exact/x':>8}{'peak MiB':>10}"
    )
    for name, (_, t, c, m) in res.items():
        ex_t, ex_c = (f"{t_ex / t:.2f}", f"{c_ex / c:.2f}") if t_ex else ("-", "-")
        print(
            f"{name:<23}{t:>8.2f}{t / t_floor:>8.2f}{t / t_fwd:>8.2f}{ex_t:>8}{'':>8}"
            f"{c:>8.2f}{c / c_floor:>8.2f}{ex_c:>8}{m:>10.0f}"
        )
    b_sim = res["batched, chunk=False"][0]
    b_all = res.get("batched, chunk=True", res["batched, chunk=False"])[0]
    if "exact per-group loop" in res and "batched, chunk=True" in res:
        ex = res["exact per-group loop"][0]
        print(
            f"max rel. diff batched vs exact: dot_val {worst(ex.dot_val, b_all.dot_val):.1e}, "
            f"dot_chunk {worst(ex.dot_chunk, b_all.dot_chunk):.1e}, "
            f"norm {worst(ex.norm, b_all.norm):.1e} (chunk=False dot_val "
            f"{worst(ex.dot_val, b_sim.dot_val):.1e})"
        )
    live = b_sim.norm > 0
    for name in ("last:1, chunk=False", "output exact", f"output {args.output_dims}"):
        if name in res:
            cos = res[name][0].cos_val
            print(
                f"cos(g_p, g^_V) of {name}: Spearman {spearman(cos[live], b_sim.cos_val[live]):+.3f}"
                " with the full gradient's (groups with reward variance)"
            )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1]) if len(a) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=256, help="candidate problems in the chunk")
    ap.add_argument("--rollouts", type=int, default=8, help="rollouts per problem (k)")
    ap.add_argument("--val-problems", type=int, default=16, help="validation problems")
    ap.add_argument(
        "--sizes",
        default="tiny,small",
        help="built-in model sizes or Qwen shapes (qwen2.5-0.5b, qwen2.5-1.5b, qwen-tiny)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype")
    ap.add_argument("--params", default="all", help="scored parameters: all | last:N")
    ap.add_argument(
        "--groups-per-micro",
        type=int,
        default=16,
        help="groups per micro-batch, every step; 0: the rule of select.groups_per_micro=0 "
        "for the full gradient (scoring.micro)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its default)")
    ap.add_argument("--output-dims", default="64x128", help="projected output feature: AxB")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.sizes.split(","):
        bench(size.strip(), args)


if __name__ == "__main__":
    main()
