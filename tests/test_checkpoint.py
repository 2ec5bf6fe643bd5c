"""Checkpoints: plain dicts that load with ``torch.load(weights_only=True)``, one-line errors."""

from __future__ import annotations

import pytest
import torch

from bigbatch.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_checkpoints_load_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()}, "updates": 3, "best": float("inf"),
        "config": {"model": "f1", "ghost_batch_size": None, "list": [1, 2.5, "x"]},
    }
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["updates"] == 3 and loaded["config"] == state["config"]
    torch.testing.assert_close(loaded["model"]["0.weight"], model[0].weight)
    again = load_checkpoint(tmp_path / "c.pt")
    opt.load_state_dict(again["optimizer"])


def test_non_plain_objects_are_refused_before_writing(tmp_path):
    import argparse

    with pytest.raises(TypeError, match=r"checkpoint\['args'\] holds a Namespace"):
        save_checkpoint(tmp_path / "c.pt", {"args": argparse.Namespace(lr=0.1)})
    assert not (tmp_path / "c.pt").exists()


def test_load_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
