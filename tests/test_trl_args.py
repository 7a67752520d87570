"""train.trl_args reaches TRL's GRPOConfig, checked against the installed TRL's fields;
train.temperature is TRL's training temperature; the TRL version check of the callback."""

from __future__ import annotations

import warnings

import pytest
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import ConfigError, TrainConfig, load_config
from gradalign.engine.trl_args import (
    DECIDED_BY_GRADALIGN,
    SET_BY_GRADALIGN,
    TRL_DEFAULTS,
    check_grpo_config,
    check_trl_args,
    grpo_settings,
)
from gradalign.integrations.trl_version import TESTED_TRL, TRLVersionWarning, check_trl


def train(*overrides: str) -> TrainConfig:
    return load_config(None, list(overrides)).train


def test_set_reaches_trl_args_with_yaml_values():
    t = train("train.trl_args.epsilon=0.3", "train.trl_args.num_iterations=2")
    assert t.trl_args == {"epsilon": 0.3, "num_iterations": 2}
    check_trl_args(t)


def test_one_list_of_the_fields_gradalign_sets():
    """grpo_settings passes exactly SET_BY_GRADALIGN's fields (plus the overridable
    TRL_DEFAULTS), and every one of them is refused in train.trl_args."""
    own = grpo_settings(TrainConfig(), 12, 0, "cpu", False, "/tmp/unused")
    assert set(own) == set(SET_BY_GRADALIGN) | set(TRL_DEFAULTS)
    assert set(SET_BY_GRADALIGN) < set(DECIDED_BY_GRADALIGN)
    assert not set(TRL_DEFAULTS) & set(DECIDED_BY_GRADALIGN)


def test_a_field_gradalign_sets_is_refused_naming_the_field_to_use():
    with pytest.raises(ConfigError) as err:
        check_trl_args(train("train.trl_args.learning_rate=1e-3"))
    assert str(err.value) == (
        "train.trl_args.learning_rate: gradalign sets this GRPOConfig field itself; "
        "use train.learning_rate"
    )
    with pytest.raises(ConfigError, match=r"^train.trl_args.temperature: .*use train.temperature$"):
        check_trl_args(train("train.trl_args.temperature=0.7"))


def test_an_unknown_name_is_refused_with_the_close_ones():
    import trl

    with pytest.raises(ConfigError) as err:
        check_trl_args(train("train.trl_args.epsilom=0.3"))
    msg = str(err.value)
    assert msg.startswith(
        f"train.trl_args.epsilom: not a field of GRPOConfig in the installed TRL {trl.__version__}"
        "; did you mean epsilon"
    )


def test_a_value_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigError) as err:
        check_trl_args(train("train.trl_args.epsilon=wide"))
    assert str(err.value) == "train.trl_args.epsilon: expected float, got 'wide'"
    with pytest.raises(ConfigError) as err:
        check_trl_args(train("train.trl_args.num_iterations=1.5"))
    assert str(err.value) == "train.trl_args.num_iterations: expected int, got 1.5"


def test_a_value_grpoconfig_refuses_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        check_grpo_config(train("train.trl_args.lr_scheduler_type=sideways"), 8, 0, "cpu")
    msg = str(err.value)
    assert msg.startswith(
        "train.trl_args (lr_scheduler_type='sideways'): GRPOConfig refuses this configuration: "
    )
    assert "sideways" in msg.split("refuses this configuration: ")[1]


def test_run_refuses_bad_trl_args_before_loading_a_model(tmp_path):
    res = CliRunner().invoke(
        app,
        ["run", "--set", f"out_dir={tmp_path / 'run'}", "--set", "train.trl_args.max_steps=3"],
    )
    assert res.exit_code == 2
    assert " ".join(res.output.split()) == (
        "config error: train.trl_args.max_steps: gradalign sets this GRPOConfig field itself; "
        "use train.steps_per_round (and rounds)"
    )
    assert not (tmp_path / "run" / "problems.jsonl").exists()


def test_temperature_must_be_positive():
    with pytest.raises(ConfigError, match=r"^train.temperature: must be > 0, got 0.0$"):
        train("train.temperature=0")


def _trainer(t: TrainConfig, total_steps: int = 1):
    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.engine.training import GRPOTraining

    tok = build_tokenizer()
    return GRPOTraining(build_model(tok, "tiny"), tok, t, 4, 0, total_steps=total_steps)


def test_trl_args_and_temperature_reach_the_trainer():
    t = train(
        "train.batch_size=2",
        "train.num_generations=2",
        "train.temperature=0.7",
        "train.trl_args.epsilon=0.3",
        "train.trl_args.num_iterations=2",
    )
    trainer = _trainer(t)
    args = trainer.trainer.args
    assert (args.epsilon, args.num_iterations, args.temperature) == (0.3, 2, 0.7)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-5, 0.01, (0.9, 0.999))
    for _ in range(3):  # the default schedule is constant
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert trainer.scheduler.get_last_lr() == [2e-5]
    trainer.close()


def test_a_warmup_and_schedule_run_over_the_whole_run():
    t = train(
        "train.batch_size=2",
        "train.num_generations=2",
        "train.learning_rate=1e-3",
        "train.trl_args.warmup_steps=2",
        "train.trl_args.lr_scheduler_type=linear",
        "train.trl_args.weight_decay=0.0",
    )
    trainer = _trainer(t, total_steps=10)
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.0
    lrs = []
    for _ in range(10):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    expected = [0.0, 5e-4] + [1e-3 * (10 - s) / 8 for s in range(2, 10)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    trainer.close()


class _Hooked:
    def _get_train_sampler(self, dataset=None):
        return None


class _Unhooked:
    pass


def test_callback_trl_check_warns_outside_the_tested_range_and_refuses_without_hook():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trl(_Hooked(), TESTED_TRL[0])
        check_trl(_Hooked(), TESTED_TRL[1])
        check_trl(_Hooked(), "1.5.1")
    with pytest.warns(TRLVersionWarning) as caught:
        check_trl(_Hooked(), "1.17.0")
    assert str(caught[0].message) == (
        f"GradAlignCallback is tested on TRL {TESTED_TRL[0]} to {TESTED_TRL[1]}, not 1.17.0: it "
        "overrides GRPOTrainer._get_train_sampler, a private method TRL may change; if the "
        f"selection does not show in training, install trl>={TESTED_TRL[0]},<={TESTED_TRL[1]} "
        "(or run gradalign's tests/test_callback.py against this TRL)"
    )
    with pytest.warns(TRLVersionWarning):
        check_trl(_Hooked(), "0.29.1")
    with pytest.raises(ValueError) as err:
        check_trl(_Unhooked(), "2.0.0")
    assert str(err.value) == (
        "GradAlignCallback: TRL 2.0.0's GRPOTrainer has no _get_train_sampler(dataset) to "
        f"install the round sampler through; install trl>={TESTED_TRL[0]},<={TESTED_TRL[1]}"
    )


def test_warmup_ratio_works_on_either_transformers():
    t = train(
        "train.batch_size=2",
        "train.num_generations=2",
        "train.learning_rate=1e-3",
        "train.trl_args.warmup_ratio=0.2",
    )
    check_grpo_config(t, 4, 0, "cpu")
    trainer = _trainer(t, total_steps=10)  # 2 warm-up steps, then constant
    args = trainer.trainer.args
    assert getattr(args, "warmup_ratio", None) == 0.2 or args.warmup_steps == 0.2
    lrs = []
    for _ in range(4):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 1e-3], rel=1e-12, abs=1e-15)
    trainer.close()
    with pytest.raises(ConfigError) as err:
        check_grpo_config(train("train.trl_args.warmup_ratio=3"), 4, 0, "cpu")
    from gradalign.engine.trl_args import grpo_fields

    if "warmup_ratio" in grpo_fields():  # transformers 4: GRPOConfig's own check
        assert str(err.value).startswith("train.trl_args (warmup_ratio=3): GRPOConfig refuses")
    else:
        assert str(err.value) == "train.trl_args.warmup_ratio: expected a ratio in [0, 1), got 3"


def test_lora_and_a_trainer_raise_no_library_warnings():
    """peft's and TRL's calls into deprecated transformers API are silenced where they are
    made (`policy.quiet_libraries`), without a global filter: a user's warning still shows."""
    from gradalign.engine.policy import apply_lora, build_model, build_tokenizer, quiet_libraries

    tok = build_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(build_model(tok, "tiny"), 4, 8, ["q_proj", "v_proj"])
        _trainer(train("train.batch_size=2", "train.num_generations=2")).close()
        with quiet_libraries():
            warnings.warn("the user's own", FutureWarning, stacklevel=1)
    assert model.peft_config["default"].r == 4
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == [
        "the user's own"
    ]
