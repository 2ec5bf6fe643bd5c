"""Parsing the command line: help without torch, no abbreviations, the subcommand's usage with a
did-you-mean, the interrupt message, `reproduce --set`, `bigbatch presets`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bigbatch.cli import main

_NO_TORCH = """
import sys
from bigbatch.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["reproduce", "--help"],
                                  ["train", "--batchsize", "512"], ["regime"], ["tran"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=argv)],
                          capture_output=True, text=True, timeout=120, check=True)
    imported, code = proc.stdout.split()[-2:]
    assert imported == "False", proc.stdout
    assert code == ("0" if "--help" in argv else "2")


def test_an_unknown_flag_prints_the_subcommands_usage_with_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--batchsize", "512"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bigbatch train ")
    assert err.strip().splitlines()[-1] == ("bigbatch train: error: unrecognized arguments: "
                                            "--batchsize 512 (did you mean --batch-size?)")


@pytest.mark.parametrize(("argv", "flag"), [(["train", "--batch", "512"], "--batch-size"),
                                            (["reproduce", "--preset", "demo", "--seed", "2"],
                                             "--seeds"),
                                            (["eval", "run", "--spl", "test"], "--split")])
def test_abbreviations_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"did you mean {flag}?" in capsys.readouterr().err


def test_the_interrupt_message_names_the_run_directory(monkeypatch, tmp_path, capsys):
    import bigbatch.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bigbatch.train.loop, "train", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--out", str(run)]) == 130
    assert f"continue with `bigbatch train --resume {run}`" in capsys.readouterr().err


_MINI = """
name = "mini"
description = "a tiny grid for tests"
[base]
model = "f1"
model_options = { hidden = 8, depth = 2 }
dataset = "synthetic"
base_batch_size = 64
[base.regime]
epochs = 1
phases = [{ epoch = 0, lr = 0.1, momentum = 0.9 }]
[grid]
large_batch_size = 256
ghost_batch_size = 64
arms = ["SB", "LB"]
"""


def test_reproduce_set_shapes_every_run_of_the_grid(monkeypatch, tmp_path):
    from bigbatch import reproduce

    preset = tmp_path / "mini.toml"
    preset.write_text(_MINI)
    seen = []
    monkeypatch.setattr(reproduce, "_train", lambda config, run_dir, *, resume: seen.append(
        config) or {"status": "complete"})
    monkeypatch.setattr("bigbatch.report.write_report", lambda out: (out / "r.md", out / "r.html"))
    grid = tmp_path / "grid"
    assert main(["-q", "reproduce", "--preset", str(preset), "--out", str(grid), "--set",
                 "train_subset=500", "--set", "model_options.hidden=4", "--set",
                 "large_batch_size=128"]) == 0
    assert [(c.batch_size, c.train_subset, c.model_options["hidden"]) for c in seen] == [
        (64, 500, 4), (128, 500, 4)]
    record = (grid / "grid.toml").read_text()
    assert "train_subset = 500" in record and '"model_options.hidden" = 4' in record


def test_reproduce_set_with_a_bad_key_is_one_line_with_a_did_you_mean(tmp_path, capsys):
    from cliout import one_error_line

    assert main(["reproduce", "--preset", "demo", "--out", str(tmp_path / "g"),
                 "--set", "train_subsett=500"]) == 2
    assert "unknown override 'train_subsett'; did you mean 'train_subset'" in one_error_line(
        capsys)
    assert not (tmp_path / "g").exists()


def test_reproduce_help_documents_the_preset_schema(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = capsys.readouterr().out
    for text in ("--set KEY=VALUE", "[base.regime]", "[grid]", "large_batch_size", "[evidence]"):
        assert text in out, text


def test_presets_lists_every_preset_with_its_description(capsys):
    from bigbatch.reproduce import list_presets, load_preset

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_presets())
    for name, line in zip(list_presets(), lines, strict=True):
        assert line.startswith(name + " ") and line.endswith(load_preset(name)["description"])
    assert any("f1 on fashion-mnist, batch 128 vs 4096" in line for line in lines)


def test_reproduce_shows_one_display_for_the_grid_and_quiet_runs(monkeypatch, tmp_path, capsys):
    preset = tmp_path / "mini.toml"
    preset.write_text(_MINI)
    monkeypatch.setattr("bigbatch.report.write_report", lambda out: (out / "r.md", out / "r.html"))
    grid = tmp_path / "grid"
    args = ["reproduce", "--preset", str(preset), "--out", str(grid), "--device", "cpu",
            "--set", "train_subset=512", "--progress", "bar"]
    assert main(["-q", *args, "--arms", "SB"]) == 0  # one run done before: counted, not timed
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[1/2] SB            seed 0: already complete" in err
    assert "[2/2] LB            seed 0: done, val error " in err
    assert "grid: runs 1/2 done,  50%" in err and "grid: runs 2/2 done, 100%" in err
    assert " left]" in err
    # the runs themselves are quiet: no bar or evaluation line of their own
    assert "upd/s" not in err and "(epoch " not in err and "schedule:" not in err


def test_grid_progress_counts_finished_runs_as_done_work():
    import logging

    from bigbatch.train.progress import GridProgress

    display = GridProgress([1.0, 32.0, 2.0], [True, False, False], "bar", logging.getLogger("t"))
    bar = display._bar
    assert (bar.n, bar.total) == (1.0, 35.0) and display.quiet_runs
    display.finished(32.0, "x")
    assert bar.n == 33.0 and bar.desc == "grid: runs 2/3 done,"
    display.close()
    assert not GridProgress([1.0], [False], "log", logging.getLogger("t")).quiet_runs


def test_the_readme_and_docs_stand_alone():
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, page
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links
            assert (page.parent / target).exists(), (page.name, target)
