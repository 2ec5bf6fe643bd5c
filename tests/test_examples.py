"""The scripts in examples/ run on tiny data: a plain loop, the Lightning callback, Accelerate."""

from __future__ import annotations

import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from procs import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def test_every_example_is_short_and_linked_from_the_readme():
    readme = (EXAMPLES.parent / "README.md").read_text()
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {"plain_loop.py", "lightning_train.py",
                                          "accelerate_train.py"}
    for script in scripts:
        assert len(script.read_text().splitlines()) <= 85, script.name
        assert f"examples/{script.name}" in readme, script.name


def test_plain_loop(capsys):
    loss = _main("plain_loop.py")(["--batch-size", "128", "--max-updates", "40"])
    out = capsys.readouterr().out
    assert "number of updates  128" in out and "40 updates, last lr" in out
    assert math.isfinite(loss) and loss < math.log(10)  # it learned something


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.:FutureWarning")
def test_lightning_example(tmp_path, capsys):
    pytest.importorskip("lightning")
    trainer = _main("lightning_train.py")(["--max-updates", "12", "--out", str(tmp_path)])
    assert trainer.global_step == 12 and "12 updates of 128" in capsys.readouterr().out
    assert float(trainer.callback_metrics["weight_distance"]) > 0


def _launch(nprocs: int, tmp_path: Path) -> str:
    pytest.importorskip("accelerate")
    where = ["--cpu"] if nprocs == 1 else ["--multi_gpu", "--main_process_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "HF_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes",
           str(nprocs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(EXAMPLES / "accelerate_train.py"), "--max-updates", "20"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"accelerate launch with {nprocs} processes did not finish within 240 s")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.distributed
def test_accelerate_example_on_one_and_two_processes(tmp_path):
    one = _launch(1, tmp_path)
    two = _launch(2, tmp_path)
    assert "1 processes x 4 accumulation steps: 20 updates" in one
    assert "2 processes x 2 accumulation steps: 20 updates" in two
    lr = [re.search(r"last lr ([0-9.e-]+)", out).group(1) for out in (one, two)]
    assert lr[0] == lr[1]  # the same schedule: updates count the same on 1 and 2 processes
