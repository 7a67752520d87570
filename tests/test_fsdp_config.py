"""``train.fsdp``: what it is refused with (one line naming the field), the GRPOConfig fields
it sets, and the refusal of a launch without a process group or on CPU."""

from __future__ import annotations

import pytest

from gradalign.config import ConfigError, load_config
from gradalign.engine.trl_args import (
    FSDP2_SETTINGS,
    build_grpo_config,
    check_trl_args,
    grpo_settings,
)
from gradalign.run import sharded_state
from gradalign.run.loop import run as gradalign_run

GPU = ["train.fsdp=true", "model.device=cuda"]


def test_fsdp_on_a_gpu_config_loads_and_sets_trls_fsdp_v2():
    cfg = load_config(overrides=GPU)
    assert cfg.train.fsdp
    own = grpo_settings(cfg.train, 12, 0, "cuda", True, "/nonexistent")
    assert own["fsdp"] is True and own["fsdp_config"]["version"] == 2
    assert own["fsdp_config"]["reshard_after_forward"] is True
    assert FSDP2_SETTINGS["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert "fsdp" not in grpo_settings(load_config().train, 12, 0, "cpu", False, "/nonexistent")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.lora_r=8"], "train.fsdp: not with LoRA (model.lora_r > 0)"),
        (["select.scorer=exact"], "train.fsdp: select.scorer=exact needs the whole flat"),
        (["rollout.backend=vllm"], "train.fsdp: rollout.backend=vllm loads the whole policy"),
        (["select.features=output"], "train.fsdp: select.features=output reads the whole LM"),
    ],
)
def test_fsdp_refused_with(extra: list[str], message: str):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*GPU, *extra])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_trl_args_fsdp_is_refused_naming_train_fsdp():
    cfg = load_config()
    cfg.train.trl_args = {"fsdp_config": {"version": 2}}
    with pytest.raises(ConfigError, match=r"^train.trl_args.fsdp_config: .*use train.fsdp$"):
        check_trl_args(cfg.train)


def test_trls_grpoconfig_takes_the_fsdp2_settings():
    """The installed TRL/transformers turn them into accelerate's FSDP v2 plugin arguments."""
    cfg = load_config(overrides=GPU)
    own = grpo_settings(cfg.train, 12, 0, "cuda", False, "/nonexistent") | {"use_cpu": True}
    args = build_grpo_config(cfg.train, own)
    assert args.fsdp is True
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    }  # fmt: skip


def test_a_run_on_cpu_is_refused_in_one_line():
    """`gradalign run` refuses train.fsdp on CPU before it writes anything (`gradalign score`
    shards on CPU: `test_fsdp.py`)."""
    cfg = load_config(overrides=["train.fsdp=true", "model.device=cpu"])
    with pytest.raises(ConfigError) as err:
        gradalign_run(cfg)
    assert str(err.value).startswith("train.fsdp: accelerate runs FSDP only on GPUs")


def test_shard_policy_needs_a_launcher():
    with pytest.raises(ConfigError) as err:
        sharded_state.shard_policy(None, "cuda")  # type: ignore[arg-type]
    assert str(err.value) == (
        "train.fsdp: needs a launcher with a process group: "
        "accelerate launch --num_processes R -m gradalign.cli run CONFIG"
    )
