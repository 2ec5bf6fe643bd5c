"""Runs as a user continues them: nothing left by a failed validation, `--resume --epochs`,
`--init-from`, `bigbatch eval` and `bigbatch.load_model`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tomli_w
import torch
from cliout import one_error_line

import bigbatch
from bigbatch.cli import main
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.config import load_config
from bigbatch.train.metrics import read_rows

TINY = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--dataset", "synthetic", "--progress", "none", "--device", "cpu", "--batch-size", "256"]


def _train(*args: str) -> int:
    return main(["-q", "train", *TINY, *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete 2-epoch run (8 updates per epoch)."""
    run = tmp_path_factory.mktemp("runs") / "base"
    assert _train("--epochs", "2", "--out", str(run)) == 0
    return run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
        (["--train-subset", "100000"], "train_subset must be"),
        (["--held-out", "60000"], "held_out must be"),
        (["--model-option", "widht=3"], "has no option 'widht'"),
        pytest.param(["--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_a_run_that_fails_validation_leaves_no_directory(args, message, capsys, tmp_path):
    run = tmp_path / "out" / "run"
    assert _train(*args, "--out", str(run)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_extending_a_run_equals_training_the_extended_regime_from_the_start(finished, tmp_path):
    extended = tmp_path / "extended"
    extended.mkdir()
    for name in ("config.toml", "metrics.csv", "metrics.jsonl", "diffusion.csv",
                 "diffusion.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        (extended / name).parent.mkdir(exist_ok=True)
        (extended / name).write_bytes((finished / name).read_bytes())
    assert main(["-q", "train", "--resume", str(extended), "--epochs", "3"]) == 0
    regime = load_config(extended / "config.toml").regime
    before = load_config(finished / "config.toml")
    # The milestones stay where the 2-epoch run had them; its last phase runs on to epoch 3.
    assert regime["epochs"] == 3
    assert [p["epoch"] for p in regime["phases"]] == [0, 0.4, 0.8, 1.2]
    assert before.epochs == 2 and load_config(extended / "config.toml").epochs is None
    # The same as a fresh run of that regime: the first updates are the finished run's own.
    fresh = tmp_path / "fresh"
    regime_file = tmp_path / "regime.toml"
    regime_file.write_text(tomli_w.dumps(regime))
    assert _train("--regime", str(regime_file), "--out", str(fresh)) == 0
    got, want = read_rows(extended / "metrics.jsonl"), read_rows(fresh / "metrics.jsonl")
    keys = ("updates", "lr", "train_loss", "val_loss", "val_error_pct", "weight_distance")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    summary = json.loads((extended / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["updates"] == 24


def test_extension_is_refused_when_it_would_not_extend(finished, capsys):
    assert main(["train", "--resume", str(finished), "--epochs", "1"]) == 2
    assert "must exceed the run's 2 base epochs" in one_error_line(capsys)


def test_a_cosine_schedule_cannot_be_extended(tmp_path, capsys):
    run = tmp_path / "cos"
    regime = "{epochs = 1, schedule = 'cosine', phases = [{epoch = 0, lr = 0.1}]}"
    assert _train("--regime", regime, "--out", str(run)) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "'cosine' schedule depends on its length" in one_error_line(capsys)


def test_init_from_starts_from_the_checkpoints_weights(finished, tmp_path):
    run = tmp_path / "tuned"
    frozen = "{epochs = 1, phases = [{epoch = 0, lr = 0.0, momentum = 0.0, weight_decay = 0.0}]}"
    assert _train("--init-from", str(finished / "checkpoints/last.pt"), "--regime", frozen,
                  "--out", str(run)) == 0
    start = load_checkpoint(finished / "checkpoints/last.pt")["model"]
    end = load_checkpoint(run / "checkpoints/last.pt")["model"]
    params = [k for k in start if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(start[k], end[k]) for k in params)
    # The weight distance is measured from the loaded weights, which lr 0 never leaves.
    assert read_rows(run / "metrics.jsonl")[-1]["weight_distance"] == 0


def test_init_from_another_shape_is_one_line_and_leaves_nothing(finished, tmp_path, capsys):
    run = tmp_path / "wide"
    assert main(["train", *TINY, "--model-option", "hidden=32", "--out", str(run),
                 "--init-from", str(finished / "checkpoints/last.pt")]) == 2
    line = one_error_line(capsys)
    assert "has shape (16," in line and "(32," in line and "--init-from" in line
    assert not run.exists()


def test_init_from_a_missing_file(tmp_path, capsys):
    assert _train("--init-from", str(tmp_path / "no.pt"), "--out", str(tmp_path / "r")) == 2
    assert "not found" in one_error_line(capsys)


def test_eval_prints_the_metrics_of_the_chosen_checkpoint(finished, capsys):
    summary = json.loads((finished / "summary.json").read_text())
    assert main(["eval", str(finished), "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert f"error {summary['final_val_error_pct']:.2f}%" in out and "last.pt (update 16)" in out
    assert main(["eval", str(finished), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert f"error {summary['best_val_error_pct']:.2f}%" in out and "best.pt" in out


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a bigbatch run directory" in one_error_line(capsys)


def test_load_model_returns_the_trained_model_in_eval_mode(finished):
    model = bigbatch.load_model(finished)
    assert not model.training
    saved = load_checkpoint(finished / "checkpoints/best.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    (finished / "checkpoints/best.pt").rename(finished / "checkpoints/best.pt.away")
    try:  # no best.pt: the last one
        saved = load_checkpoint(finished / "checkpoints/last.pt")["model"]
        last = bigbatch.load_model(finished)
        assert all(torch.equal(v, saved[k]) for k, v in last.state_dict().items())
    finally:
        (finished / "checkpoints/best.pt.away").rename(finished / "checkpoints/best.pt")


def test_one_throughput_everywhere_summary_report_and_rounding(finished):
    from bigbatch.report.grid import _read_run
    from bigbatch.report.stats import train_samples_per_s

    summary = json.loads((finished / "summary.json").read_text())
    run = _read_run("SB", 0, finished)
    # The report reads the summary's value; from the metrics rows alone (a summary before 0.2)
    # it computes the same definition: training samples per second of training time.
    assert train_samples_per_s(run) == summary["train_samples_per_s"]
    run.summary = {k: v for k, v in summary.items() if k != "train_samples_per_s"}
    assert train_samples_per_s(run) == pytest.approx(summary["train_samples_per_s"], rel=1e-3)
    assert summary["train_samples_per_s"] == pytest.approx(
        summary["samples"] / summary["train_time_s"], rel=1e-3)
    assert summary["train_time_s"] <= summary["wall_time_s"]  # evaluation excluded
    # Rounded to what they mean: 4 decimals for errors, 4 significant digits for times and rates.
    assert summary["final_val_error_pct"] == round(summary["final_val_error_pct"], 4)
    rate = summary["train_samples_per_s"]
    assert f"{rate:.4g}" == f"{rate:g}" or float(f"{rate:.4g}") == rate


def test_questionable_settings_warn_in_one_line_and_the_schedule_is_printed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bigbatch")
    assert main(["train", *TINY[:-2], "--batch-size", "4096", "--train-subset", "2000",
                 "--epochs", "1", "--out", str(tmp_path / "big")]) == 0
    err = "\n".join(caplog.messages)
    caplog.clear()
    assert ("batch_size=4096 is larger than the training set: each epoch is one update of all "
            "2000 samples") in err
    assert "schedule: 1 epoch, 1 update of batch 4096 (1 per epoch); lr 0.1 from epoch 0, " in err
    assert "--epochs 1 rescaled the 50-epoch base regime: every milestone moved by x0.02" in err
    # 512 = 5 x 100 + 12: a last ghost batch of 12 (under half of 100) warns; 64 = 40 + 24 does not
    assert main(["train", *TINY[:-2], "--batch-size", "512", "--ghost-batch-size", "100",
                 "--train-subset", "1024", "--epochs", "1", "--out", str(tmp_path / "g")]) == 0
    lines = [m for m in caplog.messages if "ghost" in m]
    caplog.clear()
    assert lines == ["a batch of 512 samples in ghost batches of 100 leaves a last ghost batch of "
                     "12 (under half of 100): its batch statistics are much noisier; choose a "
                     "ghost size that divides 512"]
    assert main(["-q", "train", *TINY[:-2], "--batch-size", "64", "--ghost-batch-size", "40",
                 "--train-subset", "128", "--epochs", "1", "--out", str(tmp_path / "ok")]) == 0
    assert not [m for m in caplog.messages if "ghost" in m]


def test_regime_uses_the_dataset_train_defaults_to(capsys):
    assert main(["regime", "--model", "f1", "--batch-size", "4096"]) == 0
    assert capsys.readouterr().out.startswith("f1 on fashion-mnist (60000 training samples)")


def test_resuming_a_complete_run_with_a_summary_from_before_0_2(finished, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.toml", "checkpoints/last.pt"):
        (old / name).parent.mkdir(exist_ok=True)
        (old / name).write_bytes((finished / name).read_bytes())
    summary = json.loads((finished / "summary.json").read_text())
    summary["samples_per_s"] = summary.pop("train_samples_per_s")
    (old / "summary.json").write_text(json.dumps(summary))
    assert main(["-q", "train", "--resume", str(old)]) == 0
    assert "after 16 updates" in capsys.readouterr().out
