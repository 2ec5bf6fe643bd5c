"""The opt-in arms LB+GBN+AS, LB+LARS, LB+LAMB in a miniature `reproduce`, its report's noise-scale
section and figure, and `bigbatch advise`."""

from __future__ import annotations

import json

import pytest
import tomli_w

from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.reproduce import (
    PAPER_ARMS,
    _check_same_grid,
    apply_settings,
    arm_configs,
    load_preset,
    preset_differences,
    run_grid,
)

MINI = """
name = "mini-noise"
[base]
model = "f1"
model_options = { hidden = 16, depth = 2 }
dataset = "synthetic"
train_subset = 1024
base_batch_size = 32
eval_batch_size = 512
log_diffusion = false
[base.regime]
epochs = 2
phases = [{ epoch = 0, lr = 0.1, momentum = 0.9, weight_decay = 1e-4 }, { epoch = 1, lr = 0.01 }]
[grid]
seeds = [0]
large_batch_size = 256
ghost_batch_size = 16
arms = ["SB", "LB+LR+GBN+RA", "LB+GBN+AS", "LB+LARS", "LB+LAMB"]
"""


@pytest.mark.parametrize(
    ("old_grid", "refused"),
    [
        ({"arms": list(PAPER_ARMS)}, False),  # never ran LB+LAMB: nothing to contradict
        ({"arms": ["LB+LAMB"]}, True),  # ran it at the default 0.01, the demo now says 0.02
        ({"arms": ["LB+LAMB"], "lamb_lr": 0.02}, False),
        ({"arms": ["LB+LARS"]}, False),  # the default 2.0 is what the demo sets
    ],
)
def test_a_grid_directory_refuses_only_peak_lrs_its_runs_used(tmp_path, old_grid, refused):
    demo = load_preset("demo")
    old = {**demo, "grid": {**{k: v for k, v in demo["grid"].items()
                               if k not in ("lars_lr", "lamb_lr")}, **old_grid}}  # fmt: skip
    (tmp_path / "grid.toml").write_text(tomli_w.dumps(old))
    if refused:
        with pytest.raises(ConfigError, match=r"\[grid\] lamb_lr: 0.01 -> 0.02"):
            _check_same_grid(tmp_path, demo)
    else:
        assert _check_same_grid(tmp_path, demo) is not None


def test_peak_lrs_of_arms_a_grid_did_not_run_are_no_difference_from_the_preset():
    demo = load_preset("demo")
    before_tuning = {k: v for k, v in demo["grid"].items() if k not in ("lars_lr", "lamb_lr")}
    assert preset_differences(demo, {**demo, "grid": before_tuning}) == []  # an older make demo
    with_lamb = {**before_tuning, "arms": [*PAPER_ARMS, "LB+LAMB"]}
    assert preset_differences(demo, {**demo, "grid": with_lamb}) == [
        "[grid] arms: [SB, LB, LB+LR, LB+LR+GBN, LB+LR+GBN+RA] -> "
        "[SB, LB, LB+LR, LB+LR+GBN, LB+LR+GBN+RA, LB+LAMB]",
        "[grid] lamb_lr: 0.02 -> 0.01"]  # fmt: skip


def test_the_new_arms_are_opt_in_and_documented():
    assert load_preset("demo")["grid"]["arms"] == list(PAPER_ARMS)  # make demo's five arms
    demo = apply_settings(load_preset("demo"), ['arms=["LB+GBN+AS", "LB+LARS", "LB+LAMB"]'])
    configs = arm_configs(demo, seed=0)
    ada = configs["LB+GBN+AS"]
    assert (ada.lr_scaling, ada.noise_scale, ada.ghost_batch_size) == ("adascale", True, 128)
    assert ada.micro_batch_size == 128 and ada.batch_size == 4096  # micro-batches of B0
    lars, lamb = configs["LB+LARS"].regime, configs["LB+LAMB"].regime
    assert lars["optimizer"] == "LARS" and [p["lr"] for p in lars["phases"]] == \
        pytest.approx([2.0, 0.2, 0.02])  # the documented lr, the regime's drops kept
    assert lamb["optimizer"] == "LAMB" and "momentum" not in lamb["phases"][0]
    assert lamb["phases"][0]["lr"] == 0.02  # the demo's own (tuned) peak lr; the default is 0.01
    with pytest.raises(ConfigError, match="lars_lr must be a number > 0"):
        apply_settings(load_preset("demo"), ["lars_lr=-1"])


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    preset = tmp_path_factory.mktemp("preset") / "mini.toml"
    preset.write_text(MINI)
    return run_grid(preset, tmp_path_factory.mktemp("grid") / "out", progress="none")


def _summary(grid_dir, slug):
    return json.loads((grid_dir / slug / "seed0" / "summary.json").read_text())


def test_a_miniature_grid_runs_the_new_arms(grid_dir):
    sb, ra, ada = (_summary(grid_dir, s) for s in ("sb", "lb_lr_gbn_ra", "lb_gbn_as"))
    assert all(_summary(grid_dir, s)["status"] == "complete" for s in ("lb_lars", "lb_lamb"))
    assert ra["updates"] == sb["updates"] == 64
    assert ada["adascale_total_tau"] == 64 and ada["updates"] <= 64
    assert ada["adascale_tau"] >= 64


def test_the_report_shows_adascale_beside_ra_and_the_b_simple_figure(grid_dir):
    report = (grid_dir / "report.md").read_text()
    section = report.split("## Gradient noise scale and AdaScale", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines()
            if line.startswith("| LB")}
    assert set(rows) == {"LB+LR+GBN+RA", "LB+GBN+AS"}
    ada = _summary(grid_dir, "lb_gbn_as")
    assert f"| {ada['updates']} |" in rows["LB+GBN+AS"]
    assert "AdaScale gain at B = 256 over B0 = 32" in section  # the advice lines
    assert (grid_dir / "figures" / "b_simple_updates.png").stat().st_size > 1000
    assert "figures/b_simple_updates.png" in report
    assert "b_simple_updates.png" not in (grid_dir / "report.html").read_text()  # embedded
    assert "data:image/png;base64" in (grid_dir / "report.html").read_text()


def test_advise_prints_the_advice_of_a_measured_run(grid_dir, capsys):
    assert main(["advise", str(grid_dir / "lb_gbn_as" / "seed0")]) == 0
    out = capsys.readouterr().out
    assert "critical batch B_crit" in out and "AdaScale gain at B = 256 over B0 = 32" in out
    assert main(["advise", str(grid_dir / "sb" / "seed0")]) == 2
    assert "no B_simple measurement" in capsys.readouterr().err
    assert main(["advise", str(grid_dir / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
