"""Randomly initialised models of Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (nothing is
downloaded: a transformers `Qwen2Config` with their published dimensions) and synthetic
rollouts of random token ids for them, shared by `scoring.py` and `rollout_throughput.py`.

`qwen-tiny` has the same architecture at a size a CPU test runs in seconds; `smollm2-135m`
SmolLM2-135M's dimensions (vocabulary 49,152), a real-vocabulary shape for a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradalign.data.problems import Problem
from gradalign.engine.rollout import Rollouts

# Qwen2.5 config.json: hidden, intermediate, layers, attention heads, key/value heads, vocab
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen-tiny": (64, 128, 2, 4, 2, 1024),
    # SmolLM2-135M's dimensions (a Llama; here as a Qwen2 of that shape): a 135M-parameter,
    # real-vocabulary shape a CPU runs
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def qwen_config(shape: str) -> Any:
    from transformers import Qwen2Config

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        rope_theta=1e6,
        tie_word_embeddings=True,  # as both Qwen2.5 sizes
        eos_token_id=vocab - 1,
        pad_token_id=0,
    )


def build_qwen(shape: str, dtype: str, device: str, seed: int) -> torch.nn.Module:
    """Random init (seeded) of `shape` in `dtype` on `device`, in eval mode."""
    from transformers import Qwen2ForCausalLM

    cfg = qwen_config(shape)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(device=device, dtype=DTYPES[dtype]).eval()


def synthetic_rollouts(n: int, k: int, vocab: int, seed: int, first_id: int = 0) -> Rollouts:
    """n problems x k rollouts of random token ids (prompts 24-48 tokens, completions 10-24,
    ids 1 .. vocab-2: no pad, no EOS) with Bernoulli(0.5) rewards; scoring cost does not
    depend on what the tokens say."""
    rng = np.random.default_rng(seed)
    problems = [Problem(first_id + i, f"p{i}", "", "synthetic") for i in range(n)]
    prompts = [rng.integers(1, vocab - 1, int(rng.integers(24, 49))).tolist() for _ in range(n)]
    comps = [rng.integers(1, vocab - 1, int(rng.integers(10, 25))).tolist() for _ in range(n * k)]
    rewards = rng.integers(0, 2, size=n * k).astype(np.float64)
    group = np.repeat(np.arange(n), k)
    return Rollouts(problems, prompts, comps, [""] * (n * k), rewards, group)
