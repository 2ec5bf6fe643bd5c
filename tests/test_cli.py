"""`bigbatch` command line: help, subcommands, one-line errors, an end-to-end Fashion-MNIST run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.train.metrics import read_rows

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--progress", "none", "--device", "cpu"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_train_help_reads_well(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("model and data", "batch", "regime", "--ghost-batch-size G", "--resume RUN_DIR",
                 "--no-regime-adaptation", "(default: 128)", "examples:", "outputs"):
        assert text in out, text


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet44" in out and "cifar10" in out and "lr 0.1 -> 0.01@81" in out


def test_regime_prints_before_and_after(capsys):
    assert main(["regime", "--model", "f1", "--batch-size", "4096", "--lr-scaling", "sqrt",
                 "--regime-adaptation", "--dataset-size", "16384"]) == 0
    out = capsys.readouterr().out
    assert "small batch" in out and "0.565685 @ ep 0" in out and "1600" in out


def test_regime_under_adascale_shows_its_longest_run_and_says_it_is_decided_online(capsys):
    assert main(["regime", "--model", "f1", "--batch-size", "4096", "--lr-scaling", "adascale",
                 "--dataset-size", "16384"]) == 0
    out = capsys.readouterr().out
    assert "AdaScale decides during training" in out and "between 1 and 32" in out
    lr_row = next(line for line in out.splitlines() if line.startswith("lr, phase 1"))
    assert lr_row.split()[3:] == ["0.1", "@", "ep", "0", "0.1", "@", "ep", "0"]  # lr unscaled
    assert "1600" in out  # the base regime stretched by B/B0: AdaScale's longest run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet45"], "unknown model 'resnet45'; did you mean 'resnet44'"),
        (["--dataset", "synthetic", "--batch-size", "64", "--ghost-batch-size", "128"],
         "ghost_batch_size=128 is larger than batch_size=64"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm"),
        (["--config", "/nonexistent/run.toml"], "cannot read config file"),
        (["--resume", "/nonexistent/run"], "cannot resume"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path):
    code = main(["train", *args, "--out", str(tmp_path / "run")] if "--resume" not in args
                else ["train", *args])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith("bigbatch: error: ") and message in line


def test_unwritable_out_dir_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--dataset", "synthetic", "--out", str(blocker / "run")]) == 2
    assert "cannot write to output directory" in _error_line(capsys)


def test_resume_refuses_changed_settings(capsys, tmp_path):
    assert main(["train", "--resume", str(tmp_path), "--batch-size", "64"]) == 2
    assert "--batch-size cannot change on --resume" in _error_line(capsys)


def test_divergence_exits_non_zero_with_the_message(tmp_path, capsys):
    regime = tmp_path / "huge.toml"
    regime.write_text("epochs = 1\n[[phases]]\nepoch = 0\nlr = 1e30\nmomentum = 0.9\n")
    code = main(["train", *TINY, "--dataset", "synthetic", "--batch-size", "512",
                 "--regime", str(regime), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "diverged at update" in _error_line(capsys)


def test_a_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bigbatch", "train", "--model", "f2", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bigbatch: error: unknown model 'f2'; did you mean 'f1'?")
    assert "Traceback" not in proc.stderr


def _fashion_mnist_dir(tmp_path: Path) -> Path:
    if FMNIST.is_dir():
        return FMNIST
    from datafiles import write_mnist  # the data engineer's IDX writers

    write_mnist(tmp_path / "fmnist", num_train=600, num_test=200)
    return tmp_path / "fmnist"


# The data pipeline (issue 3) converts the read-only IDX array with torch.as_tensor, which warns
# once per process; not this test's concern.
def test_end_to_end_on_a_slice_of_fashion_mnist(tmp_path, capsys):
    data_dir = _fashion_mnist_dir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("dataset: fashion-mnist\ntrain_subset: 512\nbatch_size: 64\nseed: 1\n")
    out = tmp_path / "run"
    code = main(["train", "--config", str(config), *TINY, "--data-dir", str(data_dir),
                 "--batch-size", "256", "--ghost-batch-size", "64", "--lr-scaling", "sqrt",
                 "--epochs", "2", "--clip", "5", "--eval-batch-size", "2048", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "final val error" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["batch_size"] == 256  # flag beat the file
    assert summary["seed"] == 1 and summary["ghost_batch_size"] == 64 and summary["updates"] == 4
    for key in ("final_val_error_pct", "best_val_error_pct", "final_train_error_pct",
                "wall_time_s", "train_time_s", "train_samples_per_s", "torch_version",
                "bigbatch_version", "git_commit"):
        assert key in summary, key
    from bigbatch.layers import backend_summary

    assert summary["ghost_bn_backend"] == backend_summary("cpu")
    assert len(read_rows(out / "metrics.csv")) == 2 and (out / "diffusion.csv").is_file()
    torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    written = (out / "config.toml").read_text()
    assert "lr_scaling = \"sqrt\"" in written and "[resolved.effective_regime]" in written


def test_every_config_key_is_a_train_flag_of_the_same_name():
    import argparse

    from bigbatch.cli import build_parser
    from bigbatch.train.config import config_keys

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = {opt: a.dest for a in sub.choices["train"]._actions for opt in a.option_strings}
    for name in config_keys():
        assert flags.get("--" + name.replace("_", "-")) == name, name


def test_flags_parse_to_the_config_values(tmp_path):
    from bigbatch.cli import build_parser
    from bigbatch.flags import key_values
    from bigbatch.train.config import config_keys

    args = build_parser().parse_args([
        "train", "--clip", "5", "--eval-every", "7", "--out", str(tmp_path), "--amp", "none",
        "--channels-last", "false", "--regime-adaptation", "2", "--model-option", "hidden=8",
        "--regime", "{epochs = 2, phases = [{epoch = 0, lr = 0.1}]}"])
    values = key_values(args, config_keys())
    assert values == {"clip": 5.0, "eval_every": 7, "out": str(tmp_path), "channels_last": False,
                      "amp": "none",
                      "regime_adaptation": 2.0, "model_options": {"hidden": 8},
                      "regime": {"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1}]}}
    for argv, expected in ((["--regime-adaptation"], True), (["--no-regime-adaptation"], False),
                           (["--regime-adaptation-factor", "3"], 3.0)):  # the last: deprecated
        args = build_parser().parse_args(["train", *argv])
        assert key_values(args, ["regime_adaptation"]) == {"regime_adaptation": expected}


def test_out_in_a_config_file_is_the_run_directory(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'dataset = "synthetic"\nout = "{tmp_path / "from-file"}"\nepochs = 1\n'
                      'batch_size = 512\nprogress = "none"\ndevice = "cpu"\n'
                      '[model_options]\nhidden = 16\ndepth = 2\n')
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "from-file" / "summary.json").is_file()


def test_regime_counts_the_datasets_own_training_size(capsys):
    from bigbatch import data

    assert main(["regime", "--model", "f1", "--batch-size", "4096"]) == 0
    expected = data.DATASETS["fashion-mnist"].num_train
    assert f"({expected} training samples)" in capsys.readouterr().out
    assert expected == 60000
