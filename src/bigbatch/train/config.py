"""Run configuration: one dataclass, validated, read from TOML/YAML as data, overridden by flags.

:class:`RunConfig` is the single source of truth for a training run. Each field is declared once,
with its type, bounds, choices, default and help (:func:`bigbatch.train.keys.key`); the
validation, the ``bigbatch train`` flags (``--batch-size`` for ``batch_size``: a key and its flag
always have the same name), the list of keys that may change on resume and the docstring below are
all built from those declarations. A config file sets defaults, command line flags override them
(:func:`merge_config`), and the engine writes the resolved config to ``RUN_DIR/config.toml`` so that
``bigbatch train --resume RUN_DIR`` (or anyone) can rebuild it.

Files are parsed with ``tomllib`` / ``yaml.safe_load`` and never executed. Every key and value is
checked; a bad one raises :class:`~bigbatch.errors.ConfigError` naming the key, the value and what
is allowed, with a did-you-mean for misspelt keys. Keys renamed in 0.2 (``clip_grad_norm`` ->
``clip``, ``eval_every_updates`` -> ``eval_every``) are still read, with a logged deprecation line,
so that run directories written before resume.

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
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import drop_none, plain
from bigbatch.train.keys import Key, check, key, read_table_file

__all__ = [
    "RESOLVED_KEY",
    "RESUME_FREE_KEYS",
    "RunConfig",
    "base_regime",
    "config_keys",
    "load_config",
    "merge_config",
    "read_config_file",
    "resolve_regime",
]

log = logging.getLogger("bigbatch.train")

# config.toml written by the engine carries an informational [resolved] table (effective regime,
# number of updates, device, ...). It is output only: load_config drops it, from_dict refuses it.
RESOLVED_KEY = "resolved"

_DATA, _BATCH, _REGIME = "model and data", "batch", "regime (learning rate, epochs)"
_NOISE = "gradient noise scale (B_simple, AdaScale)"


@dataclasses.dataclass
class RunConfig:
    """Everything that defines one training run (the keys are listed below, built from the fields).

    Raises:
        ConfigError: for any invalid value (checked on construction, also by
            ``dataclasses.replace``).
    """

    model: str = key("f1", "str", "registered model, see `bigbatch models`", group=_DATA)
    model_options: dict = key({}, "table", "model builder options, e.g. hidden=64 (repeatable)",
                              metavar="KEY=VALUE", group=_DATA)
    init_from: str | None = key(None, "path", "fine-tune: start from the weights in CHECKPOINT (a "
                                "run's checkpoints/best.pt or last.pt, or a saved state_dict; "
                                "none: random initialisation)", optional=True,
                                metavar="CHECKPOINT", group=_DATA)
    imports: list = key([], "modules", "import MODULE before the run: it registers models or "
                        "datasets (from sys.path and the current directory; repeatable)",
                        metavar="MODULE", group=_DATA, resume_free=True)
    dataset: str = key("fashion-mnist", "str", "dataset name (see `bigbatch datasets`)",
                       group=_DATA)
    data_dir: str | None = key(None, "path", "dataset directory (none: the dataset's own)",
                               optional=True, metavar="DIR", group=_DATA, resume_free=True)
    download: bool = key(False, "bool", "download the dataset into data_dir if missing",
                         group=_DATA, resume_free=True)
    train_subset: int | None = key(None, "int", "train on a fixed subset of N samples (the same "
                                   "for every seed)", minimum=2, optional=True, metavar="N",
                                   group=_DATA)
    held_out: int = key(0, "int", "validate on N held-out training samples instead of the test "
                        "set", minimum=0, metavar="N", group=_DATA)
    batch_size: int = key(128, "int", "global batch size B (samples per optimizer update)",
                          minimum=1, metavar="B", group=_BATCH)
    ghost_batch_size: int | None = key(None, "int", "ghost batch norm with G samples per ghost "
                                       "batch (+GBN; none: plain batch norm)", minimum=2,
                                       optional=True, metavar="G", group=_BATCH)
    micro_batch_size: int | None = key(None, "int", "forward/backward M samples at a time, "
                                       "accumulating gradients (memory only; a multiple of G)",
                                       minimum=1, optional=True, metavar="M", group=_BATCH)
    base_batch_size: int = key(128, "int", "batch size B0 the regime was tuned for (lr scaling "
                               "and regime adaptation use B/B0)", minimum=1, metavar="B0",
                               group=_REGIME)
    lr_scaling: str = key("none", "choice", "scale every lr by (B/B0)**0.5 (sqrt, the paper) or "
                          "B/B0 (linear), or by AdaScale's gain from the measured noise "
                          "(adascale: needs noise_scale)",
                          choices=("none", "sqrt", "linear", "adascale"), group=_REGIME)
    regime_adaptation: bool | float = key(False, "factor", "train B/B0 times more epochs, every "
                                          "milestone stretched (+RA), or F times more",
                                          metavar="F", group=_REGIME)
    warmup_epochs: float = key(0.0, "float", "linear lr warm-up from the base lr over E epochs",
                               minimum=0, metavar="E", group=_REGIME)
    regime: dict | None = key(None, "regime", "a regime TOML/YAML file, or a table (on the "
                              "command line an inline TOML table '{epochs = 2, phases = [...]}'; "
                              "none: the model's default regime)", optional=True,
                              metavar="FILE|TABLE", group=_REGIME)
    epochs: float | None = key(None, "float", "rescale the base regime to E epochs (milestones "
                               "move proportionally; none: the regime's own)", optional=True,
                               metavar="E", group=_REGIME)
    noise_scale: bool = key(False, "bool", "measure the gradient noise scale B_simple from the "
                            "micro-batches (micro_batch_size) or the torchrun processes",
                            group=_NOISE)
    noise_scale_every: int = key(4, "int", "measure the noise scale on every K-th update (each "
                                 "measured update costs a few percent)", minimum=1, metavar="K",
                                 group=_NOISE)
    noise_scale_decay: float = key(0.99, "float", "weight of the past in the noise scale's moving "
                                   "averages, per measurement (in [0, 1])", minimum=0,
                                   metavar="D", group=_NOISE)
    clip: float | None = key(None, "float", "clip the gradient norm at NORM each update (the "
                             "paper's code: 5; none: off)", optional=True, metavar="NORM",
                             group=_REGIME, old_names=("clip_grad_norm",))
    seed: int = key(0, "int", "seeds the model initialisation, data order and augmentation",
                    minimum=0)
    device: str = key("auto", "device", "auto (CUDA if available), cpu, cuda, cuda:N or mps",
                      resume_free=True)
    out: str | None = key(None, "path", "run directory (none: runs/<model>-<dataset>-b<B>[-g<G>]"
                          "-s<seed>-<time>)", optional=True, metavar="RUN_DIR", resume_free=True)
    eval_every: int | None = key(None, "int", "evaluate every N updates (none: every epoch)",
                                 minimum=1, optional=True, metavar="N",
                                 old_names=("eval_every_updates",))
    eval_batch_size: int = key(1024, "int", "evaluation batch size", minimum=1, metavar="N",
                               resume_free=True)
    log_diffusion: bool = key(True, "bool", "log the weight distance ||w_t - w_0|| at log-spaced "
                              "updates")
    channels_last: str | bool = key("auto", "choice", "channels-last memory format (auto: on for "
                                    "conv nets on CUDA)", choices=("auto", True, False))
    amp: str | None = key(None, "choice", "autocast to bfloat16 (bf16) or not (none)",
                          choices=(None, "bf16"))
    compile: bool = key(False, "bool", "torch.compile the model")
    on_nonfinite: str = key("stop", "choice", "on a NaN/Inf loss or gradient: stop (raises "
                            "DivergenceError) or skip the update", choices=("stop", "skip"))
    num_workers: int = key(2, "int", "loader worker processes (folder datasets)", minimum=0,
                           metavar="N", resume_free=True)
    progress: str = key("auto", "choice", "progress bar on a terminal, log lines otherwise "
                        "(auto), bar, log, none", choices=("auto", "bar", "log", "none"),
                        resume_free=True)
    checkpoint_every_minutes: float | None = key(None, "float", "also checkpoint mid-epoch every "
                                                 "MIN minutes (none: at evaluations only)",
                                                 optional=True, metavar="MIN", resume_free=True)
    exact_ghost_alignment: bool = key(True, "bool", "under torchrun, require ghost_batch_size to "
                                      "divide the per-process batch (single-process "
                                      "equivalence)")

    def __post_init__(self) -> None:
        for name, spec in config_keys().items():
            setattr(self, name, check(name, getattr(self, name), spec))
        from bigbatch.plugins import import_modules

        import_modules(self.imports)  # before the names are checked: they may register them
        _check_cross_fields(self)
        _check_names(self)

    # -- construction
    # -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        """Build a config from plain data (a parsed file, flags), refusing unknown keys.

        Old key names are translated, with a logged deprecation line.

        Raises:
            ConfigError: an unknown key (with did-you-mean) or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"a run config must be a table/mapping of keys, got {type(d).__name__}"
            )
        d = _renamed(d)
        names = list(config_keys())
        for name in d:
            if name not in names:
                hint = difflib.get_close_matches(str(name), names, n=1)
                extra = (
                    f"; did you mean {hint[0]!r}?"
                    if hint
                    else f"; allowed keys: {', '.join(names)}"
                )
                if name == RESOLVED_KEY:
                    extra = " (written by the engine for reference; load the file with load_config)"
                raise ConfigError(f"unknown config key {name!r}{extra}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (nested dicts copied), ``None`` values included."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self, extra: Mapping[str, Any] | None = None) -> str:
        """TOML text of the config; ``None`` values are omitted (they are the defaults' "unset").

        Args:
            extra: optional additional top-level tables (e.g. the engine's ``[resolved]`` table).
        """
        import tomli_w

        data = drop_none(self.to_dict())
        if extra:
            data.update(drop_none(dict(extra)))
        return tomli_w.dumps(data)

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with ``changes`` applied (unknown keys refused as in ``from_dict``)."""
        return RunConfig.from_dict({**self.to_dict(), **changes})


def config_keys() -> dict[str, Key]:
    """Every run-config key's :class:`~bigbatch.train.keys.Key`, in field order."""
    return {f.name: f.metadata["key"] for f in dataclasses.fields(RunConfig)}


def _document() -> str:
    lines = [(RunConfig.__doc__ or "").split("\n")[0], "", "    Args:"]
    for f in dataclasses.fields(RunConfig):
        spec = f.metadata["key"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"        {f.name}: {spec.help} (default: {default!r}).")
    rest = (RunConfig.__doc__ or "").split("\n", 1)[1].strip("\n")
    return "\n".join(lines) + "\n\n" + rest + "\n"


RunConfig.__doc__ = _document()

# Keys that may differ between a run and its resume: they do not change what is computed.
RESUME_FREE_KEYS = frozenset(name for name, spec in config_keys().items() if spec.resume_free)
# Old key name -> its name now (accepted for one release).
RENAMED_KEYS = {old: name for name, spec in config_keys().items() for old in spec.old_names}


def _renamed(d: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for old, new in RENAMED_KEYS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"both {old!r} and {new!r} are set; {old!r} is the old name of "
                              f"{new!r}: keep only {new!r}")
        log.warning("config key %r is deprecated (read this time); rename it %r", old, new)
        out[new] = out.pop(old)
    return out


# -- cross-field rules ----------------------------------------------------------------------------
def _check_cross_fields(cfg: RunConfig) -> None:
    """The rules between keys, one clear message each."""
    _check_noise_keys(cfg)
    if cfg.ghost_batch_size is not None and cfg.ghost_batch_size > cfg.batch_size:
        raise ConfigError(
            f"ghost_batch_size={cfg.ghost_batch_size} is larger than batch_size={cfg.batch_size}; "
            "a ghost batch is a slice of the batch: use a ghost_batch_size <= batch_size"
        )
    if cfg.micro_batch_size is None:
        return
    if cfg.micro_batch_size > cfg.batch_size:
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} is larger than batch_size={cfg.batch_size}; "
            "use a micro_batch_size <= batch_size (or none for one pass)"
        )
    g = cfg.ghost_batch_size
    if g is not None and cfg.micro_batch_size % g:
        raise ConfigError(
            f"micro_batch_size={cfg.micro_batch_size} is not a multiple of ghost_batch_size={g}, "
            f"so ghost batches would cross micro-batch boundaries; use a multiple of {g} "
            f"(e.g. {max(g, cfg.micro_batch_size // g * g)})"
        )


def _check_noise_keys(cfg: RunConfig) -> None:
    """AdaScale needs the noise measurement and sets the run's length and lr itself."""
    if cfg.noise_scale_decay > 1:
        raise ConfigError(f"noise_scale_decay={cfg.noise_scale_decay:g} must be in [0, 1] "
                          "(0.99 averages over about the last 100 measurements)")
    if cfg.lr_scaling != "adascale":
        return
    if not cfg.noise_scale:
        raise ConfigError("lr_scaling='adascale' sets the lr from the measured gradient noise: "
                          "add --noise-scale (noise_scale = true) and a small batch to measure it "
                          "with (--micro-batch-size, or several torchrun processes)")
    if cfg.regime_adaptation is not False:
        raise ConfigError("lr_scaling='adascale' sets the number of updates itself (the run ends "
                          "when its progress reaches the small-batch run's updates): drop "
                          "regime_adaptation")
    if cfg.warmup_epochs:
        raise ConfigError("warmup_epochs ramps up to a fixed scaled lr, which AdaScale does not "
                          "have: put a warm-up in the base regime instead (it is followed in "
                          "AdaScale's progress)")
    if cfg.batch_size < cfg.base_batch_size:
        raise ConfigError(f"lr_scaling='adascale' needs batch_size >= base_batch_size, got "
                          f"{cfg.batch_size} < {cfg.base_batch_size}")


def _check_names(cfg: RunConfig) -> None:
    from bigbatch import data, models

    for what, name, found, names in (("model", cfg.model, models.is_registered, models.names),
                                     ("dataset", cfg.dataset, data.is_dataset,
                                      data.dataset_names)):  # fmt: skip
        if not found(name):
            known = names()
            hint = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            extra = f"did you mean {hint[0]!r}? " if hint else ""
            listed = "registered models" if what == "model" else "known datasets"
            raise ConfigError(f"unknown {what} {name!r}; {extra}{listed}: {', '.join(known)} "
                              f"(your own {what}: --import the module that registers it)")


# -- files and merging-----------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file as plain data, without validating.

    The engine's informational ``[resolved]`` table is dropped; a relative ``regime`` file is
    taken relative to the config file.

    Raises:
        ConfigError: missing/unreadable file, unknown extension or a syntax error (with the file
            name).
    """
    path = Path(path)
    d = read_table_file(path, what="config file")
    d.pop(RESOLVED_KEY, None)
    regime = d.get("regime")
    if isinstance(regime, str) and Path(regime).suffix and not Path(regime).is_absolute():
        d["regime"] = str(path.parent / regime)
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
    d = base.to_dict() if isinstance(base, RunConfig) else _renamed(base or {})
    d.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(d)


# -- regime----------------------------------------------------------------------------------------
def base_regime_dict(config: RunConfig) -> dict[str, Any]:
    """The regime the run starts from: ``config.regime`` or the model's default regime (a copy)."""
    if config.regime is not None:
        return plain(config.regime)
    from bigbatch import models

    return plain(dict(models.get_spec(config.model).default_regime))


def base_regime(config: RunConfig):
    """The run's base ``Regime``: :func:`base_regime_dict`, rescaled to ``config.epochs`` if given
    (every milestone moves proportionally), before any large-batch adaptation.

    Raises:
        ConfigError: an invalid regime (the message starts with ``regime:``).
    """
    from bigbatch.recipes import Regime

    try:
        base = Regime.from_dict(base_regime_dict(config))
    except ConfigError as e:
        raise ConfigError(f"regime: {e}") from None
    return base.with_epochs(config.epochs) if config.epochs is not None else base


def resolve_regime(config: RunConfig, dataset_size: int):
    """The base regime (after the ``epochs`` override) and the effective regime the run follows.

    Base = :func:`base_regime`. Effective = ``adapt_regime(base, base_batch_size,
    batch_size, lr_scaling, regime_adaptation, warmup_epochs)``; under ``lr_scaling = "adascale"``
    the base regime stretched by ``B / B0`` with its lr unscaled (AdaScale's longest run; the loop
    takes the lr and the end from :class:`~bigbatch.recipes.adascale.AdaScale`).

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
    base = base_regime(config)
    if config.lr_scaling == "adascale":
        # AdaScale follows the base regime in its own progress; the effective regime is the
        # base one stretched to as many updates as the small batch takes: the longest it can run.
        return base, adapt_regime(base, config.base_batch_size, config.batch_size,
                                  lr_scaling="none", regime_adaptation=True)
    effective = adapt_regime(
        base,
        config.base_batch_size,
        config.batch_size,
        lr_scaling=config.lr_scaling,
        regime_adaptation=config.regime_adaptation,
        warmup_epochs=config.warmup_epochs,
    )
    return base, effective
