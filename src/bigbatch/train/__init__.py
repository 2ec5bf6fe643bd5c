"""The training engine: run config, the loop, checkpoints and metrics writers.

Example:
    >>> from bigbatch.train import RunConfig
    >>> cfg = RunConfig(model="f1", dataset="synthetic", batch_size=512, ghost_batch_size=128)
    >>> cfg.ghost_batch_size
    128
"""

from __future__ import annotations

from bigbatch.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from bigbatch.train.checkpoint import load_checkpoint, save_checkpoint
from bigbatch.train.config import RunConfig, load_config, merge_config, resolve_regime
from bigbatch.train.loop import evaluate, forward_backward, train

__all__ = [
    "RunConfig",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "evaluate",
    "forward_backward",
    "load_checkpoint",
    "load_config",
    "merge_config",
    "resolve_regime",
    "save_checkpoint",
    "train",
]
