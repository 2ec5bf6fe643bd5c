"""Regimes: validation, schedules, warm-up, serialisation, +LR and +RA adaptation."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bigbatch.errors import ConfigError
from bigbatch.recipes import (
    Regime,
    adapt_regime,
    format_adaptation_table,
    num_updates,
    updates_per_epoch,
)

PAPER_LIKE = {
    "optimizer": "SGD",
    "epochs": 5,
    "schedule": "step",
    "warmup_epochs": 0.0,
    "phases": [
        {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        {"epoch": 3, "lr": 0.01},
        {"epoch": 4, "lr": 0.001},
    ],
}


def paper_like(**changes) -> dict:
    d = copy.deepcopy(PAPER_LIKE)
    d.update(changes)
    return d


@st.composite
def regime_dicts(draw, *, schedules=("step", "cosine"), warmup=True, decreasing_lr=False):
    """Valid regime dicts: 1-4 phases at sorted epochs inside the run, settings inherited or not."""
    epochs = draw(st.one_of(st.integers(1, 300), st.floats(0.25, 300)))
    fractions = sorted(draw(st.lists(st.floats(0.001, 0.999), unique=True, max_size=3)))
    starts = [0.0] + [f * epochs for f in fractions]
    assume(all(b > a for a, b in zip(starts, starts[1:], strict=False)))
    lr0 = draw(st.floats(1e-4, 2.0))
    phases = [{"epoch": 0, "lr": lr0, "momentum": draw(st.sampled_from([0.0, 0.9])),
               "weight_decay": draw(st.floats(0, 1e-3))}]
    for i, start in enumerate(starts[1:], 1):
        phase = {"epoch": start}
        if decreasing_lr or draw(st.booleans()):
            # distinct lrs per phase (x0.1 per drop) let a test recognise the phase from the lr
            phase["lr"] = lr0 * 0.1**i if decreasing_lr else draw(st.floats(1e-5, 1.0))
        if draw(st.booleans()):
            phase["momentum"] = draw(st.floats(0, 0.99))
        phases.append(phase)
    d = {"optimizer": "SGD", "epochs": epochs, "schedule": draw(st.sampled_from(schedules)),
         "phases": phases}
    if warmup and draw(st.booleans()):
        d["warmup_epochs"] = draw(st.floats(0, 1)) * epochs
        d["warmup_start_factor"] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        d["optimizer_options"] = {"nesterov": draw(st.booleans()), "dampening": 0.0}
    return d


# -- construction and validation ------------------------------------------------------------------
def test_from_dict_reads_the_contract_format():
    r = Regime.from_dict(PAPER_LIKE)
    assert r.epochs == 5.0 and r.optimizer == "SGD" and r.schedule == "step"
    assert r.milestones == (3.0, 4.0)
    assert r.phases[1] == {"epoch": 3.0, "lr": 0.01}
    assert r.optimizer_options == {}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epoch": 5}, r"unknown key 'epoch'; did you mean 'epochs'\?"),
        ({"phases": []}, r"phases must not be empty"),
        ({"phases": {"epoch": 0, "lr": 0.1}}, r"phases must be a list of tables, got dict"),
        ({"phases": [{"lr": 0.1}]}, r"phases\[0\] needs 'epoch'"),
        ({"phases": [{"epoch": 1, "lr": 0.1}]}, r"phases\[0\]\.epoch must be 0"),
        ({"phases": [{"epoch": 0, "momentum": 0.9}]}, r"phases\[0\] must set 'lr'"),
        ({"phases": [{"epoch": 0, "lr": 0.1}, {"epoch": 3, "lr": 0.1}, {"epoch": 2, "lr": 0.1}]},
         r"phases\[2\]\.epoch \(2\) must be greater than phases\[1\]\.epoch \(3\)"),
        ({"phases": [{"epoch": 0, "lr": 0.1}, {"epoch": 5, "lr": 0.01}]},
         r"phases\[1\]\.epoch \(5\) must be less than epochs \(5\)"),
        ({"phases": [{"epoch": 0, "lr": 0.1, "momentun": 0.9}]},
         r"phases\[0\]: unknown setting for SGD 'momentun'; did you mean 'momentum'\?"),
        ({"phases": [{"epoch": 0, "lr": -0.1}]}, r"phases\[0\]\.lr must be >= 0, got -0\.1"),
        ({"phases": [{"epoch": 0, "lr": "1e-4"}]}, r"phases\[0\]\.lr must be a finite num.*YAML"),
        ({"phases": [{"epoch": 0, "lr": 0.1, "momentum": float("nan")}]},
         r"phases\[0\]\.momentum must be a finite number, got nan"),
        ({"phases": [{"epoch": 0, "lr": 0.1, "momentum": None}]},
         r"phases\[0\]\.momentum must be a number, bool, string or list of numbers, got NoneType"),
        ({"epochs": 0}, r"epochs must be > 0, got 0"),
        ({"epochs": float("inf")}, r"epochs must be a finite number, got inf"),
        ({"epochs": True}, r"epochs must be a finite number, got True"),
        ({"schedule": "cosin"}, r"unknown schedule 'cosin'; did you mean 'cosine'\?"),
        ({"optimizer": "SDG"}, r"unknown optimizer 'SDG'; did you mean 'SGD'\?"),
        ({"optimizer": "Optimizer"}, r"unknown optimizer 'Optimizer'"),
        ({"optimizer": "lr_scheduler"}, r"unknown optimizer 'lr_scheduler'"),
        ({"warmup_epochs": 6}, r"warmup_epochs \(6\) must not exceed epochs \(5\)"),
        ({"warmup_epochs": -1}, r"warmup_epochs must be >= 0"),
        ({"warmup_start_factor": 2}, r"warmup_start_factor must be in \[0, 1\], got 2"),
        ({"optimizer_options": {"nesterof": True}},
         r"optimizer_options: unknown setting for SGD 'nesterof'; did you mean 'nesterov'\?"),
        ({"optimizer_options": {"momentum": 0.5}}, r"'momentum' is both a phase setting and an "),
        ({"optimizer_options": [1]}, r"optimizer_options must be a table"),
    ],
)
def test_validation_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        Regime.from_dict(paper_like(**change))


def test_missing_keys_and_non_mapping():
    with pytest.raises(ConfigError, match=r"missing key 'phases'"):
        Regime.from_dict({"epochs": 5})
    with pytest.raises(ConfigError, match=r"missing key 'epochs'"):
        Regime.from_dict({"phases": [{"epoch": 0, "lr": 0.1}]})
    with pytest.raises(ConfigError, match=r"must be a table of keys, got list"):
        Regime.from_dict([1, 2])


def test_settings_are_checked_against_the_chosen_optimizer():
    adam = {"optimizer": "Adam", "epochs": 2,
            "phases": [{"epoch": 0, "lr": 1e-3, "betas": [0.9, 0.99]}]}
    assert Regime.from_dict(adam).phases[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"unknown setting for SGD 'betas'"):
        Regime.from_dict({**adam, "optimizer": "SGD"})


def test_direct_construction_validates_and_is_immutable():
    with pytest.raises(ConfigError, match=r"phases\[0\] must set 'lr'"):
        Regime(phases=({"epoch": 0},), epochs=3)
    r = Regime(phases=[{"epoch": 0, "lr": 0.1}], epochs=3)
    assert isinstance(r.phases, tuple)
    with pytest.raises(TypeError, match="read-only"):
        r.phases[0]["lr"] = 1.0
    with pytest.raises(TypeError, match="read-only"):
        r.optimizer_options.update(nesterov=True)
    with pytest.raises(AttributeError):
        r.epochs = 4  # frozen dataclass


def test_regime_pickles_copies_and_hashes():
    r = Regime.from_dict(paper_like(optimizer_options={"nesterov": True}))
    assert pickle.loads(pickle.dumps(r)) == r
    assert copy.deepcopy(r) == r
    assert hash(r) == hash(Regime.from_dict(r.to_dict()))


# -- serialisation --------------------------------------------------------------------------------
@given(d=regime_dicts())
def test_dict_toml_yaml_round_trips(d):
    r = Regime.from_dict(d)
    assert Regime.from_dict(r.to_dict()) == r
    assert Regime.from_toml(r.to_toml()) == r
    assert Regime.from_yaml(r.to_yaml()) == r


def test_to_dict_is_plain_data_with_whole_epochs_as_ints():
    d = Regime.from_dict(paper_like(optimizer_options={"nesterov": True})).to_dict()
    assert type(d["phases"][0]) is dict and type(d["optimizer_options"]) is dict
    assert d["epochs"] == 5 and isinstance(d["epochs"], int)
    assert d["phases"][1] == {"epoch": 3, "lr": 0.01}
    assert "{ epoch = 3, lr = 0.01 }" in Regime.from_dict(d).to_toml()  # a line per phase


def test_parse_errors_are_config_errors():
    with pytest.raises(ConfigError, match="invalid TOML regime"):
        Regime.from_toml("epochs = = 3")
    with pytest.raises(ConfigError, match="invalid YAML regime"):
        Regime.from_yaml("epochs: [3")
    with pytest.raises(ConfigError, match=r"unknown key 'epoc'"):
        Regime.from_toml("epoc = 3")
    # YAML 1.1 reads 1e-4 (no dot) as a string; the message says so.
    with pytest.raises(ConfigError, match=r"phases\[0\]\.lr .*YAML 1\.1 reads 1e-4 as a string"):
        Regime.from_yaml("epochs: 3\nphases:\n  - {epoch: 0, lr: 1e-4}\n")


# -- schedules ------------------------------------------------------------------------------------
def test_step_schedule_and_inheritance():
    r = Regime.from_dict(paper_like())
    assert r.settings_at(0) == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    assert r.settings_at(2.999)["lr"] == 0.1
    assert r.settings_at(3.0) == {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    assert r.settings_at(4.5)["lr"] == 0.001
    assert r.settings_at(5.0)["lr"] == r.settings_at(50.0)["lr"] == 0.001  # past the end
    r2 = Regime.from_dict(paper_like(phases=[{"epoch": 0, "lr": 0.1, "momentum": 0.9},
                                             {"epoch": 1, "momentum": 0.5},
                                             {"epoch": 2, "lr": 0.2}]))
    assert r2.settings_at(1.5) == {"lr": 0.1, "momentum": 0.5}
    assert r2.settings_at(2.5) == {"lr": 0.2, "momentum": 0.5}


def test_lr_at_given_updates():
    # 1000 samples, batch 100 -> 10 updates per epoch; drops after updates 30 and 40.
    r = Regime.from_dict(paper_like())
    upe = updates_per_epoch(1000, 100)
    lrs = [r.settings_at(k / upe)["lr"] for k in range(num_updates(r, 1000, 100))]
    assert lrs == [0.1] * 30 + [0.01] * 10 + [0.001] * 10


def test_milestone_on_an_update_boundary_is_not_late():
    # 0.1 * 3 != 0.3 in floats; the phase must still start exactly at update 3 of 10 per epoch.
    r = Regime.from_dict({"epochs": 1,
                          "phases": [{"epoch": 0, "lr": 1.0}, {"epoch": 0.1 * 3, "lr": 0.5}]})
    assert [r.settings_at(k / 10)["lr"] for k in range(5)] == [1.0, 1.0, 1.0, 0.5, 0.5]


def test_cosine_anneals_phase0_lr_and_keeps_other_settings():
    r = Regime.from_dict(paper_like(schedule="cosine", phases=[
        {"epoch": 0, "lr": 0.1, "momentum": 0.9}, {"epoch": 3, "lr": 123.0, "momentum": 0.5}]))
    assert r.settings_at(0)["lr"] == pytest.approx(0.1)
    assert r.settings_at(2.5)["lr"] == pytest.approx(0.05)
    assert r.settings_at(5)["lr"] == pytest.approx(0.0, abs=1e-15)
    assert r.settings_at(7)["lr"] == pytest.approx(0.0, abs=1e-15)
    assert r.settings_at(4) == pytest.approx({"lr": 0.1 * (1 + math.cos(math.pi * 0.8)) / 2,
                                              "momentum": 0.5})  # later lr ignored, momentum kept
    lrs = [r.settings_at(e / 10)["lr"] for e in range(51)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


@given(d=regime_dicts(warmup=False), warmup_fraction=st.floats(0.01, 1), start=st.floats(0, 1))
def test_warmup_is_a_continuous_monotone_ramp(d, warmup_fraction, start):
    plain = Regime.from_dict({**d, "schedule": "step"})
    warm = Regime.from_dict({**d, "schedule": "step", "warmup_start_factor": start,
                             "warmup_epochs": warmup_fraction * d["epochs"]})
    w = warm.warmup_epochs
    assume(plain.milestones == () or plain.milestones[0] >= w)  # one phase during warm-up
    target = plain.settings_at(0)["lr"]
    assert warm.settings_at(0)["lr"] == pytest.approx(start * target)
    grid = [w * k / 64 for k in range(65)]
    lrs = [warm.settings_at(e)["lr"] for e in grid]
    assert all(b >= a for a, b in zip(lrs, lrs[1:], strict=False))  # monotone ramp
    assert lrs[-1] == pytest.approx(target)  # reaches the target at the end of warm-up
    left = warm.settings_at(max(0.0, w * (1 - 1e-9)))["lr"]
    assert left == pytest.approx(target, rel=1e-6)  # continuous at the end
    half = warm.settings_at(w / 2)["lr"]
    assert half == pytest.approx(target * (start + 1) / 2)  # linear
    later = w + 0.5 * (d["epochs"] - w)
    assert warm.settings_at(later) == plain.settings_at(later)  # no effect after warm-up


def test_warmup_multiplies_the_cosine_schedule():
    r = Regime.from_dict(paper_like(schedule="cosine", warmup_epochs=1, warmup_start_factor=0.0,
                                    phases=[{"epoch": 0, "lr": 0.1}]))
    cosine = 0.1 * (1 + math.cos(math.pi * 0.5 / 5)) / 2
    assert r.settings_at(0.5)["lr"] == pytest.approx(0.5 * cosine)
    assert r.settings_at(0)["lr"] == 0.0


@pytest.mark.parametrize("epoch", [-0.5, float("nan"), float("inf"), "1"])
def test_settings_at_rejects_bad_epochs(epoch):
    with pytest.raises(ValueError, match="epoch must be a finite number >= 0"):
        Regime.from_dict(PAPER_LIKE).settings_at(epoch)


# -- epochs, updates ------------------------------------------------------------------------------
def test_with_epochs_and_scale_epochs():
    r = Regime.from_dict(paper_like(warmup_epochs=1))
    assert r.with_epochs(10).milestones == (6.0, 8.0)
    assert r.with_epochs(10).warmup_epochs == 2.0
    assert r.with_epochs(10).epochs == 10.0
    s = r.scale_epochs(32)
    assert (s.epochs, s.milestones, s.warmup_epochs) == (160.0, (96.0, 128.0), 32.0)
    assert s.phases[1]["lr"] == 0.01
    assert r.with_epochs(5) == r
    with pytest.raises(ConfigError, match="epoch factor must be > 0"):
        r.scale_epochs(0)


def test_update_counts():
    assert updates_per_epoch(50000, 4096) == 13
    assert updates_per_epoch(50000, 128) == 391
    assert updates_per_epoch(4096, 4096) == 1
    one_phase = [{"epoch": 0, "lr": 0.1}]
    assert num_updates(Regime.from_dict({"epochs": 2.5, "phases": one_phase}), 1000, 100) == 25
    assert num_updates(Regime.from_dict({"epochs": 0.05, "phases": one_phase}), 1000, 100) == 1
    assert num_updates(Regime.from_dict({"epochs": 0.25, "phases": one_phase}), 1000, 100) == 3
    with pytest.raises(ConfigError, match="dataset_size must be a positive integer, got 0"):
        updates_per_epoch(0, 128)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        updates_per_epoch(100, 0)


# -- adaptation -----------------------------------------------------------------------------------
def _first_update_of_phase(regime: Regime, phase: int, upe: int, total: int) -> int:
    """Smallest update k whose lr is that of `phase` (phases carry decreasing lrs x0.1)."""
    threshold = regime.phases[phase]["lr"] * 1.001
    lo, hi = 0, total + upe * 1000
    while lo < hi:
        mid = (lo + hi) // 2
        if regime.settings_at(mid / upe)["lr"] <= threshold:
            hi = mid
        else:
            lo = mid + 1
    return lo


@given(
    d=regime_dicts(schedules=("step",), warmup=False, decreasing_lr=True),
    dataset_size=st.integers(1, 200_000),
    base=st.sampled_from([32, 64, 100, 128, 256]),
    ratio=st.one_of(st.integers(1, 64), st.floats(0.1, 64)),
)
def test_adaptation_keeps_the_number_of_updates(d, dataset_size, base, ratio):
    batch = max(1, round(base * ratio))
    r = Regime.from_dict(d)
    a = adapt_regime(r, base, batch, "sqrt", True)
    # Derivation: updates = E * ceil(N / B) and ceil(N / B) = (N + r_B) / B with r_B = (-N) mod B,
    # so adapted - base = E*B/B0 * (N + r_B)/B - E*(N + r_B0)/B0 = E * (r_B - r_B0) / B0, before
    # each count is rounded to an integer (at most 1/2 each).
    r_b, r_b0 = -dataset_size % batch, -dataset_size % base
    for epochs in (r.epochs, *r.milestones):
        bound = epochs * (r_b - r_b0) / base
        assert abs(bound) <= epochs * max(r_b, r_b0) / base
    diff = num_updates(a, dataset_size, batch) - num_updates(r, dataset_size, base)
    assert abs(diff - r.epochs * (r_b - r_b0) / base) <= 1 + 1e-9
    if r_b == 0 and r_b0 == 0:
        assert diff == 0
    # Milestones land on the same update, up to the same rounding.
    upe_b, upe_b0 = updates_per_epoch(dataset_size, batch), updates_per_epoch(dataset_size, base)
    for i, m in enumerate(r.milestones, 1):
        k_a = _first_update_of_phase(a, i, upe_b, num_updates(a, dataset_size, batch))
        k_r = _first_update_of_phase(r, i, upe_b0, num_updates(r, dataset_size, base))
        assert abs(k_a - k_r - m * (r_b - r_b0) / base) <= 1 + 1e-9
        if r_b == 0 and r_b0 == 0:
            assert k_a == k_r


@given(d=regime_dicts(), base=st.integers(1, 512), batch=st.integers(1, 8192),
       rule=st.sampled_from(["sqrt", "linear", "none"]),
       ra=st.one_of(st.booleans(), st.floats(0.1, 10)))
def test_adaptation_scales_lr_and_epochs_and_never_mutates(d, base, batch, rule, ra):
    frozen = copy.deepcopy(d)
    r = Regime.from_dict(d)
    a = adapt_regime(d, base, batch, lr_scaling=rule, regime_adaptation=ra)
    assert d == frozen  # the dict was only read
    assert a == adapt_regime(r, base, batch, lr_scaling=rule, regime_adaptation=ra)
    assert Regime.from_dict(d) == r  # nor was the regime changed
    lr_factor = {"sqrt": math.sqrt(batch / base), "linear": batch / base, "none": 1.0}[rule]
    epoch_factor = (batch / base if ra else 1.0) if isinstance(ra, bool) else ra
    assert a.epochs == pytest.approx(r.epochs * epoch_factor)
    assert a.milestones == pytest.approx([m * epoch_factor for m in r.milestones])
    assert a.warmup_epochs == pytest.approx(r.warmup_epochs * epoch_factor)
    for p_a, p_r in zip(a.phases, r.phases, strict=True):
        assert p_a.keys() == p_r.keys()
        if "lr" in p_r:
            assert p_a["lr"] == pytest.approx(p_r["lr"] * lr_factor)
        assert {k: v for k, v in p_a.items() if k not in ("lr", "epoch")} == \
            {k: v for k, v in p_r.items() if k not in ("lr", "epoch")}
    assert (a.optimizer, a.schedule, a.optimizer_options) == (r.optimizer, r.schedule,
                                                              r.optimizer_options)


def test_adaptation_paper_example():
    a = adapt_regime(PAPER_LIKE, 128, 4096)
    assert a.epochs == 160.0 and a.milestones == (96.0, 128.0)
    assert a.phases[0]["lr"] == pytest.approx(0.1 * math.sqrt(32))
    assert a.phases[2]["lr"] == pytest.approx(0.001 * math.sqrt(32))
    b = adapt_regime(PAPER_LIKE, 128, 4096, "linear", regime_adaptation=False)
    assert b.epochs == 5.0 and b.phases[0]["lr"] == pytest.approx(3.2)
    c = adapt_regime(PAPER_LIKE, 128, 4096, "none", regime_adaptation=2.5)
    assert c.milestones == (7.5, 10.0) and c.phases[0]["lr"] == 0.1


def test_adaptation_warmup_starts_at_the_small_batch_lr():
    # Goyal et al.: ramp from the small-batch lr (0.1) to the scaled lr (0.1 * sqrt(4) = 0.2).
    a = adapt_regime(PAPER_LIKE, 128, 512, "sqrt", True, warmup_epochs=2)
    assert a.warmup_epochs == 2.0 and a.warmup_start_factor == pytest.approx(0.5)
    assert a.settings_at(0)["lr"] == pytest.approx(0.1)
    assert a.settings_at(1)["lr"] == pytest.approx(0.15)
    assert a.settings_at(2)["lr"] == pytest.approx(0.2)
    # Without scaling up there is nothing to bridge: the ramp is flat.
    flat = adapt_regime(PAPER_LIKE, 128, 512, "none", True, warmup_epochs=2)
    assert flat.settings_at(0)["lr"] == flat.settings_at(3)["lr"] == 0.1
    # warmup_epochs=0 keeps (and stretches) the input's own warm-up.
    own = Regime.from_dict(paper_like(warmup_epochs=1, warmup_start_factor=0.25))
    kept = adapt_regime(own, 128, 512)
    assert (kept.warmup_epochs, kept.warmup_start_factor) == (4.0, 0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_scaling": "cube"}, r"unknown lr scaling rule 'cube'"),
        ({"regime_adaptation": 0.0}, r"regime_adaptation must be > 0"),
        ({"regime_adaptation": "yes"}, r"regime_adaptation must be a finite number"),
        ({"warmup_epochs": -1.0}, r"warmup_epochs must be >= 0"),
        ({"warmup_epochs": 500.0}, r"warmup_epochs \(500\) must not exceed epochs \(20\)"),
    ],
)
def test_adaptation_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        adapt_regime(PAPER_LIKE, 128, 512, **kwargs)


def test_adaptation_table():
    base = Regime.from_dict(PAPER_LIKE)
    table = format_adaptation_table(base, adapt_regime(base, 128, 4096, warmup_epochs=5),
                                    base_batch_size=128, batch_size=4096, dataset_size=16384)
    rows = {line[:19].strip(): line[19:].split() for line in table.splitlines()[1:]}
    assert rows["batch size"] == ["128", "4096"]
    assert rows["epochs"] == ["5", "160"]
    assert rows["milestones"] == ["3,", "4", "96,", "128"]
    assert rows["updates per epoch"] == ["128", "4"]
    assert rows["number of updates"] == ["640", "640"]
    assert rows["samples processed"] == [str(5 * 16384), str(160 * 16384)]
    assert rows["lr, phase 1"][:3] == ["0.1", "@", "ep"] and rows["lr, phase 1"][4] == "0.565685"
    assert "5 ep from x0.177" in table
    # The last epoch's partial batch counts its real samples: 3 updates of 1000 samples at B = 400.
    one = Regime.from_dict({"epochs": 1, "phases": [{"epoch": 0, "lr": 0.1}]})
    small = format_adaptation_table(one, one, base_batch_size=400, batch_size=400,
                                    dataset_size=1000)
    assert "samples processed  1000" in small
