"""Training regimes as data: phases of optimizer settings over epochs, with warm-up and cosine.

A regime is the schedule the paper calls the "training regime": the optimizer, the number of epochs
and piecewise-constant settings (lr, momentum, weight decay) that change at epoch milestones. Its
plain-dict form, which is also the TOML/YAML form::

    {"optimizer": "SGD", "epochs": 5, "schedule": "step", "warmup_epochs": 0.0,
     "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                {"epoch": 3, "lr": 0.01}, {"epoch": 4, "lr": 0.001}]}

Later phases inherit every setting they do not name. :func:`bigbatch.recipes.adapt_regime` applies
the paper's two regime-level measures (+LR and +RA, :mod:`bigbatch.recipes.adapt`);
:mod:`bigbatch.recipes.optim` builds the optimizer once and changes its settings in place, and
:class:`bigbatch.recipes.RegimeScheduler` does that once per update in any training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import parse_data_text, plain
from bigbatch.recipes.optim import _check_setting_names, _optimizer_class, _unknown

__all__ = ["SCHEDULES", "Regime"]

SCHEDULES = ("step", "cosine")
_KEYS = (
    "optimizer",
    "epochs",
    "schedule",
    "warmup_epochs",
    "warmup_start_factor",
    "optimizer_options",
    "phases",
)
# A phase starts at the first update whose epoch is >= its start epoch. Epochs reach us as
# `update / updates_per_epoch` and milestones as `milestone * B / B0`; both are rounded floats, so a
# milestone that is exactly an update boundary could otherwise land one update late.
_EPOCH_TOL = 1e-9


class _ReadOnlyDict(dict):
    """A dict that refuses mutation, so a `Regime` (frozen) cannot be changed through its phases.

    The official code scaled `lr` inside the model's regime dict in place; this makes that
    impossible while staying a real dict for `json`, `==` and `isinstance(x, dict)`.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("regime settings are read-only; build a new Regime (dataclasses.replace, "
                        "adapt_regime, Regime.from_dict) instead of editing one in place")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:  # pickle/deepcopy without calling __setitem__
        return (type(self), (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


# -- validation helpers ---------------------------------------------------------------------------
def _yaml_hint(value: object) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a quoted number? YAML 1.1 reads 1e-4 as a string: write 1.0e-4)"
    return ""


def _number(where: str, value: object, *, low: float | None = None, low_ok: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}{_yaml_hint(value)}")
    if low is not None and (value < low or (value == low and not low_ok)):
        raise ConfigError(f"{where} must be {'>=' if low_ok else '>'} {low:g}, got {value!r}")
    return float(value)


def _setting(where: str, value: object) -> Any:
    """A setting value: bool, string, finite number or a (tuple of) numbers; lists become tuples."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, Real):
        _number(where, value)
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_setting(f"{where}[{i}]", v) for i, v in enumerate(value))
    raise ConfigError(f"{where} must be a number, bool, string or list of numbers, "
                      f"got {type(value).__name__} {value!r}")


def _tidy_epoch(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# -- the regime -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regime:
    """An immutable training regime: optimizer, epochs and phases of settings (see the module doc).

    Construction validates everything (also when built directly rather than with :meth:`from_dict`).

    Args:
        phases: one mapping per phase, sorted by ``"epoch"`` (its start, in epochs, fractional
            allowed). The first starts at epoch 0 and names ``"lr"``; later phases inherit settings
            they do not name. Setting names are the keyword arguments of the optimizer's
            constructor.
        epochs: total training length in epochs (> 0, fractional allowed); every phase starts
        before it.
        optimizer: a ``torch.optim`` optimizer class name.
        schedule: ``"step"`` (piecewise-constant, the paper) or ``"cosine"`` (the lr of phase 0
            annealed as ``lr0 * (1 + cos(pi * epoch / epochs)) / 2``; later phases' lr are ignored,
            their other settings still apply).
        warmup_epochs: length of a linear lr warm-up, in epochs of this regime (0 = none).
        optimizer_options: extra constructor arguments that never change (``nesterov``,
        ``betas``...).
        warmup_start_factor: the lr at epoch 0 as a fraction of the scheduled lr, in [0, 1]. During
            warm-up ``lr(e) = scheduled_lr(e) * (s + (1 - s) * e / warmup_epochs)``: it rises
            linearly from ``s * lr`` at epoch 0 and is continuous at ``warmup_epochs``, where the
            factor reaches 1. :func:`adapt_regime` sets ``s = 1 / lr_scale_factor`` so the ramp
            starts at the small-batch lr, as in Goyal et al. 2017 ("gradual warmup" from eta to
            k*eta).

    Example:
        >>> r = Regime.from_dict({"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9},
        ...                                                {"epoch": 3, "lr": 0.01}]})
        >>> r.milestones
        (3.0,)
        >>> r.settings_at(3.5)
        {'lr': 0.01, 'momentum': 0.9}
    """

    phases: tuple[Mapping[str, Any], ...]
    epochs: float
    optimizer: str = "SGD"
    schedule: str = "step"
    warmup_epochs: float = 0.0
    optimizer_options: Mapping[str, Any] = field(default_factory=_ReadOnlyDict)
    warmup_start_factor: float = 0.0

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalise through object
        if not isinstance(self.optimizer, str):
            raise ConfigError(f"optimizer must be a torch.optim class name, got {self.optimizer!r}")
        _, accepted = _optimizer_class(self.optimizer)
        set_("epochs", _number("epochs", self.epochs, low=0.0, low_ok=False))
        if self.schedule not in SCHEDULES:
            raise _unknown("", "schedule", self.schedule, SCHEDULES)
        set_("warmup_epochs", _number("warmup_epochs", self.warmup_epochs, low=0.0))
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs:g}) must not exceed epochs "
                              f"({self.epochs:g})")
        start = _number("warmup_start_factor", self.warmup_start_factor, low=0.0)
        if start > 1.0:
            raise ConfigError(f"warmup_start_factor must be in [0, 1], got {start:g}")
        set_("warmup_start_factor", start)

        if not isinstance(self.optimizer_options, Mapping):
            raise ConfigError(f"optimizer_options must be a table of constructor arguments, "
                              f"got {type(self.optimizer_options).__name__}")
        options = self.optimizer_options
        _check_setting_names("optimizer_options: ", options, self.optimizer, accepted)
        set_("optimizer_options", _ReadOnlyDict(
            {k: _setting(f"optimizer_options.{k}", v) for k, v in self.optimizer_options.items()}))

        if isinstance(self.phases, (str, bytes, Mapping)) or not isinstance(self.phases, Sequence):
            raise ConfigError(f"phases must be a list of tables, got {type(self.phases).__name__}")
        if not self.phases:
            raise ConfigError("phases must not be empty: the first phase sets the lr at epoch 0")
        phases: list[Mapping[str, Any]] = []
        for i, phase in enumerate(self.phases):
            phases.append(self._checked_phase(i, phase, phases[-1] if phases else None, accepted))
        set_("phases", tuple(phases))

    def _checked_phase(self, i: int, phase: object, previous: Mapping[str, Any] | None,
                       accepted: frozenset[str] | None) -> Mapping[str, Any]:
        """Phase ``i`` validated against the one before it (None for the first) and normalised."""
        where = f"phases[{i}]"
        if not isinstance(phase, Mapping):
            raise ConfigError(f"{where} must be a table, got {type(phase).__name__} {phase!r}")
        if "epoch" not in phase:
            raise ConfigError(f"{where} needs 'epoch' (the epoch at which it starts)")
        settings = {k: v for k, v in phase.items() if k != "epoch"}
        _check_setting_names(f"{where}: ", settings, self.optimizer, accepted)
        clash = sorted(set(settings) & set(self.optimizer_options))
        if clash:
            raise ConfigError(f"{where}: {clash[0]!r} is both a phase setting and an "
                              "optimizer_options entry; keep it in one place")
        start = _number(f"{where}.epoch", phase["epoch"], low=0.0)
        if i == 0 and start != 0:
            raise ConfigError(f"phases[0].epoch must be 0 (the first phase starts the run), "
                              f"got {phase['epoch']!r}")
        if i == 0 and "lr" not in settings:
            raise ConfigError("phases[0] must set 'lr'")
        if previous is not None and start <= previous["epoch"]:
            raise ConfigError(f"{where}.epoch ({start:g}) must be greater than "
                              f"phases[{i - 1}].epoch ({previous['epoch']:g}): phases are "
                              "sorted by start epoch")
        if start >= self.epochs:
            raise ConfigError(f"{where}.epoch ({start:g}) must be less than epochs "
                              f"({self.epochs:g}): a phase at or after the end never runs")
        if "lr" in settings:
            _number(f"{where}.lr", settings["lr"], low=0.0)
        normal = {k: _setting(f"{where}.{k}", v) for k, v in settings.items()}
        return _ReadOnlyDict(epoch=start, **normal)

    # -- plain data -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Regime:
        """Validate a regime dict (the module docstring's format) and build a :class:`Regime`.

        Raises:
            ConfigError: an unknown or missing key (with a did-you-mean), an unknown optimizer,
                schedule or optimizer setting, unsorted phases, a phase at or after ``epochs``, or a
                value that is not a finite number; the message names the key.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"a regime must be a table of keys, got {type(d).__name__}")
        for key in d:
            if key not in _KEYS:
                raise _unknown("", "key", key, _KEYS)
        for key in ("epochs", "phases"):
            if key not in d:
                raise ConfigError(f"missing key {key!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form that :meth:`from_dict` reads; whole epochs are written as ints."""
        return {
            "optimizer": self.optimizer,
            "epochs": _tidy_epoch(self.epochs),
            "schedule": self.schedule,
            "warmup_epochs": _tidy_epoch(self.warmup_epochs),
            "warmup_start_factor": self.warmup_start_factor,
            "optimizer_options": plain(self.optimizer_options),
            "phases": [{"epoch": _tidy_epoch(p["epoch"]), **plain({k: v for k, v in p.items()
                                                                     if k != "epoch"})}
                       for p in self.phases],
        }

    def to_toml(self) -> str:
        """TOML text (one inline table per phase) that :meth:`from_toml` reads back equal."""
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> Regime:
        """Parse TOML text as data and validate it (see :meth:`from_dict`)."""
        return cls.from_dict(parse_data_text(text, "toml", "invalid TOML regime"))

    def to_yaml(self) -> str:
        """YAML text (``yaml.safe_dump``) that :meth:`from_yaml` reads back equal."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Regime:
        """Parse YAML text with ``yaml.safe_load`` (never executed) and validate it."""
        return cls.from_dict(parse_data_text(text, "yaml", "invalid YAML regime"))

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def milestones(self) -> tuple[float, ...]:
        """Start epochs of the phases after the first (where settings change)."""
        return tuple(p["epoch"] for p in self.phases[1:])

    def settings_at(self, epoch: float) -> dict[str, Any]:
        """Every setting in force at a (fractional) epoch, with the schedule and warm-up applied.

        The engine calls it before each update with ``epoch = updates_done / updates_per_epoch``. A
        phase is in force from its start epoch on; settings it does not name come from earlier
        phases. With ``schedule="cosine"`` the lr is ``lr0 * (1 + cos(pi * min(epoch / epochs, 1)))
        / 2`` (``lr0`` = the lr of phase 0). During warm-up (``epoch < warmup_epochs``) that lr is
        multiplied by ``s + (1 - s) * epoch / warmup_epochs`` with ``s = warmup_start_factor``.
        Epochs past the end give the last phase's settings.

        Args:
            epoch: epochs of training done, >= 0.

        Returns:
            A new dict of optimizer settings (no ``"epoch"`` key), ready for :func:`apply_settings`.

        Raises:
            ValueError: a negative or non-finite epoch.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, Real) or not math.isfinite(epoch) \
                or epoch < 0:
            raise ValueError(f"epoch must be a finite number >= 0, got {epoch!r}")
        settings: dict[str, Any] = {}
        for phase in self.phases:
            if phase["epoch"] > epoch + _EPOCH_TOL:
                break
            settings.update(phase)
        del settings["epoch"]
        lr = settings["lr"]
        if self.schedule == "cosine":
            progress = min(epoch / self.epochs, 1.0)
            lr = self.phases[0]["lr"] * 0.5 * (1.0 + math.cos(math.pi * progress))
        if epoch < self.warmup_epochs:
            s = self.warmup_start_factor
            lr = lr * (s + (1.0 - s) * epoch / self.warmup_epochs)
        settings["lr"] = float(lr)
        return settings

    def scale_epochs(self, factor: float) -> Regime:
        """A new regime with epochs, every milestone and the warm-up multiplied by ``factor``."""
        factor = _number("epoch factor", factor, low=0.0, low_ok=False)
        phases = tuple({**p, "epoch": p["epoch"] * factor} for p in self.phases)
        return dataclasses.replace(self, phases=phases, epochs=self.epochs * factor,
                                   warmup_epochs=self.warmup_epochs * factor)

    def with_epochs(self, epochs: float) -> Regime:
        """The regime stretched or shrunk to ``epochs``: milestones and warm-up move proportionally.

        Example:
            >>> r = Regime.from_dict({"epochs": 200, "phases": [{"epoch": 0, "lr": 0.1},
            ...                                                  {"epoch": 100, "lr": 0.01}]})
            >>> r.with_epochs(10).milestones
            (5.0,)
        """
        epochs = _number("epochs", epochs, low=0.0, low_ok=False)
        # multiply before dividing, so a whole-number ratio gives exact milestones
        phases = tuple({**p, "epoch": p["epoch"] * epochs / self.epochs} for p in self.phases)
        return dataclasses.replace(self, phases=phases, epochs=epochs,
                                   warmup_epochs=self.warmup_epochs * epochs / self.epochs)

