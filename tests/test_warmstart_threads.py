"""The warm start trains on one CPU thread whatever the process has (`one_cpu_thread`), so a
recipe's cache key always stands for the same weights."""

from __future__ import annotations

import torch

from gradalign.data.tasks import warmstart_examples
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.engine.warmstart import supervised_warmstart


def _trained(threads: int, seen: list[int]) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    tok = build_tokenizer()
    model = build_model(tok, "tiny", seed=0)
    examples = warmstart_examples(["addition", "countdown2"], 64, 0, set(), set())
    supervised_warmstart(
        model,
        tok,
        examples,
        3,
        3e-3,
        16,
        0,
        progress=lambda s, _: seen.append(torch.get_num_threads()),
    )
    assert torch.get_num_threads() == threads  # the process's count comes back
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_warm_start_runs_on_one_thread_and_gives_the_same_weights() -> None:
    before = torch.get_num_threads()
    try:
        seen: list[int] = []
        two = _trained(2, seen)
        one = _trained(1, seen)
    finally:
        torch.set_num_threads(before)
    assert seen == [1] * 6
    for name, tensor in two.items():
        assert torch.equal(tensor, one[name]), name
