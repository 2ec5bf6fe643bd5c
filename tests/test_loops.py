"""large_batch: the one call for people's own loops, against the step-by-step recipe it replaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigbatch
from bigbatch.errors import ConfigError
from bigbatch.recipes import adapt_regime, apply_settings, num_updates, updates_per_epoch

REGIME = {"epochs": 4, "schedule": "step", "phases": [
    {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    {"epoch": 2, "lr": 0.01}, {"epoch": 3, "lr": 0.001}]}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_large_batch_equals_the_recipe_done_by_hand():
    model, hand_model = _model(), _model()
    opt, hand_opt = _sgd(model), _sgd(hand_model)
    lb = bigbatch.large_batch(model, opt, REGIME, base_batch_size=8, batch_size=32,
                              dataset_size=100, warmup_epochs=2.0)
    # The way before large_batch: adapt_regime, count updates, apply_settings before each step.
    regime = adapt_regime(REGIME, 8, 32, "sqrt", True, warmup_epochs=2.0)
    upe = updates_per_epoch(100, 32)
    assert (lb.regime, lb.updates_per_epoch, lb.num_updates) == \
        (regime, upe, num_updates(regime, 100, 32)) == (regime, 4, 64)
    assert lb.clip_grad_norm == 5.0 and lb.model is model
    bigbatch.convert_ghost_batchnorm(hand_model, 8)
    gen = torch.Generator().manual_seed(3)
    for update in range(lb.num_updates):
        x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        apply_settings(hand_opt, regime.settings_at(update / upe))
        for m, o in ((model, opt), (hand_model, hand_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), lb.clip_grad_norm)
            o.step()
        lb.scheduler.step()
    for p, q in zip(model.parameters(), hand_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 * 2)  # the last phase, x sqrt(4)


def test_ghost_batch_norm_and_group_choices():
    model = _model()
    bn_params = list(model[1].parameters())
    others = [p for p in model.parameters() if all(p is not q for q in bn_params)]
    opt = torch.optim.SGD([{"params": others}, {"params": bn_params, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    lb = bigbatch.large_batch(model, opt, REGIME, base_batch_size=16, batch_size=64,
                              dataset_size=640)
    assert isinstance(lb.model[1], bigbatch.GhostBatchNorm1d)
    assert lb.model[1].ghost_batch_size == 16  # the base batch size, as in the paper
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.2)] * 2
    kept = bigbatch.large_batch(_model(), _sgd(nn.Linear(1, 1)), REGIME, base_batch_size=16,
                                batch_size=64, dataset_size=640, ghost_bn=False,
                                ghost_batch_size=4, clip_grad_norm=None)
    assert type(kept.model[1]) is nn.BatchNorm1d and kept.clip_grad_norm is None
    assert "number of updates" in lb.describe() and "40" in lb.describe()


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        bigbatch.large_batch(_model(), _sgd(_model()), REGIME, base_batch_size=8, batch_size=0,
                             dataset_size=10)
    with pytest.raises(ConfigError, match="unknown setting for Adam 'momentum'"):
        model = _model()
        bigbatch.large_batch(model, torch.optim.Adam(model.parameters()), REGIME,
                             base_batch_size=8, batch_size=32, dataset_size=10)
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        bigbatch.large_batch(_model(), _sgd(_model()), REGIME, base_batch_size=8, batch_size=32,
                             dataset_size=10, clip_grad_norm=0.0)
