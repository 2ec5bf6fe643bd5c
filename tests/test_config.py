"""RunConfig: validation messages, TOML/YAML files, flags over file, resolve_regime."""

from __future__ import annotations

import math

import pytest

from bigbatch.errors import ConfigError
from bigbatch.train.config import (
    RunConfig,
    load_config,
    merge_config,
    read_config_file,
    resolve_regime,
)

SMALL_REGIME = {
    "epochs": 4,
    "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9}, {"epoch": 2, "lr": 0.01}],
}


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert cfg.model == "f1" and cfg.batch_size == 128 and cfg.regime_adaptation is False
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_suggests_the_close_one():
    expected = r"unknown config key 'batch_sise'; did you mean 'batch_size'"
    with pytest.raises(ConfigError, match=expected):
        RunConfig.from_dict({"batch_sise": 256})
    with pytest.raises(ConfigError, match="allowed keys"):
        RunConfig.from_dict({"zzz": 1})


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("batch_size", 0, "an integer >= 1"),
        ("batch_size", "128", "an integer >= 1"),
        ("batch_size", True, "an integer >= 1"),
        ("ghost_batch_size", 1, "an integer >= 2 or none"),
        ("lr_scaling", "cube", "one of 'none', 'sqrt', 'linear'"),
        ("regime_adaptation", -2.0, "a factor > 0"),
        ("warmup_epochs", -1, "a number >= 0"),
        ("epochs", 0, "a number > 0 or none"),
        ("clip", math.nan, "a number > 0 or none"),
        ("on_nonfinite", "ignore", "one of 'stop', 'skip'"),
        ("amp", "fp8", "one of none, 'bf16'"),
        ("progress", "loud", "one of 'auto'"),
        ("device", "tpu", "'auto', 'cpu', 'cuda'"),
        ("download", "yes", "true or false"),
        ("channels_last", "maybe", "'auto', true or false"),
        ("model_options", [1], "a table of keyword options"),
    ],
)
def test_invalid_values_name_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({key: value})
    message = str(info.value)
    assert repr(key) in message and repr(value) in message and allowed in message


def test_numbers_are_normalised():
    d = {"batch_size": 256.0, "regime_adaptation": 4, "epochs": 3, "amp": "none"}
    cfg = RunConfig.from_dict(d)
    assert cfg.batch_size == 256 and isinstance(cfg.batch_size, int)
    assert cfg.regime_adaptation == 4.0 and isinstance(cfg.regime_adaptation, float)
    assert cfg.epochs == 3.0 and cfg.amp is None


def test_cross_field_rules_have_one_clear_message_each():
    with pytest.raises(ConfigError, match=r"ghost_batch_size=256 is larger than batch_size=128"):
        RunConfig(batch_size=128, ghost_batch_size=256)
    with pytest.raises(ConfigError, match=r"micro_batch_size=96 is not a multiple of ghost_batch"):
        RunConfig(batch_size=512, ghost_batch_size=64, micro_batch_size=96)
    with pytest.raises(ConfigError, match=r"micro_batch_size=1024 is larger than batch_size=512"):
        RunConfig(batch_size=512, micro_batch_size=1024)
    RunConfig(batch_size=512, ghost_batch_size=64, micro_batch_size=128)  # aligned: fine


def test_model_and_dataset_names_are_checked_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet45'.*did you mean 'resnet44'"):
        RunConfig(model="resnet45")
    with pytest.raises(ConfigError, match=r"unknown dataset 'fashion_mnist'.*mean 'fashion-mnist'"):
        RunConfig(dataset="fashion_mnist")


def test_bad_regime_is_reported_under_the_regime_key():
    with pytest.raises(ConfigError, match=r"^regime: "):
        RunConfig(regime={"epochs": 3, "phases": [{"epoch": 0}]})


def test_toml_and_yaml_files_load_as_data(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'model = "f1"\ndataset = "synthetic"\nbatch_size = 512\nghost_batch_size = 128\n'
        '[model_options]\nhidden = 32\n[regime]\nepochs = 4\n'
        '[[regime.phases]]\nepoch = 0\nlr = 0.1\n'
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        "model: f1\ndataset: synthetic\nbatch_size: 512\nghost_batch_size: 128\n"
        "model_options: {hidden: 32}\nregime: {epochs: 4, phases: [{epoch: 0, lr: 0.1}]}\n"
    )
    a, b = load_config(toml), load_config(yaml)
    assert a == b
    assert a.model_options == {"hidden": 32} and a.regime["phases"][0]["lr"] == 0.1


def test_yaml_is_never_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="cannot parse config file"):
        load_config(path)


def test_file_errors_are_config_errors_with_the_file_name(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="cannot parse config file.*bad.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"must end in \.toml"):
        load_config(tmp_path / "run.json")
    typo = tmp_path / "typo.toml"
    typo.write_text("bach_size = 3\n")
    with pytest.raises(ConfigError, match=r"typo.toml: unknown config key 'bach_size'"):
        load_config(typo)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\nbatch_size = 512\nseed = 3\n')
    cfg = merge_config(read_config_file(path), {"batch_size": 1024, "seed": None})
    assert cfg.batch_size == 1024  # flag wins
    assert cfg.seed == 3  # flag not given (None): the file's value stays
    assert cfg.dataset == "synthetic"


def test_to_toml_round_trips_and_load_config_drops_the_resolved_table(tmp_path):
    cfg = RunConfig(dataset="synthetic", batch_size=512, ghost_batch_size=128, regime=SMALL_REGIME,
                    model_options={"hidden": 32}, regime_adaptation=2.5, epochs=2)
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml(extra={"resolved": {"num_updates": 7}}))
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="written by the engine"):
        RunConfig.from_dict({"resolved": {}})


def test_resolve_regime_applies_epochs_then_adaptation():
    cfg = RunConfig(dataset="synthetic", regime=SMALL_REGIME, epochs=2, batch_size=512,
                    base_batch_size=128, lr_scaling="sqrt", regime_adaptation=True)
    base, effective = resolve_regime(cfg, dataset_size=2048)
    assert base.epochs == 2 and base.milestones == (1.0,)  # 4 -> 2 epochs: milestone 2 -> 1
    assert effective.epochs == 8 and effective.milestones == (4.0,)  # x B/B0 = 4
    assert effective.phases[0]["lr"] == pytest.approx(0.2)  # 0.1 * sqrt(4)
    assert cfg.regime["epochs"] == 4  # the config is not mutated


def test_resolve_regime_defaults_to_the_models_regime():
    from bigbatch import models

    cfg = RunConfig(model="f1", dataset="synthetic")
    base, effective = resolve_regime(cfg, dataset_size=2048)
    assert base.to_dict()["phases"] == models.get_spec("f1").default_regime["phases"]
    assert effective.to_dict()["phases"] == base.to_dict()["phases"]  # B == B0, no scaling


def test_resolve_regime_factor_and_warmup():
    cfg = RunConfig(dataset="synthetic", regime=SMALL_REGIME, batch_size=1024, lr_scaling="linear",
                    regime_adaptation=3.0, warmup_epochs=1.0)
    _, effective = resolve_regime(cfg, dataset_size=2048)
    assert effective.epochs == 12 and effective.warmup_epochs == 1.0
    assert effective.settings_at(0.0)["lr"] < effective.settings_at(1.0)["lr"] == pytest.approx(0.8)


# -- keys equal the flags, one declaration per key ------------------------------------------------
def test_every_key_is_declared_once_with_its_kind_and_help():
    from bigbatch.train.config import config_keys

    keys = config_keys()
    assert list(keys) == [f.name for f in __import__("dataclasses").fields(RunConfig)]
    for name, spec in keys.items():
        assert spec.help and spec.kind, name
        assert f"{name}: {spec.help}" in RunConfig.__doc__  # the docstring is built from them


def test_resume_free_keys_come_from_the_declarations():
    from bigbatch.train.config import RESUME_FREE_KEYS
    from bigbatch.train.rundir import RESUME_FREE_KEYS as seen_by_rundir

    assert seen_by_rundir is RESUME_FREE_KEYS
    assert {"device", "progress", "out", "eval_batch_size"} <= RESUME_FREE_KEYS
    assert not {"batch_size", "seed", "clip", "regime", "ghost_batch_size"} & RESUME_FREE_KEYS


def test_a_config_file_takes_the_flags_names(tmp_path):
    (tmp_path / "regimes").mkdir()
    (tmp_path / "regimes" / "short.toml").write_text(
        "epochs = 4\n[[phases]]\nepoch = 0\nlr = 0.1\n[[phases]]\nepoch = 2\nlr = 0.01\n")
    path = tmp_path / "run.toml"
    path.write_text('dataset = "synthetic"\nout = "runs/x"\nclip = 5\neval_every = 10\n'
                    'regime_adaptation = 2.0\nregime = "regimes/short.toml"\n')
    cfg = load_config(path)  # the regime file is found relative to the config file
    assert (cfg.out, cfg.clip, cfg.eval_every, cfg.regime_adaptation) == ("runs/x", 5.0, 10, 2.0)
    assert cfg.regime == SMALL_REGIME | {"phases": [{"epoch": 0, "lr": 0.1},
                                                    {"epoch": 2, "lr": 0.01}]}


def test_old_key_names_are_read_with_a_deprecation_line(caplog):
    with caplog.at_level("WARNING", logger="bigbatch"):
        cfg = RunConfig.from_dict({"dataset": "synthetic", "clip_grad_norm": 5.0,
                                   "eval_every_updates": 3})
    assert cfg.clip == 5.0 and cfg.eval_every == 3
    messages = [r.getMessage() for r in caplog.records]
    assert ("config key 'clip_grad_norm' is deprecated (read this time); rename it 'clip'"
            in messages)
    assert any("'eval_every_updates' is deprecated" in m for m in messages)
    with pytest.raises(ConfigError, match="both 'clip_grad_norm' and 'clip' are set"):
        RunConfig.from_dict({"clip_grad_norm": 5.0, "clip": 1.0})
    caplog.clear()
    RunConfig.from_dict({"clip": 5.0})  # the new name: no message
    assert not caplog.records


def test_the_readme_lists_every_key():
    from pathlib import Path

    from bigbatch.train.config import config_keys

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert [k for k in config_keys() if f"`{k}`" not in readme] == []
