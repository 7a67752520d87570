"""Groups per scoring micro-batch (`scoring.micro`, ``select.groups_per_micro=0``): the rule
on hand-sized model shapes, and that the rule changes no score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradalign.config import SelectConfig, load_config
from gradalign.config_rules import ConfigError
from gradalign.core.alignment import exact_alignment
from gradalign.data.problems import Problem
from gradalign.engine import round_scoring
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.engine.rollout import Rollouts
from gradalign.scoring import distributed as dd
from gradalign.scoring import micro
from gradalign.scoring.pieces import flatten_pieces

pytestmark = pytest.mark.usefixtures("one_thread")
GROUP_ALIGNMENT = dd.distributed_group_alignment


def llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """hidden 64, MLP 128, 4 blocks, vocabulary 1,000, tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(cfg).to(dtype)


def test_bytes_per_token_by_hand() -> None:
    model = llama()
    per_block = 16 * 64 + 8 * 128  # 2,048 numbers per token and block
    # all parameters: a tied embedding is scored, so all 4 blocks and the head's 2 V
    assert micro.token_bytes(model, scored_parameters(model, "all")) == (4 * per_block + 2000) * 4
    assert micro.token_bytes(model, scored_parameters(model, "last:2")) == 2 * per_block * 4
    assert micro.token_bytes(model, scored_parameters(model, "last:1")) == per_block * 4
    bf16 = llama(torch.bfloat16)
    assert micro.token_bytes(bf16, scored_parameters(bf16, "all")) == (4 * per_block + 2000) * 2


def test_groups_per_micro_by_hand() -> None:
    model = llama()
    every, last2 = scored_parameters(model, "all"), scored_parameters(model, "last:2")
    assert micro.MICRO_BYTES == 1 << 29 and micro.MAX_GROUPS == 16
    # 40,768 bytes per token x 8 rows x 500 tokens = 163,072,000 per group: 3 in 512 MiB
    assert micro.groups_per_micro(model, every, 8, 500) == 3
    assert micro.groups_per_micro(model, every, 8, 411) == 4  # 134,045,184 per group: 4.005
    assert micro.groups_per_micro(model, every, 8, 412) == 3  # 3.995
    assert micro.groups_per_micro(model, every, 1, 500) == 16  # 26 in budget, capped
    assert micro.groups_per_micro(model, last2, 8, 2000) == 2  # 16,384 x 16,000 per group
    assert micro.groups_per_micro(model, last2, 8, 500) == 8
    assert micro.groups_per_micro(model, every, 8, 10**6) == 1  # never 0
    bf16 = llama(torch.bfloat16)
    assert micro.groups_per_micro(bf16, scored_parameters(bf16, "all"), 8, 500) == 6
    # an explicit select.groups_per_micro wins; output features and unknown shapes: the cap
    assert micro.groups_per_micro(model, every, 8, 10**6, requested=3) == 3
    assert micro.groups_per_micro(model, None, 8, 10**6) == 16
    assert micro.groups_per_micro(nn.Linear(2, 2), [], 8, 10**6) == 16


def test_smollm2_shape_gets_smaller_micro_batches() -> None:
    """SmolLM2-135M (vocabulary 49,152, hidden 576, MLP 1,536, 30 blocks) at select.params=last:4
    and the built-in sizes at their default lengths (<= 38 tokens with max_new_tokens 12)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        smol = LlamaForCausalLM(cfg)
    last4 = scored_parameters(smol, "last:4")
    assert micro.token_bytes(smol, last4) == 4 * (16 * 576 + 8 * 1536) * 4  # 344,064
    assert micro.groups_per_micro(smol, last4, 8, 56) == 3  # 154,140,672 bytes per group
    assert micro.groups_per_micro(smol, last4, 8, 72) == 2
    assert micro.groups_per_micro(smol, scored_parameters(smol, "all"), 8, 57) == 1
    tok = build_tokenizer()
    tiny, small = build_model(tok, "tiny"), build_model(tok, "small")
    for length in (22, 38, 84):  # addition, countdown (+ 12 new tokens), the limit
        assert micro.groups_per_micro(tiny, scored_parameters(tiny, "all"), 8, length) == 16
    assert micro.groups_per_micro(tiny, scored_parameters(tiny, "all"), 8, 85) == 15
    assert micro.groups_per_micro(small, scored_parameters(small, "all"), 8, 22) == 12
    assert micro.groups_per_micro(small, scored_parameters(small, "all"), 8, 38) == 7
    assert micro.groups_per_micro(small, scored_parameters(small, "last:1"), 8, 38) == 16


def rollouts(n: int, seed: int, first_id: int = 0) -> Rollouts:
    rng = np.random.default_rng(seed)
    problems = [Problem(first_id + i, f"q{i}", "1", "addition") for i in range(n)]
    prompts = [rng.integers(4, 80, int(rng.integers(4, 9))).tolist() for _ in range(n)]
    comps = [rng.integers(4, 80, int(rng.integers(2, 7))).tolist() for _ in range(4 * n)]
    rewards = rng.integers(0, 2, 4 * n).astype(np.float64)
    return Rollouts(problems, prompts, comps, [""] * (4 * n), rewards, np.repeat(np.arange(n), 4))


def scores(model: nn.Module, s: SelectConfig, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """(dot_val, norm, split-half cosine, the groups per micro-batch the scorer was given)."""
    seen: list[int] = []

    def spy(model, params, batch, dirs, gpm, *rest):  # noqa: ANN001, ANN002
        seen.append(gpm)
        return GROUP_ALIGNMENT(model, params, batch, dirs, gpm, *rest)

    monkeypatch.setattr(dd, "distributed_group_alignment", spy)
    tok = build_tokenizer()
    al, split, _ = round_scoring._gradient_scores(
        model, tok, rollouts(20, 1), rollouts(5, 2, 100), s, 0, None, round_scoring.no_bar
    )
    return al.dot_val, al.norm, split, seen


def test_auto_keeps_the_tiny_models_batching_and_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(build_tokenizer(), "tiny", seed=3).eval()
    auto = scores(model, SelectConfig(), monkeypatch)
    fixed = scores(model, SelectConfig(groups_per_micro=16), monkeypatch)
    assert auto[3] == fixed[3] == [16]
    for a, b in zip(auto[:3], fixed[:3]):
        np.testing.assert_array_equal(a, b)  # bit for bit


def test_a_smaller_budget_changes_batching_not_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(build_tokenizer(), "tiny", seed=3).eval()
    params = scored_parameters(model)
    pad = build_tokenizer().pad_token_id
    cand, val = rollouts(20, 1).to_batch(pad), rollouts(5, 2, 100).to_batch(pad)
    length = max(cand.input_ids.shape[1], val.input_ids.shape[1])
    per_group = micro.token_bytes(model, params) * 4 * length
    monkeypatch.setattr(micro, "MICRO_BYTES", 3 * per_group + 1)  # room for 3 groups
    auto = scores(model, SelectConfig(), monkeypatch)
    three = scores(model, SelectConfig(groups_per_micro=3), monkeypatch)
    assert auto[3] == three[3] == [3]
    for a, b in zip(auto[:3], three[:3]):
        np.testing.assert_array_equal(a, b)
    # and the exact reference (one backward per group) against the same direction
    s = SelectConfig(groups_per_micro=3)
    direction, _ = round_scoring.direction_with_split_half(model, params, val, s)
    ref = exact_alignment(model, params, cand, flatten_pieces(direction))
    np.testing.assert_allclose(auto[0], ref.dot_val, rtol=1e-4, atol=1e-6 * ref.norm.max())
    np.testing.assert_allclose(auto[1], ref.norm, rtol=1e-4, atol=1e-6 * ref.norm.max())


def test_groups_per_micro_zero_is_auto_and_negative_is_refused() -> None:
    assert load_config(None, []).select.groups_per_micro == 0
    assert load_config(None, ["select.groups_per_micro=4"]).select.groups_per_micro == 4
    with pytest.raises(ConfigError, match=r"select\.groups_per_micro: must be >= 0, got -1"):
        load_config(None, ["select.groups_per_micro=-1"])


def test_fields_help_states_the_rule() -> None:
    from typer.testing import CliRunner

    from gradalign.cli import app

    result = CliRunner().invoke(app, ["fields"], terminal_width=200)
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert "0 = auto: as many whole groups (1..16) as keep the scored blocks'" in text
    assert "activations within 512 MiB" in text
