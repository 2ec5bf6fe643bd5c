"""Training regimes as data: phases of optimizer settings over epochs, and large-batch adaptation.

A regime is the schedule the paper calls the "training regime": the optimizer, the number of epochs
and piecewise-constant settings (lr, momentum, weight decay) that change at epoch milestones. Its
plain-dict form, which is also the TOML/YAML form::

    {"optimizer": "SGD", "epochs": 5, "schedule": "step", "warmup_epochs": 0.0,
     "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                {"epoch": 3, "lr": 0.01}, {"epoch": 4, "lr": 0.001}]}

Later phases inherit every setting they do not name. :func:`adapt_regime` applies the paper's two
regime-level measures: learning-rate scaling (+LR) and regime adaptation (+RA, train B/B0 times
more epochs with every milestone stretched by the same factor, so the *number of updates* matches
small-batch training), plus an optional Goyal et al. warm-up.

The optimizer is built once (:func:`build_optimizer`) and its settings are changed in place
(:func:`apply_settings`); the official 2017 code instead rebuilt SGD at every epoch, which silently
reset the momentum buffers about every 13 updates at B = 4096 on CIFAR.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import TYPE_CHECKING, Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import parse_data_text
from bigbatch.recipes.scaling import lr_scale_factor

if TYPE_CHECKING:
    import torch

__all__ = [
    "SCHEDULES",
    "Regime",
    "adapt_regime",
    "apply_settings",
    "build_optimizer",
    "format_adaptation_table",
    "num_updates",
    "updates_per_epoch",
]

logger = logging.getLogger(__name__)

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
def _unknown(where: str, what: str, key: object, allowed: Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    mean = f"did you mean {hint[0]!r}? " if hint else ""
    return ConfigError(f"{where}unknown {what} {key!r}; {mean}allowed: {', '.join(allowed)}")


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


def _plain(value: Any) -> Any:
    """Tuples back to lists, read-only dicts to dicts: what TOML/YAML writers and users expect."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tidy_epoch(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


@functools.cache
def _optimizer_class(name: str) -> tuple[type, frozenset[str] | None]:
    """`torch.optim.<name>` and the keyword settings its constructor takes (None: any, via **kw)."""
    import torch.optim

    def is_optimizer(obj: object) -> bool:
        return (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)
                and obj is not torch.optim.Optimizer)

    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not is_optimizer(cls):
        known = [n for n in dir(torch.optim) if is_optimizer(getattr(torch.optim, n))]
        raise _unknown("", "optimizer", name, known)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return cls, None
    return cls, frozenset(p.name for p in params if p.name != "params"
                          and p.kind is not inspect.Parameter.VAR_POSITIONAL)


def _check_setting_names(where: str, keys: Iterable[str], optimizer: str,
                         accepted: frozenset[str] | None) -> None:
    if accepted is None:
        return
    for key in keys:
        if key not in accepted:
            raise _unknown(where, f"setting for {optimizer}", key, accepted)


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
        phases = []
        for i, phase in enumerate(self.phases):
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
            if i > 0 and start <= phases[-1]["epoch"]:
                raise ConfigError(f"{where}.epoch ({start:g}) must be greater than "
                                  f"phases[{i - 1}].epoch ({phases[-1]['epoch']:g}): phases are "
                                  "sorted by start epoch")
            if start >= self.epochs:
                raise ConfigError(f"{where}.epoch ({start:g}) must be less than epochs "
                                  f"({self.epochs:g}): a phase at or after the end never runs")
            if "lr" in settings:
                _number(f"{where}.lr", settings["lr"], low=0.0)
            normal = {k: _setting(f"{where}.{k}", v) for k, v in settings.items()}
            phases.append(_ReadOnlyDict(epoch=start, **normal))
        set_("phases", tuple(phases))

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
            "optimizer_options": _plain(self.optimizer_options),
            "phases": [{"epoch": _tidy_epoch(p["epoch"]), **_plain({k: v for k, v in p.items()
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


# -- counting updates -----------------------------------------------------------------------------
def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def updates_per_epoch(dataset_size: int, batch_size: int) -> int:
    """``ceil(dataset_size / batch_size)``: the last, partial batch of an epoch is kept.

    Example:
        >>> updates_per_epoch(50000, 4096)
        13
    """
    n = _positive_int("dataset_size", dataset_size)
    b = _positive_int("batch_size", batch_size)
    return -(-n // b)


def num_updates(regime: Regime, dataset_size: int, batch_size: int) -> int:
    """Total updates of a run: ``regime.epochs * updates_per_epoch`` rounded to the nearest integer.

    Halves round up, and a relative tolerance of 1e-9 absorbs float noise from rescaled epochs
    (``2.5 * 4096 / 128``), so two regimes whose exact update counts agree always count the same.
    """
    x = regime.epochs * updates_per_epoch(dataset_size, batch_size)
    return math.floor(x + 0.5 + 1e-9 * max(1.0, x))


def _samples(num: int, dataset_size: int, batch_size: int) -> int:
    """Samples seen in ``num`` updates when every epoch ends with a partial batch."""
    per_epoch = updates_per_epoch(dataset_size, batch_size)
    full, rest = divmod(num, per_epoch)
    return full * dataset_size + min(dataset_size, rest * batch_size)


# -- large-batch adaptation -----------------------------------------------------------------------
def _epoch_factor(regime_adaptation: bool | float, base_batch_size: int, batch_size: int) -> float:
    if isinstance(regime_adaptation, bool):
        return batch_size / base_batch_size if regime_adaptation else 1.0
    return _number("regime_adaptation", regime_adaptation, low=0.0, low_ok=False)


def adapt_regime(
    regime: Regime | Mapping[str, Any],
    base_batch_size: int,
    batch_size: int,
    lr_scaling: str = "sqrt",
    regime_adaptation: bool | float = True,
    warmup_epochs: float = 0.0,
) -> Regime:
    """Adapt a regime tuned at ``base_batch_size`` to ``batch_size`` (Hoffer et al. 2017: +LR, +RA).

    * **+LR**: the lr of every phase is multiplied by ``lr_scale_factor(base_batch_size,
      batch_size, lr_scaling)`` (``sqrt(B / B0)`` for the paper).
    * **+RA**: epochs, every milestone and an existing warm-up are multiplied by ``B / B0`` when
      ``regime_adaptation`` is True, by the number itself when it is a float, and kept when False.
      The factor is the exact ratio B/B0, not the official code's ``ceil(B / B0)``: with it the
      number of updates ``epochs * ceil(N / B)`` equals the base regime's up to the rounding of the
      last, partial batch of each epoch (exactly when B0 and B both divide N; in general the
      difference is ``epochs * (((-N) mod B) - ((-N) mod B0)) / B0`` updates, +-1), while ``ceil``
      would train up to twice as long for a batch size that is not a multiple of B0.
    * **warm-up**: ``warmup_epochs > 0`` (in epochs of the *adapted* regime) replaces any warm-up
      with a linear ramp from the base-batch lr to the scaled lr (``warmup_start_factor = 1 / lr
      factor``, Goyal et al. 2017). Without lr scaling up, the two lrs coincide and the ramp is
      flat. ``warmup_epochs = 0`` keeps the input's own warm-up (stretched with the other epochs).

    The input is never modified (a :class:`Regime` is immutable; a dict is only read).

    Args:
        regime: a :class:`Regime` or its dict form.
        base_batch_size: the batch size B0 the regime was tuned for.
        batch_size: the batch size B to train with.
        lr_scaling: ``"sqrt"``, ``"linear"`` or ``"none"``.
        regime_adaptation: True (x B/B0), False (x1) or a factor > 0 for epochs and milestones.
        warmup_epochs: warm-up length in adapted epochs, >= 0 and <= the adapted epochs.

    Returns:
        A new :class:`Regime`.

    Raises:
        ConfigError: bad batch sizes, scaling rule, adaptation factor or warm-up.

    Example:
        >>> base = {"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1}, {"epoch": 3, "lr": 0.01}]}
        >>> r = adapt_regime(base, 128, 512)
        >>> r.epochs, r.milestones, r.phases[0]["lr"]
        (20.0, (12.0,), 0.2)
    """
    if not isinstance(regime, Regime):
        regime = Regime.from_dict(regime)
    lr_factor = lr_scale_factor(base_batch_size, batch_size, lr_scaling)
    adapted = regime.scale_epochs(_epoch_factor(regime_adaptation, base_batch_size, batch_size))
    phases = tuple({**p, "lr": p["lr"] * lr_factor} if "lr" in p else p for p in adapted.phases)
    warmup = _number("warmup_epochs", warmup_epochs, low=0.0)
    if warmup > 0:
        start = min(1.0, 1.0 / lr_factor)
        if start == 1.0:
            logger.info("warm-up of %g epochs is flat: the lr is not scaled up (factor %g)",
                        warmup, lr_factor)
        return dataclasses.replace(adapted, phases=phases, warmup_epochs=warmup,
                                   warmup_start_factor=start)
    return dataclasses.replace(adapted, phases=phases)


def format_adaptation_table(
    before: Regime | Mapping[str, Any],
    after: Regime | Mapping[str, Any],
    *,
    base_batch_size: int,
    batch_size: int,
    dataset_size: int,
) -> str:
    """A plain-text table comparing a small-batch regime with its large-batch adaptation.

    Rows: batch size, schedule, lr of each phase (with its start epoch), epochs, milestones,
    warm-up, updates per epoch, number of updates and samples processed (every epoch's last batch
    is partial).

    Example:
        >>> base = Regime.from_dict({"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1}]})
        >>> print(format_adaptation_table(base, adapt_regime(base, 128, 512), base_batch_size=128,
        ...                               batch_size=512, dataset_size=1024))
                           small batch  large batch
        batch size         128          512
        schedule           step         step
        lr, phase 1        0.1 @ ep 0   0.2 @ ep 0
        epochs             5            20
        milestones         -            -
        warm-up            -            -
        updates per epoch  8            2
        number of updates  40           40
        samples processed  5120         20480
    """
    before = before if isinstance(before, Regime) else Regime.from_dict(before)
    after = after if isinstance(after, Regime) else Regime.from_dict(after)

    def column(r: Regime, b: int) -> list[str]:
        n = num_updates(r, dataset_size, b)
        lrs = [f"{p['lr']:.6g} @ ep {p['epoch']:g}" if "lr" in p else f"(kept) @ ep {p['epoch']:g}"
               for p in r.phases]
        warm = (f"{r.warmup_epochs:g} ep from x{r.warmup_start_factor:.3g}"
                if r.warmup_epochs > 0 else "-")
        return [str(b), r.schedule, *lrs + [""] * (num_phases - len(lrs)), f"{r.epochs:g}",
                ", ".join(f"{m:g}" for m in r.milestones) or "-", warm,
                str(updates_per_epoch(dataset_size, b)), str(n), str(_samples(n, dataset_size, b))]

    num_phases = max(len(before.phases), len(after.phases))
    labels = ["batch size", "schedule", *[f"lr, phase {i + 1}" for i in range(num_phases)],
              "epochs", "milestones", "warm-up", "updates per epoch", "number of updates",
              "samples processed"]
    left, right = column(before, base_batch_size), column(after, batch_size)
    widths = [max(map(len, col)) + 2 for col in (labels, left + ["small batch"])]
    lines = [f"{'':<{widths[0]}}{'small batch':<{widths[1]}}large batch"]
    rows = zip(labels, left, right, strict=True)
    lines += [f"{a:<{widths[0]}}{b:<{widths[1]}}{c}" for a, b, c in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- optimizer ------------------------------------------------------------------------------------
def build_optimizer(params: Iterable[Any], regime: Regime) -> torch.optim.Optimizer:
    """``torch.optim.<regime.optimizer>(params, **settings_at(0), **optimizer_options)``.

    Build it once per run and change settings with :func:`apply_settings`.

    Raises:
        ConfigError: an unknown optimizer, or a setting value the optimizer rejects (its message).
    """
    if not isinstance(regime, Regime):
        regime = Regime.from_dict(regime)
    cls, _ = _optimizer_class(regime.optimizer)
    kwargs = {**regime.optimizer_options, **regime.settings_at(0.0)}
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {regime.optimizer} with {kwargs}: {e}") from e


def apply_settings(optimizer: torch.optim.Optimizer, settings: Mapping[str, Any]) -> None:
    """Set ``settings`` (lr, momentum, weight_decay, ...) on every param group, in place.

    The optimizer and its state (momentum buffers, Adam moments) are kept. The official 2017 code
    rebuilt SGD at every epoch to change the lr, which threw the momentum buffers away; we never do.
    A tensor-valued setting (e.g. ``lr`` of a capturable or fused Adam) is filled in place, so CUDA
    graphs and compiled steps that captured it see the new value.

    Raises:
        ConfigError: a setting that the optimizer's param groups do not have (nothing is changed).
    """
    import torch

    for group in optimizer.param_groups:
        for key in settings:
            if key not in group:
                allowed = [k for k in group if k != "params"]
                raise _unknown("", f"setting for {type(optimizer).__name__}", key, allowed)
    for group in optimizer.param_groups:
        for key, value in settings.items():
            if isinstance(group[key], torch.Tensor):
                group[key].fill_(value)
            else:
                group[key] = value
