"""The policy: a causal LM and its tokenizer.

Two ways in: ``builtin:tiny`` / ``builtin:small`` build a Llama-style model from a
transformers config with a character-level tokenizer (no hub, no download), and any local
Hugging Face directory (config, safetensors weights, tokenizer with a chat template) loads
through ``AutoModelForCausalLM`` exactly as a user's checkpoint would. Either can be wrapped
with LoRA adapters (`apply_lora`), after which only the adapters are trained and scored.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The built-in models and local model directories need no model hub. A process that only runs
# them (the `gradalign` command) turns hub access off, and its per-file bars, before
# transformers is imported; importing this module changes nothing.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def use_offline_hub() -> None:
    """Set `OFFLINE_ENV` in this process (a variable already set is kept): for an entry
    point, before transformers, datasets or TRL is imported (they read it at import)."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def quiet_transformers() -> None:
    """Turn off transformers' per-file progress bars (loading/saving weights): ours suffice."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence, within the block, the deprecation and future warnings that TRL, transformers,
    peft and accelerate raise about each other's API (not the user's to act on) while they
    are imported, configure, wrap or train a model; a warning from anywhere else is kept."""
    with warnings.catch_warnings():
        for module in ("trl", "transformers", "accelerate", "peft", "torch"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = (
    list("0123456789+-*/=()<>.,:;?!'\" \n")
    + [chr(c) for c in range(97, 123)]
    + [chr(c) for c in range(65, 91)]
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A:{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


# Sizes measured in the machine notes: tiny ≈ 0.5M parameters, small ≈ 5M.
BUILTIN_SIZES = {
    "tiny": TinySize(128, 2, 4, 512),
    "small": TinySize(256, 6, 4, 768),
}


def build_tokenizer():
    """Character-level tokenizer (one token per character) with a Q:/A: chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (transformers 4)
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer, size: str = "tiny", seed: int = 0):
    """A randomly initialised Llama-style causal LM sized for CPU experiments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in BUILTIN_SIZES:
        raise ValueError(f"unknown built-in size '{size}' (known: {', '.join(BUILTIN_SIZES)})")
    s = BUILTIN_SIZES[size]
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


# Generation-config fields that reshape the sampling distribution. A checkpoint's own
# generation_config.json may set them (Qwen2.5-Instruct: repetition_penalty 1.05); they are
# reset so rollouts are samples of pi_theta itself, as the on-policy scoring gradient assumes.
_NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0}


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is visible, else 'cpu'; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pretrained(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a local Hugging Face causal-LM directory and its tokenizer (offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    with quiet_libraries():
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        model = model.to(device)
    _set_generation_ids(model, tokenizer)
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        # a causal LM takes none, and transformers 4's generate refuses them (through TRL)
        names = tokenizer.model_input_names
        tokenizer.model_input_names = [n for n in names if n != "token_type_ids"]
    for name, value in _NEUTRAL_SAMPLING.items():
        setattr(model.generation_config, name, value)
    return model, tokenizer


def apply_lora(model, r: int, alpha: int, targets: list[str], seed: int = 0):
    """Wrap `model` with LoRA adapters (Hu et al., 2021) on the linear layers named `targets`
    (module name suffixes, e.g. q_proj). Only the adapters are trainable afterwards; dropout
    is 0 so the scoring gradient of a group is deterministic. Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    linear = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    missing = [t for t in targets if t not in linear]
    if missing or not targets:
        raise ValueError(
            f"model.lora_targets: {missing or targets} name no linear layer of the model "
            f"(its linear layers: {', '.join(linear)})"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # LoRA A is drawn at random (B starts at 0)
        with quiet_libraries():
            return get_peft_model(model, config)


def plain_prompt(chat: list[dict[str, str]]) -> str:
    """The plain rendering of a chat for a tokenizer without a chat template: the messages'
    contents joined by a blank line."""
    return "\n\n".join(m["content"] for m in chat)


def format_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of the chat-formatted prompt (one user message, or a whole chat such as
    `Problem.chat`), ending with the assistant turn opener. A tokenizer without a chat
    template gets the plain rendering: the messages' contents joined by a blank line,
    tokenised with the tokenizer's own special tokens (e.g. BOS)."""
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer(plain_prompt(chat))["input_ids"])
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return list(ids)


def scored_parameters(model: torch.nn.Module, subset: str = "all") -> list[torch.nn.Parameter]:
    """Parameters whose gradient is scored.

    ``all``: every trainable parameter; ``lora``: LoRA adapter weights only;
    ``last:N``: the last N transformer blocks plus the final norm (and an untied LM head).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if subset == "all":
        return [p for _, p in named]
    if subset == "lora":
        chosen = [p for n, p in named if "lora_" in n]
        if not chosen:
            raise ValueError("score.params='lora' but the model has no LoRA parameters")
        return chosen
    if subset.startswith("last:"):
        n_last = int(subset.split(":", 1)[1])
        layers = sorted(
            {int(n.split("layers.")[1].split(".")[0]) for n, _ in named if "layers." in n}
        )
        if not 1 <= n_last <= len(layers):
            raise ValueError(f"score.params='{subset}': the model has {len(layers)} blocks")
        keep = {f"layers.{i}." for i in layers[-n_last:]}
        return [
            p
            for n, p in named
            if any(block in n for block in keep) or ("layers." not in n and "embed" not in n)
        ]
    raise ValueError(f"score.params='{subset}': expected 'all', 'lora' or 'last:N'")
