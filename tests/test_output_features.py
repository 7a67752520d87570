"""The output-layer feature (`scoring.output_features`, `core.output_gradient`) against
autograd's gradient of the LM head weight, and chunked token log-probabilities
(`core.logprobs`) against the whole-tensor ones.

Hand-sized cases: several groups per micro-batch, right padding, a zero-variance group,
tied and untied heads and a head with a bias; every comparison is fp32, so the two sides
differ by round-off only.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scoring_batches import make_batch
from torch import nn

from gradalign.config import ConfigError, SelectConfig
from gradalign.core.common import parse_output_dims
from gradalign.core.grpo import SequenceBatch, group_losses
from gradalign.core.logprobs import (
    head_logprobs,
    logits_logprobs,
    split_head,
    token_logprobs,
    uses_head,
)
from gradalign.core.output_gradient import projections
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.scoring import output_features as of

pytestmark = pytest.mark.usefixtures("one_thread")

# group sizes 3, 5, 8, 4; group 2 has zero variance, so its feature is 0 and gets no pass
REWARDS = [[1, 0, 0], [1, 1, 0, 1, 0], [1] * 8, [0, 1, 1, 0]]
VAL_REWARDS = [[1, 0, 1, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0]]


@pytest.fixture(scope="module")
def tied() -> nn.Module:
    model = build_model(build_tokenizer(), "tiny", seed=3).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def untied(bias: bool) -> nn.Module:
    """A one-block Llama with its own head (with a bias: a plain Linear with one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(5)
    model = LlamaForCausalLM(cfg).eval()
    if bias:
        head = nn.Linear(32, 90, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.normal_(0, 0.5)
        model.lm_head = head
    return model


@pytest.fixture(scope="module")
def batch() -> SequenceBatch:
    return make_batch(REWARDS, seed=1)


def head_use_gradient(model: nn.Module, batch: SequenceBatch, p: int) -> list[torch.Tensor]:
    """Autograd's dL_p/dW (and dL_p/db) of the head's use only: the body's output is
    detached, so a tied weight's input-embedding use contributes nothing."""
    sub = batch.take_groups([p])
    body, head = split_head(model)
    with torch.no_grad():
        h = body(input_ids=sub.input_ids, attention_mask=sub.attention_mask).last_hidden_state
    logp = torch.log_softmax(head(h[:, :-1]).double(), -1)
    logp = logp.gather(-1, sub.input_ids[:, 1:, None]).squeeze(-1)
    loss = group_losses(logp, sub.completion_mask, sub.advantages.double(), sub.group, 1).sum()
    wrt = [head.weight] + ([head.bias] if head.bias is not None else [])
    return list(torch.autograd.grad(loss, wrt))


def features(model, batch, dims=None, seed=0, per_micro=2, chunk=3) -> dict[int, list]:
    feature = of.HeadFeature(dims, seed, chunk)
    return dict(of.iter_features(model, batch, feature, per_micro))


@pytest.mark.parametrize("kind", ["tied", "untied", "bias"])
def test_exact_feature_is_autograds_head_gradient(tied, batch, kind: str) -> None:
    model = tied if kind == "tied" else untied(kind == "bias")
    got = features(model, batch)  # 2 groups per micro-batch, 3 tokens per chunk
    assert sorted(got) == [0, 1, 3]  # group 2: zero variance, no pass
    for p, feat in got.items():
        want = head_use_gradient(model, batch, p)
        assert len(feat) == len(want) == (2 if kind == "bias" else 1)
        for g, w in zip(feat, want):
            scale = float(w.norm())
            assert scale > 1e-4
            torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=1e-5 * scale)


def test_untied_feature_is_the_whole_head_gradient(batch) -> None:
    """Without a tie the head's use is its only use: the feature is autograd's gradient of
    the head weight through the whole model."""
    model = untied(False)
    sub = batch.take_groups([1])
    logits = model(input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, sub.input_ids[:, 1:, None])
    loss = group_losses(logp.squeeze(-1), sub.completion_mask, sub.advantages, sub.group, 1)
    (want,) = torch.autograd.grad(loss.sum(), [model.lm_head.weight])
    got = features(model, sub)[0][0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_tied_feature_leaves_out_the_input_embedding_use(tied, batch) -> None:
    """A tied weight's full gradient is the head's use plus the lookup's: the feature is the
    first only, so it differs from the full gradient by the lookup's rows alone."""
    sub = batch.take_groups([0])
    logits = tied(input_ids=sub.input_ids, attention_mask=sub.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, sub.input_ids[:, 1:, None])
    loss = group_losses(logp.squeeze(-1), sub.completion_mask, sub.advantages, sub.group, 1)
    (full,) = torch.autograd.grad(loss.sum(), [tied.lm_head.weight])
    lookup = full - features(tied, sub)[0][0]  # the embedding use's rows
    seen = set(sub.input_ids.reshape(-1).tolist())
    unseen = [v for v in range(len(full)) if v not in seen]
    assert float(lookup.norm()) > 1e-3 * float(full.norm())
    assert float(lookup[unseen].abs().max()) < 1e-7  # rows of tokens never looked up


def test_padding_and_micro_batching_change_nothing(tied, batch) -> None:
    alone = {
        p: features(tied, batch.take_groups([p]), per_micro=1, chunk=1000)[0] for p in [0, 1, 3]
    }
    together = features(tied, batch, per_micro=4, chunk=5)
    for p, feat in together.items():
        torch.testing.assert_close(feat[0], alone[p][0], rtol=1e-5, atol=1e-7)


def test_projected_feature_is_the_projection_of_the_exact_one(tied, batch) -> None:
    exact = features(tied, batch)
    proj = features(tied, batch, dims=(6, 5), seed=11)
    r1, r2 = projections(tied.config.vocab_size, tied.config.hidden_size, (6, 5), 11)
    for p in exact:
        assert proj[p][0].shape == (6, 5)
        torch.testing.assert_close(proj[p][0], r1.T @ exact[p][0] @ r2, rtol=1e-4, atol=1e-6)


def test_projection_is_seeded(tied, batch) -> None:
    a = features(tied, batch, dims=(4, 3), seed=7)
    b = features(tied, batch, dims=(4, 3), seed=7)
    c = features(tied, batch, dims=(4, 3), seed=8)
    for p in a:
        assert torch.equal(a[p][0], b[p][0])
        assert not torch.allclose(a[p][0], c[p][0])
    r1, r2 = projections(100, 16, (4, 3), 7)
    torch.testing.assert_close(r1, projections(100, 16, (4, 3), 7)[0], rtol=0, atol=0)
    assert r1.shape == (100, 4) and r2.shape == (16, 3)
    # E[R R^T] = I: the variance is 1/a, so inner products are preserved on average
    big = projections(50, 4000, (2000, 2000), 0)[1]
    assert float((big @ big.T).diagonal().mean()) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("aggregate", ["sum", "mean_of_unit"])
def test_alignment_statistics(tied, batch, aggregate: str) -> None:
    val = make_batch(VAL_REWARDS, seed=2)
    feature = of.HeadFeature(None, 0, 4)
    g_v = [head_use_gradient(tied, val, v)[0] for v in range(3)]
    if aggregate == "mean_of_unit":
        g_v = [g / (g.norm() + 1e-5) for g in g_v]
    g_val = sum(g_v)
    got = of.feature_sum(tied, val, feature, aggregate, 2)
    torch.testing.assert_close(
        got[0].double(), g_val.double(), rtol=0, atol=1e-5 * float(g_val.norm())
    )
    direction = [(g_val / (g_val.norm() + 1e-5)).float()]
    seen = []
    al = of.distributed_feature_alignment(tied, batch, direction, feature, 2, True, seen.append)
    assert sum(seen) == 4
    grads = [head_use_gradient(tied, batch, p)[0] if p != 2 else None for p in range(4)]
    g_c = sum(g for g in grads if g is not None)
    unit_c = g_c / (g_c.norm() + 1e-5)
    for p, g in enumerate(grads):
        if g is None:
            assert al.norm[p] == al.dot_val[p] == al.dot_chunk[p] == 0
            continue
        assert al.norm[p] == pytest.approx(float(g.norm()), rel=1e-5)
        assert al.dot_val[p] == pytest.approx(float((g * direction[0]).sum()), rel=1e-4, abs=1e-9)
        assert al.dot_chunk[p] == pytest.approx(float((g * unit_c).sum()), rel=1e-4, abs=1e-9)


def test_a_head_that_is_not_plain_is_refused(tied, batch) -> None:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"], lora_dropout=0.0)
    wrapped = get_peft_model(copy.deepcopy(tied), cfg)
    with pytest.raises(ValueError, match="select.features=output: the model's logits are not"):
        features(wrapped, batch)
    plain = get_peft_model(copy.deepcopy(tied), LoraConfig(r=2, target_modules=["q_proj"]))
    got = features(plain, batch)  # LoRA elsewhere: the frozen head's gradient is scored
    want = features(tied, batch)
    for p in want:
        torch.testing.assert_close(got[p][0], want[p][0], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------ chunked token log-probabilities


def whole_logprobs(model, ids, mask) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("head_module", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_logprobs_equal_whole_tensor_ones(tied, batch, head_module, chunk) -> None:
    ids, mask = batch.input_ids, batch.attention_mask
    params = [p for p in tied.parameters()]
    want = whole_logprobs(tied, ids, mask)
    got = token_logprobs(tied, ids, mask, head_module=head_module, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    g_want = torch.autograd.grad((want * weights).sum(), params)
    g_got = torch.autograd.grad((got * weights).sum(), params)
    for a, b in zip(g_got, g_want):  # round-off of sums of many terms: relative to the largest
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_head_logprobs_with_a_bias_and_its_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(11, 6, generator=gen, requires_grad=True)
    w = torch.randn(13, 6, generator=gen, requires_grad=True)
    b = torch.randn(13, generator=gen, requires_grad=True)
    y = torch.randint(13, (11,), generator=gen)
    want = torch.log_softmax(h @ w.T + b, -1)[torch.arange(11), y]
    got = head_logprobs(h, w, b, y, chunk=4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits_logprobs(h @ w.T + b, y, 3), want, rtol=1e-6, atol=1e-6)
    g = torch.randn(11, generator=gen)
    for x, z in zip(
        torch.autograd.grad(got @ g, [h, w, b]), torch.autograd.grad(want @ g, [h, w, b])
    ):
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_split_head_and_uses_head(tied) -> None:
    body, head = split_head(tied)
    assert body is tied.model and head is tied.lm_head
    assert uses_head(tied, [tied.model.embed_tokens.weight])  # the tied weight
    assert not uses_head(tied, [tied.model.norm.weight])


# ------------------------------------------------------------ the config switch


def test_output_dims_parse() -> None:
    assert parse_output_dims("exact") is None
    assert parse_output_dims("64x128") == (64, 128)
    for bad in ("64", "0x3", "ax2", "64x", "64*128", "²x2"):
        with pytest.raises(ValueError):
            parse_output_dims(bad)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_dims": "64"}, "select.output_dims: '64': expected 'exact' or 'AxB'"),
        ({"output_dims": "8x8"}, "select.output_dims: '8x8' projects the output-layer feature; "
                                 "set select.features=output too"),
        ({"features": "output", "scorer": "exact"}, "select.scorer: 'exact' does not apply "
                                                    "with select.features=output"),
        ({"features": "output", "params": "last:1"}, "select.params: 'last:1' does not apply"),
        ({"features": "output", "precondition": "adam"}, "select.precondition: 'adam' does not"),
        ({"features": "output", "project_dim": 16}, "select.project_dim: 16 does not apply"),
        ({"features": "outputs"}, "select.features: 'outputs' is not one of full, output"),
    ],
)  # fmt: skip
def test_config_refusals(fields: dict, message: str) -> None:
    from gradalign.config_rules import check_select

    with pytest.raises(ConfigError) as err:
        check_select(SelectConfig(**fields))
    assert str(err.value).startswith(message)


def test_config_accepts_output_features_and_refuses_a_lora_head() -> None:
    from gradalign.config import load_config

    cfg = load_config(None, ["select.features=output", "select.output_dims=64x128"])
    assert (cfg.select.features, cfg.select.output_dims) == ("output", "64x128")
    lora = ["model.lora_r=4", "select.features=output", "model.lora_targets=q_proj,lm_head"]
    with pytest.raises(ConfigError, match="^model.lora_targets: select.features=output reads"):
        load_config(None, lora)
    assert load_config(None, lora[:2]).select.features == "output"


# ------------------------------------------------------------ the loop and diagnose


@pytest.mark.slow
def test_diagnose_and_a_lora_run_score_output_features(tmp_path) -> None:
    """`gradalign diagnose` and one round of `gradalign run` (LoRA: the frozen head's feature
    is scored) with select.features=output; exact and projected rank alike."""
    from gradalign_runs import SCORED
    from typer.testing import CliRunner

    from gradalign.cli import app
    from gradalign.storage import read_json

    runner = CliRunner()
    settings = [
        *SCORED,
        "data.regime=noisy",
        "rollout.k_r=8",
        "data.val_size=24",
        "seed=2",
        f"model.cache_dir={tmp_path / 'c'}",
    ]  # fmt: skip  (test_diagnose's setting: clean and coin-flip groups with reward variance)
    sets = [a for s in settings for a in ("--set", s)]
    got = {}
    for dims in ("exact", "64x64"):
        out = tmp_path / f"{dims}.json"
        ran = runner.invoke(
            app, ["diagnose", *sets, "--set", "select.features=output", "--set",
                  f"select.output_dims={dims}", "--chunks", "1", "--json", str(out)],
            terminal_width=200,
        )  # fmt: skip
        assert ran.exit_code == 0, ran.output
        got[dims] = read_json(out)
        for key in ("transfer_cos", "split_half_cos"):  # NaN is written as null
            assert got[dims][key][0] is not None and math.isfinite(got[dims][key][0]), key
    assert got["exact"]["cos_quantiles"]["q50"] != got["64x64"]["cos_quantiles"]["q50"]
    run_dir = tmp_path / "run"
    ran = runner.invoke(
        app, ["run", *sets, "--set", "select.features=output", "--set", "model.lora_r=4",
              "--set", "rounds=1", "--set", f"out_dir={run_dir}"],
        terminal_width=200,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    m = read_json(run_dir / "rounds" / "0001" / "metrics.json")
    assert math.isfinite(m["score/cos_mean"]) and m["score/val_norm"] == pytest.approx(1, abs=1e-3)


def test_a_model_without_a_plain_head_is_refused_when_the_run_starts(tied) -> None:
    from gradalign.config import load_config
    from gradalign.run.sources import check_scored_params

    cfg = load_config(None, ["select.features=output"])
    check_scored_params(cfg, tied)  # a Llama: its logits are lm_head(h)
    with pytest.raises(ConfigError, match="^select.features: 'output' needs logits that are a"):
        check_scored_params(cfg, nn.Sequential(nn.Linear(2, 2)))


def test_scoring_a_subset_freezes_the_rest_only_while_it_runs(tied, batch) -> None:
    from gradalign.core.alignment import exact_alignment
    from gradalign.engine.policy import scored_parameters
    from gradalign.scoring import fastscore

    model = copy.deepcopy(tied)
    params = scored_parameters(model, "last:1")
    seen = []
    with fastscore.grad_only_for(model, params):
        seen = [p.requires_grad for p in model.parameters()]
    assert sum(seen) == len(params) < len(seen)
    assert all(p.requires_grad for p in model.parameters())  # restored
    direction = torch.cat([torch.ones(p.numel(), dtype=torch.float64) for p in params])
    direction = direction / direction.norm()
    want = exact_alignment(model, params, batch, direction, chunk=False)
    got = fastscore.batched_alignment(model, params, batch, direction, 2, chunk=False)
    np.testing.assert_allclose(got.norm, want.norm, rtol=1e-4)
    assert all(p.requires_grad for p in model.parameters())
