"""The training engine: run config, the loop, checkpoints and metrics writers.

Example:
    >>> from bigbatch.train import RunConfig
    >>> cfg = RunConfig(model="f1", dataset="synthetic", batch_size=512, ghost_batch_size=128)
    >>> cfg.ghost_batch_size
    128
"""

from __future__ import annotations

from bigbatch._lazy import lazy_getattr

# Each public name and its module, imported on first use: `bigbatch --help` and the config code
# read `bigbatch.train.config` without importing torch (which the loop and checkpoints need).
_EXPORTS = {
    "RunConfig": "bigbatch.train.config",
    "load_config": "bigbatch.train.config",
    "merge_config": "bigbatch.train.config",
    "resolve_regime": "bigbatch.train.config",
    "atomic_write_bytes": "bigbatch.fileio",
    "atomic_write_json": "bigbatch.fileio",
    "atomic_write_text": "bigbatch.fileio",
    "load_checkpoint": "bigbatch.train.checkpoint",
    "save_checkpoint": "bigbatch.train.checkpoint",
    "evaluate": "bigbatch.train.loop",
    "forward_backward": "bigbatch.train.loop",
    "train": "bigbatch.train.loop",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("bigbatch.train", _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
