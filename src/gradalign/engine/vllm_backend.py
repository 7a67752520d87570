"""Optional vLLM rollout engine (``rollout.backend: vllm``): the same `Rollouts` as
`gradalign.engine.rollout.generate`, sampled by a vLLM engine that lives in this process beside the
training model, on the same GPU.

- vLLM is imported lazily; without it (or without a CUDA GPU) `require` raises one clear error.
- The engine runs in-process (``distributed_executor_backend="external_launcher"``, as TRL 1.16's
  colocate mode does), so the training model's weights are copied into it directly: every
  `generate_vllm` call first loads the current policy weights into the engine
  (`sync_weights`; LoRA adapters merged, as TRL does), since the policy may have been trained
  since the last call.
- Sampled token ids are kept as vLLM returns them, EOS included, so scoring never re-tokenises.
  Rewards come from `gradalign.data.rewards.score_completion`, salted per rollout exactly as the HF
  path salts them.

Tested here only up to the missing-vLLM error and the weight naming (`vllm_weights`): these
machines have neither vLLM nor a GPU. The engine calls follow TRL 1.16's
``trl/generation/vllm_generation.py`` (vLLM 0.22 - 0.31).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gradalign.data.problems import Problem
from gradalign.engine.policy import format_prompt
from gradalign.engine.rollout import Rollouts, SamplingConfig, score_rollouts

INSTALL_HINT = (
    "rollout.backend='vllm' needs the vllm extra (pip install gradalign[vllm]) and a CUDA GPU"
)


class VLLMUnavailable(RuntimeError):
    """vLLM is not installed or no CUDA GPU is visible."""


def available() -> bool:
    """Whether vLLM is installed and a CUDA GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def require() -> None:
    """Raise `VLLMUnavailable` (naming what is missing) unless `available()`."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vllm is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise VLLMUnavailable(f"{INSTALL_HINT}; here {' and '.join(missing)}")


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


@contextmanager
def vllm_weights(model) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, tensor) of every weight of `model` under the plain Hugging Face names that vLLM's
    ``load_weights`` expects; a LoRA model's adapters are merged into the base weights for the
    duration of the block and unmerged after it. Tensors are views, not copies."""
    if not _is_peft(model):
        yield [(n, p.data) for n, p in model.named_parameters()]
        return
    model.merge_adapter()
    try:
        weights = []
        for name, p in model.named_parameters():
            if "lora_" in name or "original_module" in name:
                continue  # adapters are merged; vLLM has no such weights
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            weights.append((name.replace("modules_to_save.default.", ""), p.data))
        yield weights
    finally:
        model.unmerge_adapter()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


class VLLMEngine:
    """A vLLM engine in this process, loaded from a Hugging Face directory.

    `gpu_memory_utilization` is the share of GPU memory vLLM may take (weights + KV cache);
    the rest stays for the training model, its optimizer and the scoring backward passes.
    """

    def __init__(
        self,
        model_dir: str,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        seed: int = 0,
        load_format: str = "auto",
    ) -> None:
        require()
        from vllm import LLM

        # external_launcher runs the engine in this process and reads the torch.distributed
        # rendezvous from the environment (a world of one here).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            load_format=load_format,
            distributed_executor_backend="external_launcher",
        )

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into the engine and drop its prefix cache."""
        with vllm_weights(model) as weights:
            engine = self.llm.llm_engine
            executor = getattr(engine, "model_executor", None)
            if executor is not None and hasattr(executor, "driver_worker"):
                # in-process worker (external_launcher): copy tensor by tensor, GPU to GPU
                executor.driver_worker.model_runner.model.load_weights(weights)
            else:  # engine in another process: the documented `LLM.apply_model` RPC (tensors
                # are pickled; recent vLLM needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 for it)
                cpu = [(n, t.detach().cpu()) for n, t in weights]
                self.llm.apply_model(lambda m: m.load_weights(cpu))
        self.llm.reset_prefix_cache()


def engine_from_config(cfg, model, tokenizer, gpu_memory_utilization: float = 0.3) -> VLLMEngine:
    """The engine of a run: loaded from ``model.name`` when it is a local directory; for a
    built-in model, from its config and tokenizer written to a temporary directory with dummy
    weights (the first `generate_vllm` call loads the real ones)."""
    require()
    m = cfg.model
    if not m.name.startswith("builtin:"):
        return VLLMEngine(m.name, m.dtype, gpu_memory_utilization, None, cfg.seed)
    folder = tempfile.mkdtemp(prefix="gradalign-vllm-")
    base = model.get_base_model() if _is_peft(model) else model
    base.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return VLLMEngine(folder, m.dtype, gpu_memory_utilization, None, cfg.seed, "dummy")


def generate_vllm(
    engine: VLLMEngine,
    model,
    tokenizer,
    problems: list[Problem],
    group_size: int,
    sampling: SamplingConfig,
    seed: int,
    greedy: bool = False,
    salt: str = "",
    progress: Callable[[int], None] | None = None,
) -> Rollouts:
    """`gradalign.engine.rollout.generate` on a vLLM engine: `group_size` completions per problem
    (greedy: 1) from `model`'s current weights. Problem i samples with seed ``seed + i``, so the
    same weights, problems and seed give the same rollouts whatever the batching.

    ``functools.partial(generate_vllm, engine)`` has `rollout.generate`'s signature."""
    from vllm import SamplingParams

    if greedy and group_size != 1:
        raise ValueError("greedy decoding gives one completion per problem (group_size=1)")
    engine.sync_weights(model)
    eos_id = tokenizer.eos_token_id
    prompt_ids = [format_prompt(tokenizer, p.chat) for p in problems]
    params = [
        SamplingParams(
            n=group_size,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=seed + i,
            stop_token_ids=[eos_id],
        )
        for i in range(len(problems))
    ]
    outputs = engine.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params, use_tqdm=False
    )
    completions: list[list[int]] = []
    for out in outputs:  # same order as the prompts; samples of one problem together
        for sample in sorted(out.outputs, key=lambda c: c.index):
            ids = list(sample.token_ids)
            completions.append(ids[: ids.index(eos_id) + 1] if eos_id in ids else ids)
    if progress is not None:
        progress(len(problems))
    return score_rollouts(tokenizer, problems, prompt_ids, completions, group_size, salt)
