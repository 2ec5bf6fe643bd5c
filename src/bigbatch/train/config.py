"""Run configuration: one dataclass, validated, read from TOML/YAML as data, overridden by flags.

:class:`RunConfig` is the single source of truth for a training run. A config file sets defaults,
command line flags override them (:func:`merge_config`), and the engine writes the resolved config
to ``RUN_DIR/config.toml`` so that ``bigbatch train --resume RUN_DIR`` (or anyone) can rebuild it.

Files are parsed with ``tomllib`` / ``yaml.safe_load`` and never executed. Every key and value is
checked; a bad one raises :class:`~bigbatch.errors.ConfigError` naming the key, the value and what
is allowed, with a did-you-mean for misspelt keys.

Example:
    >>> cfg = RunConfig.from_dict({"model": "f1", "dataset": "synthetic", "batch_size": 256})
    >>> cfg.batch_size, cfg.lr_scaling
    (256, 'none')
    >>> RunConfig.from_dict({"batch_sise": 256})
    Traceback (most recent call last):
    ...
    bigbatch.errors.ConfigError: unknown config key 'batch_sise'; did you mean 'batch_size'?
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import parse_data_text

__all__ = ["RunConfig", "load_config", "merge_config", "resolve_regime", "RESOLVED_KEY"]

# config.toml written by the engine carries an informational [resolved] table (effective regime,
# number of updates, device, ...). It is output only: load_config drops it, from_dict refuses it.
RESOLVED_KEY = "resolved"

_LR_SCALING = ("none", "sqrt", "linear")
_ON_NONFINITE = ("stop", "skip")
_PROGRESS = ("auto", "bar", "log", "none")
_AMP = (None, "bf16")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines one training run.

    Args:
        model: registered model name (``bigbatch models`` lists them).
        model_options: keyword options for the model builder, e.g. ``{"hidden": 64}`` for ``f1``.
        dataset: a key of ``bigbatch.data.DATASETS``.
        data_dir: dataset directory; ``None`` = the dataset's default directory.
        download: download the dataset into ``data_dir`` if missing.
        train_subset: train on a fixed subset of this many samples (the same subset for every seed).
        held_out: >0 validates on this many held-out training samples instead of the test set.
        batch_size: global batch size B (one optimizer update per B samples).
        base_batch_size: the batch size B0 the regime was tuned for (lr scaling and regime
            adaptation use B / B0).
        ghost_batch_size: convert every BatchNorm to ghost batch norm with this ghost size
            (``None``: plain batch norm over the whole batch).
        micro_batch_size: run forward/backward on chunks of this size and accumulate gradients
            (memory only; results equal one pass when it is a multiple of ``ghost_batch_size``).
        lr_scaling: ``"none"``, ``"sqrt"`` (the paper) or ``"linear"`` learning-rate scaling by B /
            B0.
        regime_adaptation: ``True`` multiplies epochs and milestones by B / B0 (the paper's RA), a
            float multiplies them by that factor, ``False`` keeps the regime.
        warmup_epochs: linear learning-rate warm-up over this many epochs (of the adapted regime).
        regime: regime dict (see ``bigbatch.recipes.Regime``); ``None`` = the model's default
            regime.
        epochs: rescale the base regime to this many epochs (milestones move proportionally).
        clip_grad_norm: clip the global gradient norm to this value each update; ``None`` = no
            clipping (the model spec's ``default_clip_grad_norm`` is *not* applied implicitly: it is
            a choice of the paper's code, so presets set it explicitly).
        seed: seeds the model initialisation, data order and augmentation.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
            ``"mps"``.
        eval_every_updates: evaluate every this many updates; ``None`` = at the end of every epoch.
        eval_batch_size: batch size for evaluation.
        log_diffusion: log the weight distance ||w_t - w_0|| at log-spaced updates.
        channels_last: ``"auto"`` (on for conv nets on CUDA), ``True`` or ``False``.
        amp: ``None`` or ``"bf16"`` (autocast to bfloat16).
        compile: wrap the model in ``torch.compile``.
        on_nonfinite: ``"stop"`` raises DivergenceError on a NaN/Inf loss or gradient; ``"skip"``
            skips that update and counts it in ``skipped_steps``.
        num_workers: loader workers (folder datasets only).
        progress: ``"auto"`` (a bar on a terminal, log lines otherwise), ``"bar"``, ``"log"`` or
            ``"none"``.
        checkpoint_every_minutes: also write ``last.pt`` mid-epoch this often (``None``: only at
            evaluations).
        exact_ghost_alignment: under torchrun, require ``ghost_batch_size`` to divide the
            per-process batch (``batch_size / world_size``), so that every process's ghost batches
            are exactly those of single-process training; ``False`` accepts any ghost size (each
            process then ends its slice with a shorter ghost batch). No effect in one process.

    Raises:
        ConfigError: for any invalid value (checked on construction, also by
            ``dataclasses.replace``).
    """

    model: str = "f1"
    model_options: dict = dataclasses.field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    held_out: int = 0
    batch_size: int = 128
    base_batch_size: int = 128
    ghost_batch_size: int | None = None
    micro_batch_size: int | None = None
    lr_scaling: str = "none"
    regime_adaptation: bool | float = False
    warmup_epochs: float = 0.0
    regime: dict | None = None
    epochs: float | None = None
    clip_grad_norm: float | None = None
    seed: int = 0
    device: str = "auto"
    eval_every_updates: int | None = None
    eval_batch_size: int = 1024
    log_diffusion: bool = True
    channels_last: str | bool = "auto"
    amp: str | None = None
    compile: bool = False
    on_nonfinite: str = "stop"
    num_workers: int = 2
    progress: str = "auto"
    checkpoint_every_minutes: float | None = None
    exact_ghost_alignment: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction
    # -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build a config from plain data (a parsed file, flags), refusing unknown keys.

        Raises:
            ConfigError: an unknown key (with did-you-mean) or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"a run config must be a table/mapping of keys, got {type(d).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                hint = difflib.get_close_matches(str(key), names, n=1)
                extra = (
                    f"; did you mean {hint[0]!r}?"
                    if hint
                    else f"; allowed keys: {', '.join(names)}"
                )
                if key == RESOLVED_KEY:
                    extra = " (written by the engine for reference; load the file with load_config)"
                raise ConfigError(f"unknown config key {key!r}{extra}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (nested dicts copied), ``None`` values included."""
        return {f.name: _copy_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self, extra: Mapping[str, Any] | None = None) -> str:
        """TOML text of the config; ``None`` values are omitted (they are the defaults' "unset").

        Args:
            extra: optional additional top-level tables (e.g. the engine's ``[resolved]`` table).
        """
        import tomli_w

        data = _drop_none(self.to_dict())
        if extra:
            data.update(_drop_none(dict(extra)))
        return tomli_w.dumps(data)

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with ``changes`` applied (unknown keys refused as in ``from_dict``)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})


# -- validation------------------------------------------------------------------------------------
def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid value for {key!r}: {value!r}; expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_int(cfg: RunConfig, key: str, *, minimum: int, optional: bool = False) -> None:
    v = getattr(cfg, key)
    if v is None and optional:
        return
    if isinstance(v, float) and v.is_integer():  # YAML/JSON may give 256.0
        v = int(v)
        setattr(cfg, key, v)
    if not _is_int(v) or v < minimum:
        _fail(key, v, f"an integer >= {minimum}" + (" or none" if optional else ""))


def _check_float(cfg: RunConfig, key: str, *, positive: bool, optional: bool = False) -> None:
    v = getattr(cfg, key)
    if v is None and optional:
        return
    if not _is_number(v) or (v <= 0 if positive else v < 0):
        _fail(
            key,
            v,
            ("a number > 0" if positive else "a number >= 0") + (" or none" if optional else ""),
        )
    setattr(cfg, key, float(v))


def _check_bool(cfg: RunConfig, key: str) -> None:
    v = getattr(cfg, key)
    if not isinstance(v, bool):
        _fail(key, v, "true or false")


def _check_choice(cfg: RunConfig, key: str, choices: tuple) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        shown = ", ".join("none" if c is None else repr(c) for c in choices)
        _fail(key, v, f"one of {shown}")


def _validate(cfg: RunConfig) -> None:
    for key in ("model", "dataset", "device"):
        if not isinstance(getattr(cfg, key), str):
            _fail(key, getattr(cfg, key), "a string")
    if not isinstance(cfg.model_options, Mapping) or not all(
        isinstance(k, str) for k in cfg.model_options
    ):
        _fail("model_options", cfg.model_options, "a table of keyword options, e.g. {hidden = 64}")
    cfg.model_options = dict(cfg.model_options)
    if isinstance(cfg.data_dir, Path):
        cfg.data_dir = str(cfg.data_dir)
    if cfg.data_dir is not None and (not isinstance(cfg.data_dir, str) or not cfg.data_dir):
        _fail("data_dir", cfg.data_dir, "a directory path or none")
    for key in ("download", "log_diffusion", "compile", "exact_ghost_alignment"):
        _check_bool(cfg, key)
    _check_int(cfg, "train_subset", minimum=2, optional=True)
    _check_int(cfg, "held_out", minimum=0)
    _check_int(cfg, "batch_size", minimum=1)
    _check_int(cfg, "base_batch_size", minimum=1)
    _check_int(cfg, "ghost_batch_size", minimum=2, optional=True)
    _check_int(cfg, "micro_batch_size", minimum=1, optional=True)
    _check_int(cfg, "seed", minimum=0)
    _check_int(cfg, "eval_every_updates", minimum=1, optional=True)
    _check_int(cfg, "eval_batch_size", minimum=1)
    _check_int(cfg, "num_workers", minimum=0)
    _check_choice(cfg, "lr_scaling", _LR_SCALING)
    ra = cfg.regime_adaptation
    if not isinstance(ra, bool):
        if not _is_number(ra) or ra <= 0:
            _fail(
                "regime_adaptation",
                ra,
                "true (x batch_size/base_batch_size), false, or a factor > 0",
            )
        cfg.regime_adaptation = float(ra)
    _check_float(cfg, "warmup_epochs", positive=False)
    _check_float(cfg, "epochs", positive=True, optional=True)
    _check_float(cfg, "clip_grad_norm", positive=True, optional=True)
    _check_float(cfg, "checkpoint_every_minutes", positive=True, optional=True)
    if cfg.regime is not None:
        if not isinstance(cfg.regime, Mapping):
            _fail("regime", cfg.regime, "a regime table (optimizer, epochs, phases, ...) or none")
        cfg.regime = _copy_plain(dict(cfg.regime))
        _regime_from_dict(cfg.regime)  # raises ConfigError naming the regime key
    if cfg.amp == "none":
        cfg.amp = None
    _check_choice(cfg, "amp", _AMP)
    _check_choice(cfg, "on_nonfinite", _ON_NONFINITE)
    _check_choice(cfg, "progress", _PROGRESS)
    if cfg.channels_last not in ("auto", True, False):
        _fail("channels_last", cfg.channels_last, "'auto', true or false")
    _validate_device(cfg.device)
    # Cross-field rules, one clear message each.
    if cfg.ghost_batch_size is not None and cfg.ghost_batch_size > cfg.batch_size:
        raise ConfigError(
            f"ghost_batch_size={cfg.ghost_batch_size} is larger than batch_size={cfg.batch_size}; "
            "a ghost batch is a slice of the batch: use a ghost_batch_size <= batch_size"
        )
    if cfg.micro_batch_size is not None:
        if cfg.micro_batch_size > cfg.batch_size:
            raise ConfigError(
                f"micro_batch_size={cfg.micro_batch_size} is larger than "
                f"batch_size={cfg.batch_size}; "
                "use a micro_batch_size <= batch_size (or none for one pass)"
            )
        g = cfg.ghost_batch_size
        if g is not None and cfg.micro_batch_size % g:
            raise ConfigError(
                f"micro_batch_size={cfg.micro_batch_size} is not a multiple of "
                f"ghost_batch_size={g}, so "
                f"ghost batches would cross micro-batch boundaries; use a multiple of {g} "
                f"(e.g. {max(g, cfg.micro_batch_size // g * g)})"
            )
    _validate_names(cfg)


def _validate_device(device: str) -> None:
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        _fail("device", device, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _validate_names(cfg: RunConfig) -> None:
    from bigbatch import data, models

    known = list(models.names())
    if cfg.model not in known:
        hint = difflib.get_close_matches(cfg.model, known, n=1, cutoff=0.5)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(
            f"unknown model {cfg.model!r}; {extra}registered models: {', '.join(known)}"
        )
    datasets = list(data.DATASETS)
    if cfg.dataset not in datasets:
        hint = difflib.get_close_matches(cfg.dataset, datasets, n=1, cutoff=0.5)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(
            f"unknown dataset {cfg.dataset!r}; {extra}known datasets: {', '.join(datasets)}"
        )


def _regime_from_dict(d: Mapping[str, Any]):
    from bigbatch.recipes import Regime

    try:
        return Regime.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"regime: {e}") from None


def _copy_plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _copy_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_copy_plain(x) for x in v]
    return v


def _drop_none(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_drop_none(x) for x in v]
    return v


# -- files and merging-----------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file as plain data, without validating.

    The engine's informational ``[resolved]`` table is dropped.

    Raises:
        ConfigError: missing/unreadable file, unknown extension or a syntax error (with the file
            name).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {str(path)!r} must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    d = parse_data_text(text, "toml" if suffix == ".toml" else "yaml",
                        f"cannot parse config file {str(path)!r}")  # fmt: skip
    d = {} if d is None else d  # an empty YAML file
    if not isinstance(d, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a table of keys, got {type(d).__name__}"
        )
    d.pop(RESOLVED_KEY, None)
    return d


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML/YAML run config (data only, never executed).

    Raises:
        ConfigError: unreadable file, syntax error, unknown key or invalid value.
    """
    d = read_config_file(path)
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def merge_config(
    base: RunConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> RunConfig:
    """The file sets defaults, flags override: ``base`` updated with the non-``None`` ``overrides``.

    Example:
        >>> file_values = {"batch_size": 512, "dataset": "synthetic"}
        >>> merge_config(file_values, {"batch_size": 1024, "seed": None}).batch_size
        1024
    """
    d = base.to_dict() if isinstance(base, RunConfig) else dict(base or {})
    d.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(d)


# -- regime----------------------------------------------------------------------------------------
def base_regime_dict(config: RunConfig) -> dict[str, Any]:
    """The regime the run starts from: ``config.regime`` or the model's default regime (a copy)."""
    if config.regime is not None:
        return _copy_plain(config.regime)
    from bigbatch import models

    return _copy_plain(dict(models.get_spec(config.model).default_regime))


def resolve_regime(config: RunConfig, dataset_size: int):
    """The base regime (after the ``epochs`` override) and the effective regime the run follows.

    Base = ``config.regime`` or the model's ``default_regime``, rescaled to ``config.epochs`` if
    given (every milestone moves proportionally). Effective = ``adapt_regime(base, base_batch_size,
    batch_size, lr_scaling, regime_adaptation, warmup_epochs)``.

    Args:
        config: the run config.
        dataset_size: number of training samples (checked to be >= 1; the regime itself is in
            epochs).

    Returns:
        ``(base_regime, effective_regime)``, both ``bigbatch.recipes.Regime``.
    """
    from bigbatch.recipes import adapt_regime

    if dataset_size < 1:
        raise ConfigError(f"the training set is empty (dataset_size={dataset_size})")
    base = _regime_from_dict(base_regime_dict(config))
    if config.epochs is not None:
        base = base.with_epochs(config.epochs)
    effective = adapt_regime(
        base,
        config.base_batch_size,
        config.batch_size,
        lr_scaling=config.lr_scaling,
        regime_adaptation=config.regime_adaptation,
        warmup_epochs=config.warmup_epochs,
    )
    return base, effective
