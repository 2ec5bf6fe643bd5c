"""RELIABILITY.md's promises: bad input, disk full, divergence, untrusted files, downloads.

Each test proves one row of RELIABILITY.md; kills of real processes are in
test_reliability_kill.py. What other test files already prove is referenced there, not repeated.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
from pathlib import Path

import pytest
import tomli_w
import torch
from cliout import files, one_error_line

from bigbatch import fileio
from bigbatch.cli import main
from bigbatch.errors import ConfigError
from bigbatch.fileio import StorageError, atomic_write_bytes
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.config import RunConfig
from bigbatch.train.metrics import CSVWriter, read_rows

TINY = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--dataset", "synthetic", "--device", "cpu", "--progress", "none"]


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*.tmp")]


# -- every config key: key, value and what is allowed ----------------------------------------
# One bad value per RunConfig field, and a fragment of what the message must say is allowed.
BAD_VALUES = {
    "model": ("resnet45", "did you mean 'resnet44'"),
    "model_options": ([1], "a table of keyword options"),
    "imports": ([3], "a list of Python module names"),
    "dataset": ("cifar11", "did you mean 'cifar10'"),
    "data_dir": ("", "a path or none"),
    "init_from": ("", "a path or none"),
    "download": ("yes", "true or false"),
    "train_subset": (1, "an integer >= 2 or none"),
    "held_out": (-1, "an integer >= 0"),
    "batch_size": (0, "an integer >= 1"),
    "base_batch_size": (0.5, "an integer >= 1"),
    "ghost_batch_size": (1, "an integer >= 2 or none"),
    "micro_batch_size": (0, "an integer >= 1 or none"),
    "lr_scaling": ("cube", "one of 'none', 'sqrt', 'linear'"),
    "regime_adaptation": (-2.0, "a factor > 0"),
    "warmup_epochs": (-1.0, "a number >= 0"),
    "regime": ("fast", "a regime table"),
    "epochs": (0, "a number > 0 or none"),
    "clip": (math.inf, "a number > 0 or none"),
    "seed": (-1, "an integer >= 0"),
    "device": ("tpu", "'auto', 'cpu', 'cuda'"),
    "out": ("", "a path or none"),
    "eval_every": (0, "an integer >= 1 or none"),
    "eval_batch_size": (0, "an integer >= 1"),
    "log_diffusion": (1, "true or false"),
    "channels_last": ("maybe", "'auto', true or false"),
    "amp": ("fp8", "one of none, 'bf16'"),
    "compile": ("no", "true or false"),
    "on_nonfinite": ("ignore", "one of 'stop', 'skip'"),
    "num_workers": (-1, "an integer >= 0"),
    "noise_scale": ("yes", "true or false"),
    "noise_scale_every": (0, "an integer >= 1"),
    "noise_scale_decay": (-1, "a number >= 0"),
    "progress": ("loud", "one of 'auto', 'bar', 'log', 'none'"),
    "checkpoint_every_minutes": (0, "a number > 0 or none"),
    "exact_ghost_alignment": ("yes", "true or false"),
}
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]


def test_the_table_covers_every_config_field():
    # A new RunConfig field without a bad-value case here fails this test.
    assert sorted(k for k in BAD_VALUES if k in FIELDS) == sorted(FIELDS)


@pytest.mark.parametrize("key", [k for k in BAD_VALUES if k in FIELDS])
def test_every_config_key_rejects_a_bad_value_naming_key_value_and_allowed(key, tmp_path, capsys):
    value, allowed = BAD_VALUES[key]
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({key: value})
    message = str(info.value)
    assert key.split("_")[0] in message and repr(value) in message and allowed in message, message
    # the same value from a config file through the CLI: one line, exit 2, nothing written
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({key: value}))
    out = ["--out", str(tmp_path / "run")] if key != "out" else []  # --out would override it
    assert main(["train", "--config", str(config), *out]) == 2
    line = one_error_line(capsys)
    assert repr(value) in line and allowed in line
    assert files(tmp_path) == ["run.toml"]


def test_unknown_key_in_a_file_has_did_you_mean_through_the_cli(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("ghost_batchsize: 64\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "unknown config key 'ghost_batchsize'; did you mean 'ghost_batch_size'?" in (
        one_error_line(capsys)
    )


# -- configs are data -------------------------------------------------------------------------
def test_yaml_python_tags_are_refused_and_run_nothing(tmp_path, capsys):
    import yaml

    target = tmp_path / "pwned"
    text = f"model: !!python/object/apply:os.system ['touch {target}']\n"
    yaml.unsafe_load(text)  # positive control: an unsafe loader does run it
    assert target.exists()
    target.unlink()
    config = tmp_path / "evil.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "cannot parse config file" in line and "evil.yaml" in line
    assert not target.exists()


# -- checkpoints are weights only ---------------------------------------------------------------
class _Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_with_code_in_it_is_refused_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = RunConfig(model="f1", model_options={"hidden": 16, "depth": 2}, dataset="synthetic")
    (run / "config.toml").write_text(cfg.to_toml())
    target = tmp_path / "pwned"
    evil = run / "checkpoints" / "last.pt"
    torch.save({"format": "bigbatch-checkpoint-v1", "model": _Exploit(target)}, evil)
    torch.load(evil, weights_only=False)  # positive control: a full unpickle runs the payload
    assert target.exists()
    target.unlink()
    assert main(["train", "--resume", str(run), "--device", "cpu", "--progress", "none"]) == 2
    line = one_error_line(capsys)
    assert "cannot load checkpoint" in line and "last.pt" in line
    assert not target.exists()


# -- divergence -------------------------------------------------------------------------------
def _regime(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD_PHASE = "[[phases]]\nepoch = 0\nlr = 0.05\nmomentum = 0.9\n"


def test_divergence_keeps_the_last_good_checkpoint_and_exits_non_zero(tmp_path, capsys):
    # 2048 samples / 256 = 8 updates an epoch; epoch 0 is sane, epoch 1 has an absurd lr.
    explode = _regime(tmp_path, "explode.toml",
                      f"epochs = 2\n{GOOD_PHASE}[[phases]]\nepoch = 1\nlr = 1e30\n")
    sane = _regime(tmp_path, "sane.toml", f"epochs = 1\n{GOOD_PHASE}")
    args = [*TINY, "--batch-size", "256", "--seed", "5"]
    assert main(["train", *args, "--regime", explode, "--out", str(tmp_path / "a")]) == 2
    line = one_error_line(capsys)
    assert "diverged at update" in line and "of 16" in line and "lr 1e+30" in line
    assert "warm-up" in line and "last.pt keeps the last good state" in line
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["updates"] > 8
    kept = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert kept["updates"] == 8
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    # the kept state is exactly the state after the good epoch (a run that stops there)
    assert main(["train", *args, "--regime", sane, "--out", str(tmp_path / "b")]) == 0
    good = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert kept["model"].keys() == good["model"].keys()
    for key, value in good["model"].items():
        assert torch.equal(kept["model"][key], value), key
    # negative control: the diverging run did move past update 8 before stopping
    assert summary["updates"] != kept["updates"]


def test_on_nonfinite_skip_from_the_cli_counts_and_logs(tmp_path, capsys, caplog):
    explode = _regime(tmp_path, "explode.toml",
                      f"epochs = 2\n{GOOD_PHASE}[[phases]]\nepoch = 1\nlr = 1e30\n")
    out = tmp_path / "run"
    code = main(["train", *TINY, "--batch-size", "256", "--regime", explode,
                 "--on-nonfinite", "skip", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["skipped_steps"] > 0
    assert sum("skipped update" in r.getMessage() for r in caplog.records) == (
        summary["skipped_steps"]
    )
    assert read_rows(out / "metrics.csv")[-1]["skipped_steps"] == summary["skipped_steps"]


# -- disk full ---------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, b"good")
    monkeypatch.setattr(fileio.os, "fsync", _enospc)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(path, b"new")
    assert str(info.value).startswith("no space left on device writing ")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == b"good" and files(tmp_path) == ["last.pt"]


def test_disk_full_appending_metrics_is_one_line_naming_the_file(tmp_path):
    writer = CSVWriter(tmp_path / "metrics.csv")
    writer.write({"updates": 1})

    class _Full(io.StringIO):
        def write(self, text):
            _enospc()

    writer.close()
    writer._file = _Full()  # the disk fills up between two rows
    with pytest.raises(StorageError, match=r"no space left on device writing '.*metrics.csv'"):
        writer.write({"updates": 2})
    writer.close()


def _fails_on_second_checkpoint(real_fsync):
    seen = []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name.startswith(".last.pt."):
            seen.append(name)
            if len(seen) == 2:
                _enospc()
        return real_fsync(fd)

    return fsync


def _assert_same_metrics_as_an_uninterrupted_run(args: list[str], out: Path, full: Path) -> None:
    assert main(["train", *args, "--out", str(full)]) == 0
    timing = {"wall_time_s", "samples_per_s"}
    a, b = (
        [{k: v for k, v in r.items() if k not in timing} for r in read_rows(d / "metrics.jsonl")]
        for d in (full, out)
    )
    assert a == b and len(a) == 4 and a[0]["val_loss"] != a[-1]["val_loss"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fd")
def test_disk_full_mid_run_is_one_line_keeps_last_pt_and_resumes_exactly(
    tmp_path, monkeypatch, capsys
):
    args = [*TINY, "--batch-size", "128", "--epochs", "1", "--eval-every", "4", "--seed", "2"]
    out = tmp_path / "run"
    monkeypatch.setattr(fileio.os, "fsync", _fails_on_second_checkpoint(os.fsync))
    assert main(["train", *args, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "no space left on device writing" in line and "last.pt" in line
    assert load_checkpoint(out / "checkpoints" / "last.pt")["updates"] == 4  # the previous one
    assert _temp_files(out) == [] and not (out / "summary.json").exists()
    monkeypatch.undo()  # space freed: the run resumes and ends as an uninterrupted one
    assert main(["train", "--resume", str(out), "--progress", "none"]) == 0
    _assert_same_metrics_as_an_uninterrupted_run(args, out, tmp_path / "full")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fd")
def test_a_run_directory_written_with_the_old_key_names_still_resumes(
    tmp_path, monkeypatch, capsys, caplog
):
    from bigbatch.train.checkpoint import save_checkpoint

    args = [*TINY, "--batch-size", "128", "--epochs", "1", "--eval-every", "4", "--clip", "5"]
    out = tmp_path / "run"
    monkeypatch.setattr(fileio.os, "fsync", _fails_on_second_checkpoint(os.fsync))
    assert main(["train", *args, "--out", str(out)]) == 2  # stopped after the first checkpoint
    monkeypatch.undo()
    # Rewrite config.toml and the checkpoint's config as bigbatch 0.1 wrote them.
    old_names = {"clip": "clip_grad_norm", "eval_every": "eval_every_updates"}
    text = (out / "config.toml").read_text()
    for new, old in old_names.items():
        text = text.replace(f"\n{new} = ", f"\n{old} = ")
    (out / "config.toml").write_text(text)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    state["config"] = {old_names.get(k, k): v for k, v in state["config"].items()}
    save_checkpoint(out / "checkpoints" / "last.pt", state)
    assert "clip_grad_norm = 5.0" in text and "eval_every_updates = 4" in text

    with caplog.at_level("WARNING", logger="bigbatch"):
        assert main(["train", "--resume", str(out), "--progress", "none"]) == 0
    assert any("'clip_grad_norm' is deprecated" in r.getMessage() for r in caplog.records)
    _assert_same_metrics_as_an_uninterrupted_run(args, out, tmp_path / "full")


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    assert main(["train", *TINY, "--out", str(blocker)]) == 2
    assert "cannot write to output directory" in one_error_line(capsys)
    assert blocker.read_text() == "keep me"
