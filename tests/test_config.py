"""config: typed loading, overrides and invariants; every error names its field."""

from __future__ import annotations

import pytest
import yaml

from gradalign.config import Config, ConfigError, apply_overrides, check, field_docs, load_config


def test_defaults_load_and_pass_the_checks():
    cfg = load_config()
    assert cfg == Config()
    check(cfg)
    assert cfg.n_select == 64 // 4


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["select.bogus=1"], "select.bogus: unknown field"),
        (["train.lr=0.1"], "train.lr: unknown field"),
        (["bogus=1"], "bogus: unknown field"),
        (["train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
        (["train.batch_size=2.5"], "train.batch_size: expected int, got 2.5"),
        (["train.learning_rate=fast"], "train.learning_rate: expected float"),
        (["select.scale_advantages=maybe"], "select.scale_advantages: expected true or false"),
        (["model.name=[a, b]"], "model.name: expected a string"),
        (["data.families=3"], "data.families: expected a list"),
        (["select.mode=best"], "select.mode: 'best' is not one of sim, dot"),
        (["select.zero_variance=drop"], "select.zero_variance: 'drop' is not one of zero"),
        (["train.loss_type=ppo"], "train.loss_type: 'ppo' is not one of"),
        (["select.k=100"], "select.k (100) leaves 0 problems from chunk_size 64"),
        (["train.batch_size=17"], "train.batch_size (17) exceeds the 16 problems"),
        (["rollout.k_r=1"], "rollout.k_r: needs >= 2"),
        (["rollout.k_v=1"], "rollout.k_v: needs >= 2"),
        (["train.num_generations=1"], "train.num_generations: needs >= 2"),
        (["train.learning_rate=-0.001"], "train.learning_rate: must be > 0, got -0.001"),
        (["train.learning_rate=-1e-5"], "train.learning_rate: must be > 0, got -1e-05"),
        (["train.beta=-0.1"], "train.beta: must be >= 0"),
        (["rounds=0"], "rounds: must be > 0"),
        (["select.chunk_size=2000"], "select.chunk_size (2000) exceeds data.pool_size (1024)"),
        (["rollout.top_p=1.5"], "rollout.top_p: must be in (0, 1]"),
        (["select.params=first:2"], "select.params: expected 'all', 'lora' or 'last:N'"),
        (["data.families=[addition, sudoku]"], "data.families: unknown family 'sudoku'"),
        (["data.families=[]"], "data.families: give at least one"),
        (
            ["data.families=[addition_steps]"],
            "rollout.max_new_tokens: 12 tokens cut the answers of family 'addition_steps' "
            "(up to 19 tokens plus EOS); set rollout.max_new_tokens >= 20",
        ),
        (
            ["data.families=[addition]", "rollout.max_new_tokens=3"],
            "rollout.max_new_tokens: 3 tokens cut the answers of family 'addition' (up to 3 "
            "tokens plus EOS); set rollout.max_new_tokens >= 4",
        ),
        (["select.mode"], "expected FIELD=VALUE"),
        (
            ["model.warmstart_family_flaws=[addition:typo]"],
            "model.warmstart_family_flaws: 'addition:typo': unknown flaw 'typo'",
        ),
        (
            ["model.warmstart_family_flaws=[countdwn2:junk2]"],
            "model.warmstart_family_flaws: 'countdwn2:junk2': unknown family 'countdwn2' (known: ",
        ),
        (
            ["model.warmstart_family_flaws=[addition:lead:2]"],
            "model.warmstart_family_flaws: 'addition:lead:2': the share 2 is not in [0, 1]",
        ),
    ],
)
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert field in str(err.value)


def test_the_old_recipe_needs_no_family_flaws_cleared():
    """The default's countdown2 flaw is unused when data.families leaves countdown2 out."""
    cfg = load_config(overrides=["data.families=[addition,countdown]", "data.minority=countdown"])
    assert cfg.model.warmstart_family_flaws == ["countdown2:junk2:0.6"]
    assert cfg.data.families == ["addition", "countdown"]


def test_batch_size_limit_is_the_pool_in_mode_none():
    cfg = load_config(overrides=["select.mode=none", "train.batch_size=17"])
    assert cfg.train.batch_size == 17  # 'none' trains on the whole pool (1024)


def test_unknown_field_in_a_yaml_section(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("select:\n  mode: dot\n  chunk: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"select\.chunk: unknown field"):
        load_config(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("select: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "invalid YAML" in str(err.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- select\n- train\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_overrides_parse_scalars_and_lists():
    data = apply_overrides(
        {"select": {"mode": "dot"}},
        [
            "select.k=8",
            "train.learning_rate=0.001",
            "select.scale_advantages=true",
            "data.families=[addition, countdown]",
            "model.name=builtin:small",
            "out_dir=",
        ],
    )
    assert data == {
        "select": {"mode": "dot", "k": 8, "scale_advantages": True},
        "train": {"learning_rate": 0.001},
        "data": {"families": ["addition", "countdown"]},
        "model": {"name": "builtin:small"},
        "out_dir": "",
    }


def test_overrides_coerce_to_the_field_types():
    cfg = load_config(
        overrides=[
            "select.k=8",
            "select.chunk_size=32.0",
            "train.learning_rate=1e-5",
            "train.max_grad_norm=2",
            "select.scale_advantages=false",
            "data.seed=3",
            "data.families=addition",
            "rollout.temperature=0.7",
            "model.name=123",
            "train.batch_size=4",
        ]
    )
    assert cfg.select.k == 8 and type(cfg.select.k) is int
    assert cfg.select.chunk_size == 32 and type(cfg.select.chunk_size) is int
    assert cfg.train.learning_rate == 1e-5 and type(cfg.train.learning_rate) is float
    assert cfg.train.max_grad_norm == 2.0 and type(cfg.train.max_grad_norm) is float
    assert cfg.select.scale_advantages is False
    assert cfg.data.seed == 3
    assert cfg.data.families == ["addition"]
    assert cfg.rollout.temperature == 0.7
    assert cfg.model.name == "123"
    assert cfg.n_select == 4


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("select:\n  mode: dot\n  k: 2\ntrain:\n  learning_rate: 1e-5\n")
    cfg = load_config(path, ["select.k=8"])
    assert (cfg.select.mode, cfg.select.k, cfg.train.learning_rate) == ("dot", 8, 1e-5)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        overrides=[
            "rounds=3",
            "select.mode=simacc",
            "select.zero_variance=exclude",
            "select.k=2",
            "train.learning_rate=3e-6",
            "train.batch_size=4",
            "data.families=[countdown]",
            "select.params=last:1",
            "select.scale_advantages=true",
            "model.device=cuda:1",
        ]
    )
    assert cfg != Config()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    assert load_config(path) == cfg


def test_family_flaws_accepted_for_listed_families():
    cfg = load_config(
        overrides=[
            "data.families=[addition, countdown2]",
            "model.warmstart_family_flaws=[addition:lastdigit:0.4, countdown2:lead]",
        ]
    )
    assert cfg.model.warmstart_family_flaws == ["addition:lastdigit:0.4", "countdown2:lead"]


def test_batch_over_the_pool_with_mode_none_names_the_pool():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            [
                "select.mode=none",
                "data.pool_size=48",
                "select.chunk_size=16",
                "train.batch_size=64",
            ],
        )
    assert str(err.value) == (
        "train.batch_size (64) exceeds the 48 problems trained on per round (data.pool_size "
        "with select.mode=none); lower batch_size or grow the pool"
    )


def test_fields_prints_the_choices_of_a_literal_field():
    docs = {name: help_ for name, _, help_ in field_docs()}
    assert docs["select.scorer"].endswith("(one of: batched, exact)")
    assert docs["select.zero_variance"].endswith("(one of: zero, last, exclude)")
    assert "one of" not in docs["select.k"]
