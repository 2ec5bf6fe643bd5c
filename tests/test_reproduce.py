"""Presets, the grid runner (plan, skip, resume; with a stand-in engine), a miniature real grid."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from bigbatch import reproduce
from bigbatch.errors import ConfigError, DivergenceError
from bigbatch.report.grid import load_grid
from bigbatch.report.stats import arm_rows
from bigbatch.reproduce import ARM_SLUGS, arm_configs, list_presets, load_preset, run_grid
from bigbatch.reproduce import PAPER_ARMS as ARMS  # the five arms of every preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The paper's Table 1 (PAPER_TABLE.md), typed in independently of the preset files.
TABLE_1 = {
    "paper-f1-mnist": ("f1", "mnist", [99.23, 98.27, 99.11, 99.24, 99.24]),
    "paper-c1-cifar10": ("c1", "cifar10", [87.80, 83.95, 86.15, 86.4, 88.20]),
    "paper-resnet44-cifar10": ("resnet44", "cifar10", [92.83, 86.10, 89.30, 90.50, 93.07]),
    "paper-vgg-cifar10": ("vgg", "cifar10", [92.30, 84.1, 88.6, 91.50, 93.03]),
    "paper-c3-cifar100": ("c3", "cifar100", [61.25, 51.50, 57.38, 57.5, 63.20]),
    "paper-resnet44-cifar100": ("resnet44", "cifar100", None),  # no row in PAPER_TABLE.md
    "paper-wresnet16_4-cifar100": ("wresnet16_4", "cifar100", [73.70, 68.15, 69.05, 71.20, 73.57]),
    "paper-alexnet-imagenet": ("alexnet", "imagenet", [57.10, 41.23, 53.25, 54.92, 59.5]),
}

MINI_PRESET = """
name = "mini"
description = "a tiny grid for tests"
[base]
model = "f1"
model_options = { hidden = 16, depth = 2 }
dataset = "synthetic"
base_batch_size = 32
clip_grad_norm = 5.0
eval_batch_size = 512
[base.regime]
epochs = 2
phases = [{ epoch = 0, lr = 0.1, momentum = 0.9, weight_decay = 1e-4 }, { epoch = 1, lr = 0.01 }]
[grid]
seeds = [0, 1]
large_batch_size = 256
ghost_batch_size = 32
[paper]
"SB" = 99.0
"""


@pytest.fixture
def mini(tmp_path) -> Path:
    path = tmp_path / "mini.toml"
    path.write_text(MINI_PRESET)
    return path


def test_presets_cover_every_table_row_and_the_demo():
    assert set(list_presets()) == set(TABLE_1) | {"demo"}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_paper_presets_hold_the_papers_setting_and_numbers(name):
    model, dataset, numbers = TABLE_1[name]
    preset = load_preset(name)
    assert preset["name"] == name
    assert preset["base"]["model"] == model and preset["base"]["dataset"] == dataset
    assert "regime" not in preset["base"]  # the model registry's default regime
    assert preset["base"]["base_batch_size"] == 128
    assert preset["grid"]["large_batch_size"] == 4096
    assert preset["grid"]["ghost_batch_size"] == 128
    assert preset["grid"]["arms"] == list(ARMS)
    if numbers is None:
        assert not any(arm in preset["paper"] for arm in ARMS)
    else:
        assert [preset["paper"][arm] for arm in ARMS] == numbers
    configs = arm_configs(preset, seed=0)
    assert [configs[a].batch_size for a in ARMS] == [128, 4096, 4096, 4096, 4096]


def test_paper_numbers_carry_their_status_comment():
    text = (reproduce.PRESETS_DIR / "paper-c1-cifar10.toml").read_text()
    assert '"LB+LR+GBN" = 86.4  # (v)' in text and '"SB" = 87.8  # (r)' in text


def test_demo_preset_is_the_measured_grid():
    preset = load_preset("demo")
    base, grid = preset["base"], preset["grid"]
    assert (base["model"], base["dataset"], base["train_subset"]) == ("f1", "fashion-mnist", 16000)
    assert base["base_batch_size"] == 128 and base["clip"] == 5.0
    assert grid["large_batch_size"] == 4096 and grid["ghost_batch_size"] == 128
    assert grid["seeds"] == [0, 1, 2]
    regime = base["regime"]
    assert regime["epochs"] == 5
    assert [(p["epoch"], p["lr"]) for p in regime["phases"]] == [(0, 0.02), (3, 0.002), (4, 0.0002)]
    assert regime["phases"][0]["momentum"] == 0.9 and regime["phases"][0]["weight_decay"] == 1e-4
    # the evidence is a measurement, not a placeholder: it names the seeds' numbers and the machine
    assert "TO BE MEASURED" not in preset["evidence"]["text"]
    assert "3 seeds" in preset["evidence"]["text"] and "torch" in preset["evidence"]["text"]


def test_arms_add_one_measure_each():
    configs = arm_configs(load_preset("demo"), seed=2)
    sb, lb, lr, gbn, ra = (configs[a] for a in ARMS)
    assert (sb.batch_size, sb.lr_scaling, sb.ghost_batch_size, sb.regime_adaptation) == (
        128, "none", None, False,
    )  # fmt: skip
    assert (lb.batch_size, lb.lr_scaling, lb.ghost_batch_size) == (4096, "none", None)
    assert (lr.lr_scaling, lr.ghost_batch_size, lr.regime_adaptation) == ("sqrt", None, False)
    assert (gbn.lr_scaling, gbn.ghost_batch_size, gbn.regime_adaptation) == ("sqrt", 128, False)
    assert (ra.lr_scaling, ra.ghost_batch_size, ra.regime_adaptation) == ("sqrt", 128, True)
    assert {c.seed for c in configs.values()} == {2}
    assert all(c.regime == sb.regime and c.base_batch_size == 128 for c in configs.values())


def test_unknown_preset_lists_the_available_ones():
    match = r"unknown preset 'demoo'; did you mean 'demo'\?.*paper-f1"
    with pytest.raises(ConfigError, match=match):
        load_preset("demoo")
    with pytest.raises(ConfigError, match="not found"):
        load_preset("no/such/file.toml")


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('name = "mini"', 'colour = 1\nname = "mini"', r"unknown key 'colour' in the preset"),
        ("large_batch_size = 256", "large_batch_sise = 256", "did you mean"),
        ("base_batch_size = 32", "base_batch_sise = 32", r"did you mean 'base_batch_size'"),
        ("base_batch_size = 32", "base_batch_size = 32\nbatch_size = 64", "each arm sets itself"),
        ('"SB" = 99.0', '"SB" = 99.0\n"LB+RL" = 98.0', r"did you mean 'LB\+LR'"),
        ('"SB" = 99.0', '"SB" = 0.99e3', r"accuracy in %"),
        ("seeds = [0, 1]", "seeds = [0, 0]", "repeat"),
        ("seeds = [0, 1]", 'seeds = [0]\narms = ["SB", "LB+GBN"]', "unknown arm 'LB\\+GBN'"),
        ('model = "f1"', 'model = "f2"', "unknown model 'f2'"),
    ],
)
def test_invalid_presets_are_refused(mini, old, new, match):
    assert old in MINI_PRESET
    mini.write_text(MINI_PRESET.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match):
        load_preset(mini)


# ---------------------------------------------------------------------------------------------
# The runner's plan, skipping and resuming, with a stand-in for the engine (fast, no training)
# ---------------------------------------------------------------------------------------------


def _arm_of(config) -> str:
    if config.regime_adaptation:
        return "LB+LR+GBN+RA"
    if config.ghost_batch_size:
        return "LB+LR+GBN"
    if config.lr_scaling != "none":
        return "LB+LR"
    return "LB" if config.batch_size > config.base_batch_size else "SB"


class FakeEngine:
    """Records calls; writes a checkpoint, then a complete summary; can fail on chosen runs."""

    def __init__(self, interrupt_at=None, diverge=()):
        self.calls: list[tuple[str, int, bool]] = []
        self.interrupt_at, self.diverge = interrupt_at, set(diverge)

    def __call__(self, config, run_dir, *, resume):
        arm = _arm_of(config)
        self.calls.append((arm, config.seed, resume))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
        if (arm, config.seed) in self.diverge:
            (run_dir / "summary.json").write_text(json.dumps({"status": "diverged"}))
            raise DivergenceError("training diverged at update 3")
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        summary = {"status": "complete", "seed": config.seed, "updates": 10, "epochs": 2,
                   "final_val_error_pct": 10.0 + config.seed, "final_train_error_pct": 5.0,
                   "best_val_error_pct": 9.0, "wall_time_s": 1.0}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


def test_runs_seed_by_seed_and_resumes_an_interrupted_grid(mini, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    first = FakeEngine(interrupt_at=3)
    monkeypatch.setattr(reproduce, "_train", first)
    with pytest.raises(KeyboardInterrupt):
        run_grid(mini, out, progress="none")
    assert first.calls == [("SB", 0, False), ("LB", 0, False), ("LB+LR", 0, False)]
    second = FakeEngine()
    monkeypatch.setattr(reproduce, "_train", second)
    assert run_grid(mini, out, progress="none") == out
    # complete runs skipped, the interrupted one resumed, the rest started; all of seed 0 first
    resumed = [("LB+LR", 0, True), ("LB+LR+GBN", 0, False), ("LB+LR+GBN+RA", 0, False)]
    assert second.calls == resumed + [(a, 1, False) for a in ARMS]


def test_complete_grid_is_not_rerun(mini, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    engine = FakeEngine()
    monkeypatch.setattr(reproduce, "_train", engine)
    run_grid(mini, out, progress="none")
    order = [(a, s) for a, s, _ in engine.calls]
    assert order == [(a, s) for s in (0, 1) for a in ARMS]  # arm by arm within each seed
    engine.calls.clear()
    run_grid(mini, out, progress="none")
    assert engine.calls == []
    assert (out / "report.md").is_file() and (out / "report.html").is_file()


def test_a_diverged_run_is_reported_and_not_retried(mini, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    engine = FakeEngine(diverge={("LB+LR", 1)})
    monkeypatch.setattr(reproduce, "_train", engine)
    run_grid(mini, out, progress="none")
    assert len(engine.calls) == 10  # the grid went on after the divergence
    assert "LB+LR seed 1 (diverged)" in (out / "report.md").read_text()
    engine.calls.clear()
    run_grid(mini, out, progress="none")
    assert engine.calls == []


def test_grid_toml_records_the_resolved_preset_and_overrides(mini, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    engine = FakeEngine()
    monkeypatch.setattr(reproduce, "_train", engine)
    run_grid(mini, out, seeds=[3], arms=["LB", "SB"], device="cpu", progress="none",
             overrides={"epochs": 1.0, "ghost_batch_size": 64, "data_dir": None})  # fmt: skip
    assert engine.calls == [("SB", 3, False), ("LB", 3, False)]
    grid = tomllib.loads((out / "grid.toml").read_text())
    assert grid["name"] == "mini" and grid["base"]["epochs"] == 1.0
    assert grid["base"]["device"] == "cpu" and grid["grid"]["ghost_batch_size"] == 64
    assert grid["grid"]["seeds"] == [3] and grid["grid"]["arms"] == ["SB", "LB"]
    assert grid["overrides"] == {"epochs": 1.0, "ghost_batch_size": 64}
    assert grid["paper"]["SB"] == 99.0
    again = load_preset(out / "grid.toml")  # the record is itself a preset
    assert again["base"]["epochs"] == 1.0 and again["grid"]["seeds"] == [3]
    # a second call adds seeds to the same grid; a different setting is refused
    run_grid(mini, out, seeds=[4], arms=["SB", "LB"], progress="none",
             overrides={"epochs": 1.0, "ghost_batch_size": 64})  # fmt: skip
    assert tomllib.loads((out / "grid.toml").read_text())["grid"]["seeds"] == [3, 4]
    with pytest.raises(ConfigError, match=r"already holds a different grid.*epochs"):
        run_grid(mini, out, seeds=[4], arms=["SB"], overrides={"epochs": 2.0})


def test_bad_overrides_are_refused(mini, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train_subset'"):
        run_grid(mini, tmp_path / "g", overrides={"train_subsett": 100})
    with pytest.raises(ConfigError, match="set by each arm"):
        run_grid(mini, tmp_path / "g", overrides={"batch_size": 100})
    with pytest.raises(ConfigError, match="ghost_batch_size=512 is larger than batch_size=256"):
        run_grid(mini, tmp_path / "g", overrides={"ghost_batch_size": 512})


# ---------------------------------------------------------------------------------------------
# A miniature real grid through the engine
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """A 16-unit MLP gains nothing from two threads, and loses much when the cores are busy."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_miniature_real_grid_runs_reports_and_finishes_only_missing_runs(
    mini, tmp_path, monkeypatch, one_thread
):
    pytest.importorskip("bigbatch.train.loop", reason="the training engine has not landed")
    out = tmp_path / "grid"
    run_grid(mini, out, device="cpu", progress="none")
    grid = load_grid(out)
    assert not grid.missing_runs()
    rows = {r.arm: r for r in arm_rows(grid)}
    md = (out / "report.md").read_text()
    for arm in ARMS:
        summaries = [
            json.loads((out / ARM_SLUGS[arm] / f"seed{s}" / "summary.json").read_text())
            for s in (0, 1)
        ]
        values = [s["final_val_error_pct"] for s in summaries]
        mean = sum(values) / 2
        std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
        assert rows[arm].val_error_mean == pytest.approx(mean)
        assert rows[arm].val_error_std == pytest.approx(std)
        assert rows[arm].updates == summaries[0]["updates"]
        assert f"| {arm} | {mean:.2f} ± {std:.2f} |" in md
    assert rows["SB"].updates == 2 * 2048 / 32 and rows["LB"].updates == 2 * 2048 / 256
    assert rows["LB+LR+GBN+RA"].updates == rows["SB"].updates  # RA matches SB's updates
    assert (out / "report.html").stat().st_size > 10_000

    # Break the grid: one run loses its summary (resumed from its checkpoint), one is removed.
    (out / "lb_lr" / "seed1" / "summary.json").unlink()
    for path in sorted((out / "sb" / "seed0").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (out / "sb" / "seed0").rmdir()
    untouched = out / "lb" / "seed1" / "summary.json"
    before = untouched.stat().st_mtime_ns
    calls = []
    real = reproduce._train

    def counting(config, run_dir, *, resume):
        calls.append((_arm_of(config), config.seed, resume))
        return real(config, run_dir, resume=resume)

    monkeypatch.setattr(reproduce, "_train", counting)
    run_grid(mini, out, device="cpu", progress="none")
    assert calls == [("SB", 0, False), ("LB+LR", 1, True)]
    assert untouched.stat().st_mtime_ns == before
    assert not load_grid(out).missing_runs()


def test_module_docstring_example_is_true():
    import doctest

    result = doctest.testmod(reproduce, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


def test_cli_passes_data_dir_download_and_progress_to_every_run(mini, tmp_path, monkeypatch,
                                                                 capsys):
    from bigbatch.cli import main

    seen = []
    real = reproduce._train

    def recording(config, run_dir, *, resume):
        seen.append((config.data_dir, config.download, config.progress))
        return real(config, run_dir, resume=resume)

    monkeypatch.setattr(reproduce, "_train", recording)
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    code = main(["-q", "reproduce", "--preset", str(mini), "--out", str(tmp_path / "grid"),
                 "--seeds", "1", "--arms", "SB", "LB", "--device", "cpu",
                 "--data-dir", str(data_dir), "--no-download", "--progress", "none"])  # fmt: skip
    assert code == 0
    assert seen == [(str(data_dir), False, "none")] * 2
    assert f"grid: {tmp_path / 'grid'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# KEY=VALUE settings (what `reproduce --set` will pass)
# ---------------------------------------------------------------------------------------------


def test_settings_reach_the_right_table_and_every_arm(mini):
    preset = load_preset(mini)
    shaped = reproduce.apply_settings(preset, [
        "seeds=1", "arms=['SB', 'LB']", "ghost_batch_size=64", "lr_scaling=linear",
        "train_subset=100", "model_options.hidden=8", "regime.warmup_epochs=0.5",
    ])  # fmt: skip
    assert shaped["grid"]["seeds"] == [0] and shaped["grid"]["arms"] == ["SB", "LB"]
    assert shaped["grid"]["ghost_batch_size"] == 64 and shaped["grid"]["lr_scaling"] == "linear"
    assert shaped["base"]["model_options"] == {"hidden": 8, "depth": 2}  # one entry changed
    assert shaped["base"]["regime"]["warmup_epochs"] == 0.5
    assert shaped["base"]["regime"]["phases"] == preset["base"]["regime"]["phases"]
    configs = arm_configs(shaped, seed=0)
    assert [c.train_subset for c in configs.values()] == [100, 100]
    assert preset["base"].get("train_subset") is None  # the caller's preset is not changed


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("train_subsett=100", r"unknown override 'train_subsett'; did you mean 'train_subset'"),
        ("large_batch=512", r"did you mean 'large_batch_size'"),
        ("batch_size=100", "set by each arm"),
        ("epochs", r"must be KEY=VALUE \(e.g. epochs=1\), got 'epochs'"),
        ("seeds=", "must be KEY=VALUE"),
        ("lr_scaling=cubic", "lr_scaling must be 'sqrt' or 'linear'"),
        ("arms=['SB', 'XL']", "unknown arm 'XL'"),
        ("model.hidden=3", "'model' is not a table"),
    ],
)
def test_bad_settings_are_one_line_errors(mini, setting, match):
    with pytest.raises(ConfigError, match=match) as error:
        reproduce.apply_settings(load_preset(mini), [setting])
    assert "\n" not in str(error.value)
