"""A finished run, back in Python: :func:`load_model` and :func:`evaluate_run` (``bigbatch eval``).

A run directory rebuilds its model alone: ``config.toml`` says which model, options, dataset
shape and ghost batch size; ``checkpoints/best.pt`` (the best validation error) or ``last.pt``
(the end of training) holds the weights, read with ``torch.load(weights_only=True)``.

Example:
    >>> import bigbatch
    >>> model = bigbatch.load_model("runs/demo/lb-lr-gbn-ra/seed0")  # doctest: +SKIP
    >>> model.training  # doctest: +SKIP
    False
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from bigbatch.errors import ConfigError

__all__ = ["checkpoint_path", "evaluate_run", "load_model"]

_CHECKPOINTS = ("best", "last")


def checkpoint_path(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """``run_dir/checkpoints/<checkpoint>.pt``; ``"best"`` falls back to ``last.pt`` when a run has
    no ``best.pt`` (e.g. no evaluation improved on the first).

    Raises:
        ConfigError: an unknown ``checkpoint`` name, or no checkpoint in ``run_dir``.
    """
    if checkpoint not in _CHECKPOINTS:
        raise ConfigError(f"checkpoint must be one of {list(_CHECKPOINTS)}, got {checkpoint!r}")
    folder = Path(run_dir) / "checkpoints"
    for name in (checkpoint, "last"):
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    raise ConfigError(f"{str(run_dir)!r} has no checkpoint ({folder}/{checkpoint}.pt not found); "
                      "is it a bigbatch run directory that has evaluated at least once?")


def _run_config(run_dir: str | Path) -> Any:
    from bigbatch.train.config import load_config

    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a bigbatch run directory ({path} not found)")
    return load_config(path)


def load_model(run_dir: str | Path, checkpoint: str = "best") -> nn.Module:
    """The trained model of a run directory, on the CPU, in eval mode.

    Args:
        run_dir: a ``bigbatch train`` run directory.
        checkpoint: ``"best"`` (lowest validation error; ``last.pt`` if absent) or ``"last"``.

    Returns:
        The model as the run built it (ghost batch norm layers included, if it used them), with
        the checkpoint's weights and running statistics.

    Raises:
        ConfigError: not a run directory, no checkpoint, or weights that do not fit.
    """
    return _trained(run_dir, checkpoint)[1]


def _trained(run_dir: str | Path, checkpoint: str) -> tuple[Any, nn.Module, Path, dict[str, Any]]:
    """``(config, model in eval mode, checkpoint path, checkpoint)``, each file read once."""
    from bigbatch import data
    from bigbatch.train.build import build_model, load_weights

    config = _run_config(run_dir)
    model = build_model(config.replace(init_from=None), data.get_info(config.dataset))
    path = checkpoint_path(run_dir, checkpoint)
    state = load_weights(model, path)
    return config, model.eval(), path, state


def evaluate_run(
    run_dir: str | Path, *, split: str | None = None, checkpoint: str = "best",
    device: str = "auto", data_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint: loss and top-1 (top-5) error on its validation or test split.

    Args:
        run_dir: a run directory.
        split: ``"val"`` (what the run validated on: its ``held_out`` samples, else the test
            set), ``"test"`` (the test set), or ``None`` for ``"val"``.
        checkpoint: ``"best"`` or ``"last"``.
        device: where to evaluate.
        data_dir: the dataset directory (default: the run's).

    Returns:
        ``{"checkpoint", "split", "samples", "updates", "val_loss", "val_error_pct", ...}``.
    """
    from bigbatch import data, distributed
    from bigbatch.train.evaluation import evaluate

    split = split or "val"
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}")
    config, model, path, state = _trained(run_dir, checkpoint)
    device_ = distributed.setup(device).device  # outside torchrun: resolves, starts nothing
    _, loader, info = data.build_loaders(
        config.dataset, data_dir=data_dir or config.data_dir, batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size, device=device_, seed=config.seed,
        train_subset=config.train_subset, held_out=config.held_out if split == "val" else 0,
        num_workers=config.num_workers,
    )
    metrics = evaluate(model.to(device_), loader.iterate(0), num_classes=info.num_classes)
    return {"checkpoint": path.name, "split": split, "samples": int(loader.num_samples),
            "updates": state.get("updates"), **metrics}
