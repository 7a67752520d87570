"""`gradalign diagnose`: the summary of hand-made chunks, every verdict, and the command on a
small built-in setting, where its first chunk must agree with a run's first round."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradalign_runs import SCORED
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import load_config
from gradalign.run.diagnose import summarise, verdict
from gradalign.storage import read_json

runner = CliRunner()


def chunk(cos, eligible, labels, split, transfer):
    return {
        "cos": np.array(cos, dtype=float),
        "eligible": np.array(eligible, dtype=bool),
        "sources": ["addition" if i % 2 == 0 else "countdown" for i in range(len(cos))],
        "labels": labels,
        "split_half_cos": split,
        "transfer_cos": transfer,
    }


def test_summarise_pools_the_chunks() -> None:
    a = chunk(
        [0.9, -0.5, 0.2, 0.7], [1, 1, 0, 1], ["clean", "coinflip", "clean", "coinflip"], 0.5, 0.8
    )
    b = chunk(
        [0.1, 0.4, -0.2, 0.6], [1, 1, 1, 1], ["coinflip", "clean", "coinflip", "clean"], 0.3, 0.6
    )
    d = summarise([a, b], load_config(None, []), 2)
    # eligible: a 0.9 c, -0.5 f, 0.7 f ; b 0.1 f, 0.4 c, -0.2 f, 0.6 c  (c clean, f coinflip)
    assert d["candidates"] == 8 and d["chunks"] == 2
    assert d["zero_variance_share"] == pytest.approx(1 / 8)
    assert d["cos_quantiles"]["q0"] == -0.5 and d["cos_quantiles"]["q100"] == 0.9
    assert d["cos_quantiles"]["q50"] == pytest.approx(0.4)
    assert d["cos_positive_share"] == pytest.approx(5 / 7)
    assert d["cos_by_label"] == pytest.approx(
        {"clean": (0.9 + 0.4 + 0.6) / 3, "coinflip": (-0.5 + 0.7 + 0.1 - 0.2) / 4}
    )
    assert d["cos_by_source"] == pytest.approx(
        {"addition": (0.9 + 0.1 - 0.2) / 3, "countdown": (-0.5 + 0.7 + 0.4 + 0.6) / 4}
    )
    # chunk a: clean {0.9} vs coinflip {-0.5, 0.7}: 2/2; chunk b: {0.4, 0.6} vs {0.1, -0.2}: 4/4
    assert d["auc_clean_per_chunk"] == [1.0, 1.0]
    # pooled: clean {0.9, 0.4, 0.6} vs coinflip {-0.5, 0.7, 0.1, -0.2}: 0.4 and 0.6 lose to 0.7
    assert d["auc_clean"] == pytest.approx(10 / 12)
    assert d["split_half_cos"] == [0.5, 0.3] and d["transfer_cos"] == [0.8, 0.6]
    assert (
        d["verdict"] == "yes: the GradAlign score ranks clean above corrupted problems (AUC 0.83)"
    )


def test_unlabelled_data_has_no_auc() -> None:
    a = chunk([0.9, -0.5, 0.2], [1, 1, 1], ["clean"] * 3, 0.5, 0.8)
    d = summarise([a], load_config(None, []), 1)
    assert d["auc_clean"] is None and d["auc_clean_per_chunk"] == [] and d["cos_by_label"] == {}
    assert d["verdict"].startswith("likely: the validation halves agree (split-half cosine +0.50)")


BASE = {"zero_variance_share": 0.2, "auc_clean": None, "k_r": 8}


@pytest.mark.parametrize(
    ("measures", "start"),
    [
        ({"zero_variance_share": 0.95, "split_half_cos": [0.5], "transfer_cos": [0.9]},
         "no: 95% of the candidates got the same reward in all 8 rollouts"),
        ({"split_half_cos": [-0.3, 0.1], "transfer_cos": [0.9]},
         "no: the two halves of the validation set pull in opposite directions (split-half cosine -0.10)"),
        ({"split_half_cos": [math.nan], "transfer_cos": [0.9]},
         "no: the validation rollouts give no direction"),
        ({"split_half_cos": [math.nan, -0.2], "transfer_cos": [0.9]},
         "no: the two halves of the validation set pull in opposite directions (split-half cosine -0.20)"),
        ({"split_half_cos": [0.5], "transfer_cos": [-0.14]},
         "unlikely: different problems' gradients barely share a direction (transfer cosine -0.14 < 0.3)"),
        ({"split_half_cos": [0.5], "transfer_cos": [-0.14], "auc_clean": 0.8},
         "yes: the GradAlign score ranks clean above corrupted problems (AUC 0.80)"),
        ({"split_half_cos": [0.5], "transfer_cos": [0.9], "auc_clean": 0.65},
         "weak: the GradAlign score separates clean from corrupted only partly (AUC 0.65)"),
        ({"split_half_cos": [0.5], "transfer_cos": [0.9], "auc_clean": 0.52},
         "no: the GradAlign score does not separate clean from corrupted (AUC 0.52)"),
        ({"split_half_cos": [0.1], "transfer_cos": [0.9]},
         "weak: the validation halves agree only a little (split-half cosine +0.10 < 0.2)"),
    ],
)  # fmt: skip
def test_verdicts(measures: dict, start: str) -> None:
    assert verdict(BASE | measures).startswith(start)


@pytest.mark.slow
def test_diagnose_agrees_with_the_first_round_of_a_run(tmp_path) -> None:
    """Its first chunk is the run's round 0 chunk, scored by the same path with the same seeds:
    the same split-half cosine and AUC; a config whose mode has no score is diagnosed with sim."""
    settings = [
        *SCORED,
        "data.regime=noisy",
        "rollout.k_r=8",
        "data.val_size=24",
        "seed=2",
        f"model.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip  (a first chunk with clean and coin-flip groups with reward variance)
    sets = [a for s in settings for a in ("--set", s)]
    got = runner.invoke(
        app, ["diagnose", *sets, "--set", "select.mode=rand", "--chunks", "2",
              "--json", str(tmp_path / "d.json")],
        terminal_width=200,
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    assert "split-half validation cosine" in got.output and "verdict: " in got.output
    assert "AUC clean above corrupted" in got.output
    warned = "warning: chunk 1: split-half validation cosine "
    assert warned in got.output  # this setting's halves disagree: a real cosine, and < 0
    d = read_json(tmp_path / "d.json")
    assert d["chunks"] == 2 and d["candidates"] == 32 and len(d["split_half_cos"]) == 2
    assert set(d["cos_by_label"]) == {"clean", "coinflip"}
    ran = runner.invoke(
        app, ["run", *sets, "--set", "rounds=1", "--set", f"out_dir={tmp_path / 'run'}"],
        terminal_width=200,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    m = read_json(tmp_path / "run" / "rounds" / "0001" / "metrics.json")
    assert d["split_half_cos"][0] == pytest.approx(m["val/split_half_cos"], abs=1e-9)
    assert d["auc_clean_per_chunk"][0] == pytest.approx(m["select/auc_clean"], abs=1e-9)
    assert d["split_half_cos"][0] < 0 and 0 < d["auc_clean_per_chunk"][0] < 1
    assert "warning: round 1: split-half validation cosine " in ran.output


def test_diagnose_refuses_a_bad_config_in_one_line() -> None:
    got = runner.invoke(app, ["diagnose", "--set", "select.mode=best"], terminal_width=200)
    assert got.exit_code == 2
    assert "config error: select.mode: 'best' is not one of" in got.output
    assert "Traceback" not in got.output
