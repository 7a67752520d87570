"""Benchmark: rollout throughput of HF `generate` against vLLM on the same model shape.

For each shape (`qwen_shapes.SHAPES`, random init), `--prompts` random prompts x `--samples`
completions of exactly `--new-tokens` tokens (EOS never stops them): sequences and generated
tokens per second, and peak GPU memory, for HF `generate` (prompts batched `--batch` at a
time) and, when vLLM is installed and a GPU is visible, for a vLLM engine loaded from the
same config with dummy weights (no tokenizer: token ids in, token ids out); then the ratio.

    .venv/bin/python benchmarks/rollout_throughput.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

import numpy as np
import torch
from qwen_shapes import SHAPES, build_qwen, qwen_config


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab - 1, 32).tolist() for _ in range(n)]


def hf_generate(shape: str, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, peak MiB) of HF generate over all prompts."""
    model = build_qwen(shape, args.dtype, args.device, args.seed)
    ids = prompts(args.prompts, SHAPES[shape][5], args.seed)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(0, len(ids), args.batch):
        batch = torch.tensor(ids[i : i + args.batch], device=args.device)  # [B, 32]
        with torch.no_grad():
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                num_return_sequences=args.samples,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
    peak = 0.0
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    seconds = time.perf_counter() - t0
    del model
    return seconds, peak


def vllm_generate(shape: str, args: argparse.Namespace) -> tuple[float, float]:
    from vllm import LLM, SamplingParams

    folder = tempfile.mkdtemp(prefix="gradalign-vllm-bench-")
    qwen_config(shape).save_pretrained(folder)
    llm = LLM(
        model=folder,
        dtype=args.dtype,
        load_format="dummy",
        skip_tokenizer_init=True,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
    )
    params = SamplingParams(
        n=args.samples, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False
    )
    ids = prompts(args.prompts, SHAPES[shape][5], args.seed)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in ids], sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    total = torch.cuda.mem_get_info()
    peak = (total[1] - total[0]) / 2**20  # vLLM reserves its share up front
    del llm
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64, help="prompts per HF generate call")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    use_vllm = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    seqs = args.prompts * args.samples
    print(f"{'shape':<14}{'engine':<8}{'s':>9}{'seq/s':>9}{'tok/s':>11}{'peak MiB':>10}")
    for shape in args.shapes.split(","):
        hf = hf_generate(shape, args)
        rows = [("hf", *hf)]
        if use_vllm:
            rows.append(("vllm", *vllm_generate(shape, args)))
        for engine, s, peak in rows:
            print(
                f"{shape:<14}{engine:<8}{s:>9.2f}{seqs / s:>9.1f}"
                f"{seqs * args.new_tokens / s:>11.0f}{peak:>10.0f}"
            )
        if use_vllm:
            print(f"{shape:<14}vLLM / HF throughput: {hf[0] / rows[1][1]:.1f}x")
        else:
            print(f"{shape:<14}vLLM: not measured (not installed, or no CUDA GPU)")


if __name__ == "__main__":
    main()
