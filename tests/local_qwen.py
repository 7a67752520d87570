"""A local Hugging Face checkpoint as a user brings one, built here in seconds: a random Qwen2
(hidden 64, 2 layers) with a Qwen-style chat template and a byte-level BPE tokenizer, saved with
save_pretrained. The `qwen_dir` fixture (conftest.py) is one such directory per test session."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenisation (transformers' Qwen2Tokenizer rebuilds the tokenizer with it on load)
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """A byte-level BPE tokenizer trained here on a few strings, Qwen2-style, ~310 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "What is 30 + 4? The answer is \\boxed{34}.",
        "user\nassistant\nPlease reason step by step.",
        "Compute 12 * 3 = 36. #### 36",
    ]
    tok.train_from_iterator(corpus * 4, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = QWEN_TEMPLATE
    return hf


def save_qwen(path: Path, context: int = 256) -> Path:
    """A random Qwen2 (hidden 64, 2 layers, 4 heads, 2 kv heads) saved as a user's checkpoint,
    with an Instruct-style generation_config (repetition_penalty 1.05)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = qwen_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(  # as Qwen2.5-Instruct's generation_config.json
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        repetition_penalty=1.05,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
