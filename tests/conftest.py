"""Shared fixtures. The tiny model is built once per session; tests must not modify it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gradalign.engine.policy import use_offline_hub

use_offline_hub()  # as the `gradalign` command does, before transformers is imported


@pytest.fixture(scope="session")
def tokenizer():
    from gradalign.engine.policy import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """The built-in 'tiny' Llama-style model (random init, seed 0, fp32, CPU)."""
    from gradalign.engine.policy import build_model

    return build_model(tokenizer, "tiny", seed=0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny matmuls: as fast, and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A local Hugging Face checkpoint (a random Qwen2 with a Qwen-style chat template and a
    byte-level BPE tokenizer, `local_qwen.save_qwen`), shared by the session's tests."""
    from local_qwen import save_qwen

    return save_qwen(tmp_path_factory.mktemp("qwen2-tiny"))
