"""Users' own models and datasets: ``--import``, ``register_dataset``, entry points (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bigbatch import data, models, plugins
from bigbatch.cli import main
from bigbatch.data import custom
from bigbatch.data import registry as data_registry
from bigbatch.errors import ConfigError, DataError
from bigbatch.models import registry as model_registry
from bigbatch.train.config import RunConfig
from bigbatch.train.metrics import read_rows

# A model and a dataset defined in a user's module. CUSTOM_STOP_AFTER=N interrupts training after
# N forward passes (as Ctrl-C would), so that a run can be resumed.
USER_MODULE = '''
import os
import torch
from torch import nn
from bigbatch import data, models

g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (300, 1, 6, 6), dtype=torch.uint8, generator=g)
y = (x.float().mean(dim=(1, 2, 3)) > 127.5).long()
data.register_dataset("{name}-data", train=(x[:240], y[:240]), val=(x[240:], y[240:]),
                      num_classes=2)
STOP_AFTER = int(os.environ.get("CUSTOM_STOP_AFTER", "0"))
calls = 0


class Net(nn.Sequential):
    def forward(self, x):
        global calls
        calls += self.training
        if STOP_AFTER and calls > STOP_AFTER:
            raise KeyboardInterrupt
        return super().forward(x)


@models.register("{name}-net", default_dataset="{name}-data",
                 default_regime=models.registry.step_regime(2, 0.1, momentum=0.9,
                                                            weight_decay=0.0))
def net(*, num_classes, in_channels, image_size, width: int = 8):
    """A tiny MLP with batch norm."""
    return Net(nn.Flatten(), nn.Linear(in_channels * image_size**2, width),
               nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))
'''
RUN = ["--batch-size", "32", "--eval-every", "4", "--device", "cpu", "--progress", "none"]


@pytest.fixture
def registries(monkeypatch):
    """Every registration a test makes is undone afterwards (the registries are process-wide)."""
    stores = (model_registry._REGISTRY, data_registry.DATASETS, custom._ARRAYS, custom._PENDING,
              custom._FOLDERS)
    saved = [dict(store) for store in stores]
    loaded = set(plugins._LOADED_GROUPS)
    plugins._LOADED_GROUPS.clear()  # the test's own entry points must be looked for
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = set(sys.modules)
    yield
    for store, before in zip(stores, saved, strict=True):
        store.clear()
        store.update(before)
    plugins._LOADED_GROUPS.clear()
    plugins._LOADED_GROUPS.update(loaded)
    for name in set(sys.modules) - modules:
        if name.startswith(("user_", "plug_")):
            del sys.modules[name]


def _user_module(directory: Path, name: str) -> str:
    (directory / f"{name}.py").write_text(USER_MODULE.format(name=name), encoding="utf-8")
    return name


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUSTOM_STOP_AFTER")}
    return {**env, "OMP_NUM_THREADS": "1"}


# -- --import through train, --resume (a fresh process) and reproduce -----------------------------
def test_import_trains_and_resume_in_a_fresh_process_reimports(registries, tmp_path,
                                                               monkeypatch):
    mod = _user_module(tmp_path, "user_resume")
    monkeypatch.chdir(tmp_path)  # imported from the current directory, not from sys.path
    monkeypatch.setenv("CUSTOM_STOP_AFTER", "6")
    args = ["train", "--import", mod, "--model", f"{mod}-net", "--model-option", "width=5",
            "--dataset", f"{mod}-data", *RUN, "--out", "run"]
    assert main(args) == 130  # interrupted after 6 updates; the evaluation at 4 checkpointed
    run = tmp_path / "run"
    assert not (run / "summary.json").exists()
    assert [r["updates"] for r in read_rows(run / "metrics.csv")] == [4]
    assert "imports = [" in (run / "config.toml").read_text() and mod in sys.modules

    # A new process started elsewhere (the console script: sys.path[0] is its bin folder) learns
    # the module only from config.toml, and finds it in its current directory.
    script = Path(sys.executable).with_name("bigbatch")
    done = subprocess.run([str(script), "train", "--resume", "run"], cwd=tmp_path, env=_cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 16  # 240 samples / 32 = 8 updates per epoch (7 full + 1), 2 epochs
    assert [r["updates"] for r in read_rows(run / "metrics.csv")] == [4, 8, 12, 16]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["1.weight"].shape == (5, 36)  # the user's net, with its option
    assert state["config"]["imports"] == [mod]


def test_resume_import_adds_to_the_runs_own(registries, tmp_path, monkeypatch):
    # A run started from Python, where the model was registered without --import, resumes with one.
    mod = _user_module(tmp_path, "user_added")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'imports = ["json"]\nmodel = "{mod}-net"\n'
                                     f'dataset = "{mod}-data"\nbatch_size = 32\n')
    assert main(["train", "--resume", "run", "--import", mod, "--progress", "none"]) == 0
    assert 'imports = [\n    "json",\n    "user_added",\n]' in (run / "config.toml").read_text()


def test_an_unknown_model_points_at_import(capsys):
    assert main(["train", "--model", "my-mlp", "--dataset", "synthetic"]) == 2
    assert _error_line(capsys).endswith("(your own model: --import the module that registers it)")


def test_resume_without_the_module_fails_in_one_line(registries, tmp_path, capsys):
    (tmp_path / "config.toml").write_text(
        'imports = ["user_gone"]\nmodel = "user_gone-net"\ndataset = "synthetic"\n')
    assert main(["train", "--resume", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "cannot import module 'user_gone' (ModuleNotFoundError" in line
    assert "current directory" in line


def test_reproduce_import_is_recorded_in_every_run(registries, tmp_path, monkeypatch, capsys):
    mod = _user_module(tmp_path, "user_grid")
    preset = tmp_path / "mine.toml"
    preset.write_text(textwrap.dedent(f"""\
        name = "mine"
        [base]
        model = "{mod}-net"
        dataset = "{mod}-data"
        base_batch_size = 32
        regime = {{ epochs = 1, phases = [{{ epoch = 0, lr = 0.1 }}] }}
        [grid]
        seeds = [0]
        large_batch_size = 64
        ghost_batch_size = 16
        arms = ["SB", "LB"]
        """))
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--preset", str(preset), "--out", "grid", "--import", mod,
                 "--device", "cpu", "--progress", "none"]) == 0
    configs = sorted((tmp_path / "grid").glob("*/seed0/config.toml"))
    assert len(configs) == 2
    for path in configs:
        assert f'imports = [\n    "{mod}",\n]' in path.read_text(), path


def test_a_preset_base_may_carry_imports(registries, tmp_path, monkeypatch):
    from bigbatch.reproduce import load_preset

    mod = _user_module(tmp_path, "user_preset")
    monkeypatch.chdir(tmp_path)
    text = (f'[base]\nmodel = "{mod}-net"\ndataset = "{mod}-data"\n{{imports}}'
            '[grid]\nlarge_batch_size = 64\nghost_batch_size = 16\n')
    (tmp_path / "without.toml").write_text(text.format(imports=""))
    with pytest.raises(ConfigError, match=f"unknown model '{mod}-net'"):
        load_preset(tmp_path / "without.toml")
    (tmp_path / "with.toml").write_text(text.format(imports=f'imports = ["{mod}"]\n'))
    assert load_preset(tmp_path / "with.toml")["base"]["imports"] == [mod]


@pytest.mark.parametrize(("source", "fragment"), [
    ("raise RuntimeError('no GPU here')", "(RuntimeError: no GPU here)"),
    ("import not_installed_xyz", "(ModuleNotFoundError: No module named 'not_installed_xyz')"),
    ("def broken(:\n", "(SyntaxError: "),
])
def test_a_failing_module_is_one_line_naming_it(registries, tmp_path, monkeypatch, capsys,
                                                source, fragment):
    (tmp_path / "user_bad.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--import", "user_bad", "--dataset", "synthetic"]) == 2
    line = _error_line(capsys)
    assert line.startswith("bigbatch: error: cannot import module 'user_bad' (")
    assert fragment in line
    # a module that is there but imports a missing one is not told to check its own name
    assert "check the name" not in line


def test_imports_key_validation():
    assert RunConfig(dataset="synthetic", imports="json").imports == ["json"]
    assert RunConfig(dataset="synthetic", imports=["json", "json"]).imports == ["json"]
    with pytest.raises(ConfigError, match="module names, not files: 'my_task' for 'my_task.py'"):
        RunConfig(dataset="synthetic", imports=["my_task.py"])
    for bad in (["a b"], [""], [3], {"m": 1}, ["pkg/mod"]):
        with pytest.raises(ConfigError, match="a list of Python module names"):
            RunConfig(dataset="synthetic", imports=bad)


# -- register_dataset ------------------------------------------------------------------------------
def _pair(n: int = 40, channels: int = 1, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return x, torch.arange(n) % 3


def test_registered_loaders_apply_the_engine_splits_exactly(registries):
    x, y = _pair(60, channels=2)
    info = data.register_dataset("t-split", train=(x, y), num_classes=3, mean=(0.5, 0.4),
                                 std=(0.2, 0.3))
    assert (info.num_train, info.input_shape, info.in_memory) == (60, (2, 4, 4), True)
    train, val, _ = data.build_loaders("t-split", batch_size=16, held_out=12, train_subset=30)
    train_idx, val_idx = data_registry.split_indices(60, held_out=12, train_subset=30)
    assert (train.num_samples, val.num_samples) == (30, 12)
    # validation batches are the held-out samples in order, normalised: the naive computation
    mean, std = torch.tensor([0.5, 0.4]).view(1, 2, 1, 1), torch.tensor([0.2, 0.3]).view(1, 2, 1, 1)
    xb, yb = next(val.iterate(0))
    torch.testing.assert_close(xb, (x[val_idx].float() / 255 - mean) / std)
    assert torch.equal(yb, y[val_idx])
    seen = torch.cat([b for _, b in train.iterate(0)])
    assert sorted(seen.tolist()) == sorted(y[train_idx].tolist())


def test_default_normalisation_is_the_training_sets_own(registries):
    x, y = _pair(50, channels=3)
    info = data.register_dataset("t-stats", train=(x.numpy(), y.numpy()), val=_pair(10, 3))
    pixels = x.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(info.mean, pixels.mean(1).numpy(), atol=1e-4)
    np.testing.assert_allclose(info.std, pixels.std(1).numpy(), atol=1e-4)
    assert info.num_classes == 3  # largest label + 1
    images, labels = data.load_split("t-stats", split="test")
    assert images.shape == (10, 3, 4, 4) and labels.dtype == np.int64 and images.flags.writeable


def test_given_statistics_are_not_computed_from_the_training_set(registries, monkeypatch):
    def fail(x):
        raise AssertionError("the channel statistics were computed though both were given")

    monkeypatch.setattr(custom, "_channel_stats", fail)
    info = data.register_dataset("t-given", train=_pair(50, channels=3), val=_pair(10, 3),
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (info.mean, info.std) == ((0.5,) * 3, (0.25,) * 3)


def test_without_val_a_run_must_hold_out(registries, capsys):
    data.register_dataset("t-noval", train=_pair(40))
    with pytest.raises(DataError, match="--held-out N"):
        data.build_loaders("t-noval", batch_size=8)
    assert main(["train", "--model", "f1", "--dataset", "t-noval", *RUN]) == 2
    assert "registered without val=(x, y)" in _error_line(capsys)


def test_a_loader_is_called_once_on_first_use(registries):
    calls = []

    def load():
        calls.append(1)
        return _pair(40), _pair(8)

    assert data.register_dataset("t-lazy", loader=load, num_classes=3) is None
    RunConfig(model="f1", dataset="t-lazy")  # validating a config does not load the data
    assert "t-lazy" in data.dataset_names() and calls == []
    train, val, info = data.build_loaders("t-lazy", batch_size=8)
    data.build_loaders("t-lazy", batch_size=8)
    assert calls == [1] and (info.num_train, val.num_samples) == (40, 8)


def test_a_model_built_for_another_dataset_leaves_its_default_dataset_unloaded(registries):
    calls = []

    def load():
        calls.append(1)
        return _pair(40), _pair(8)

    data.register_dataset("t-default", loader=load, num_classes=3)
    regime = {"epochs": 1, "phases": [{"epoch": 0, "lr": 0.1}]}
    models.register("t-net", default_dataset="t-default", default_regime=regime)(
        lambda *, num_classes, in_channels, image_size: torch.nn.Linear(in_channels, num_classes))
    models.create("t-net", num_classes=10, in_channels=1, image_size=28)  # the run's dataset
    assert calls == []
    assert models.create("t-net").out_features == 3  # its default shape: now the data is read
    assert calls == [1]


def test_a_folder_dataset_reads_like_imagenet(registries, tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 1)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((10, 12, 3), 40 * i + (label == "dog") * 100, np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    info = data.register_dataset("t-folder", folder=tmp_path, image_size=8)
    assert (info.num_classes, info.num_train, info.in_memory) == (2, 6, False)
    train, val, _ = data.build_loaders("t-folder", batch_size=3, num_workers=0)
    xb, yb = next(val.iterate(0))
    assert xb.shape == (2, 3, 8, 8) and yb.tolist() == [0, 1]
    assert val.num_samples == 2 and train.num_samples == 6
    data.unregister_dataset("t-folder")
    assert not data.is_dataset("t-folder")
    with pytest.raises(ConfigError, match="'mnist' was not registered with register_dataset"):
        data.unregister_dataset("mnist")


BAD_DATASETS = [
    ({"train": (torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))}, "expected uint8"),
    ({"train": (torch.zeros(8, 4, 4, dtype=torch.uint8), torch.zeros(8))}, "x.unsqueeze(1)"),
    ({"train": (torch.zeros(8, 1, 4, 5, dtype=torch.uint8), torch.zeros(8))}, "square images"),
    ({"train": (torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(7))}, "shape (8,)"),
    ({"train": (torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8))}, "pass y.long()"),
    ({"train": _pair(8), "num_classes": 2}, "labels span [0, 2] but num_classes=2"),
    ({"train": _pair(8), "val": _pair(4, size=5)}, "both splits need the same shape"),
    ({"train": _pair(8), "std": (0.1, 0.2)}, "one value per channel (1)"),
    ({"train": _pair(8), "augmentation": "imagenet"}, "'none' or 'crop_flip'"),
    ({"train": [1, 2]}, "must be a torch.Tensor or numpy array"),
    ({"train": _pair(8), "folder": "x"}, "exactly one of"),
    ({"val": _pair(8), "loader": _pair}, "val=(x, y) goes with train"),
    ({"folder": "/nonexistent"}, "/nonexistent/train not found"),
    ({"train": _pair(8), "name": "mnist"}, "'mnist' is already registered"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), BAD_DATASETS)
def test_bad_datasets_are_refused_with_the_fix(registries, kwargs, fragment):
    kwargs = dict(kwargs)
    name = kwargs.pop("name", "t-bad")
    with pytest.raises((DataError, ConfigError)) as info:
        data.register_dataset(name, **kwargs)
    assert fragment in str(info.value)
    assert "t-bad" not in data_registry.DATASETS  # nothing half-registered


def test_a_bad_dataset_in_an_imported_module_is_one_cli_line(registries, tmp_path, monkeypatch,
                                                              capsys):
    (tmp_path / "user_baddata.py").write_text(
        "import torch\nfrom bigbatch import data\n"
        "data.register_dataset('b', train=(torch.rand(4, 1, 2, 2), torch.zeros(4).long()))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--import", "user_baddata", "--dataset", "b"]) == 2
    line = _error_line(capsys)
    assert "cannot import module 'user_baddata' (DataError: dataset 'b' train images" in line


# -- entry points and listings ---------------------------------------------------------------------
PLUGIN = '''
from torch import nn
from bigbatch import data, models
import torch

def register_data():
    x = torch.zeros(20, 1, 4, 4, dtype=torch.uint8)
    data.register_dataset("plugdata", train=(x, torch.arange(20) % 2),
                          val=(x[:4], torch.zeros(4).long()))

@models.register("plugnet", default_dataset="plugdata",
                 default_regime=models.registry.step_regime(1, 0.1, momentum=0.0, weight_decay=0.0))
def plugnet(*, num_classes, in_channels, image_size):
    """A plugin model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))
'''


def _install_plugin(site: Path, entry_points: str, source: str = PLUGIN) -> None:
    """A tiny installed distribution: a module and a dist-info with entry_points.txt."""
    (site / "plug_pkg.py").write_text(source, encoding="utf-8")
    info = site / "plug_pkg-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_points_load_once_when_a_name_is_not_found(registries, tmp_path, monkeypatch,
                                                         capsys):
    _install_plugin(tmp_path, "[bigbatch.models]\nplugnet = plug_pkg\n\n"
                              "[bigbatch.datasets]\nplugdata = plug_pkg:register_data\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    RunConfig(model="f1", dataset="synthetic")
    assert "plug_pkg" not in sys.modules  # known names never load plugins
    config = RunConfig(model="plugnet", dataset="plugdata")  # a miss loads both groups
    assert "plug_pkg" in sys.modules and config.model == "plugnet"
    assert data.get_info("plugdata").num_train == 20
    assert main(["models"]) == 0 and "plugnet" in capsys.readouterr().out
    assert main(["datasets"]) == 0
    assert "plugdata       2        1x4x4" in capsys.readouterr().out


def test_a_broken_entry_point_names_itself(registries, tmp_path, monkeypatch):
    _install_plugin(tmp_path, "[bigbatch.models]\nbroken = plug_pkg:nothing_here\n", "x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        models.create("not-a-model")
    message = str(info.value)
    assert "entry point 'broken' = 'plug_pkg:nothing_here' of plug-pkg" in message
    assert "AttributeError" in message and "fix or uninstall" in message
