"""Shared fixtures. The tiny model is built once per session; tests must not modify it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

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


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """`reward_module(name, source)` writes a user reward module `name` into tmp_path and makes
    it importable (on sys.path, or with ``cwd=True`` only as the working directory, as
    `resolve_reward` finds it there); afterwards the module and the rewards resolved from it
    are forgotten (`rewards.forget_rewards`)."""
    from gradalign.data.rewards import forget_rewards

    made: list[str] = []

    def write(name: str, source: str, cwd: bool = False) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        if cwd:
            monkeypatch.chdir(tmp_path)
            monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
        else:
            monkeypatch.syspath_prepend(str(tmp_path))
        made.append(name)
        return name

    yield write
    for name in made:
        sys.modules.pop(name, None)
        forget_rewards(name)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A local Hugging Face checkpoint (a random Qwen2 with a Qwen-style chat template and a
    byte-level BPE tokenizer, `local_qwen.save_qwen`), shared by the session's tests."""
    from local_qwen import save_qwen

    return save_qwen(tmp_path_factory.mktemp("qwen2-tiny"))
