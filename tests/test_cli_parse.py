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
