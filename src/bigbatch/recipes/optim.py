"""The optimizer side of a regime: build it once, then change its settings in place, per group.

:func:`build_optimizer` builds ``torch.optim.<regime.optimizer>`` from the regime's first settings;
:func:`apply_settings` sets a regime's settings at some epoch on an existing optimizer. The official
2017 code instead rebuilt SGD at every epoch, which silently reset the momentum buffers about every
13 updates at B = 4096 on CIFAR.

**Per-group semantics.** A regime names one value per setting; an optimizer may have several param
groups (a typical large-batch set-up gives BN and bias parameters ``weight_decay=0``, or a head its
own lr). Each group keeps its own value *relative to the optimizer's defaults* (the constructor's
keyword arguments): a group created with half the default lr follows half the regime's lr, a group
with ``weight_decay=0`` under a default of 5e-4 stays at 0, and a group equal to the defaults (the
only group of a plain ``SGD(model.parameters(), ...)``) gets the regime's values exactly. A group
whose value is not a multiple of the default (a default of 0 and a group value that is not 0, or a
non-numeric setting such as ``nesterov`` or ``betas`` that differs from the default) keeps its own
value. The only group of an optimizer always gets the regime's values exactly. The ratio is taken
the first time a setting is applied to a group and stored in the group under :data:`SCALE_KEY`,
so it survives a regime value of 0 at some phase (lr 0, weight decay switched off for a while)
and travels with ``optimizer.state_dict()`` into a resumed run.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import TYPE_CHECKING, Any

from bigbatch.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from bigbatch.recipes.regime import Regime

__all__ = ["SCALE_KEY", "apply_settings", "build_optimizer"]

# The param-group key holding each group's ratio to the optimizer defaults ({setting: float|None}).
SCALE_KEY = "bigbatch_scale"


def _unknown(where: str, what: str, key: object, allowed: Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    hint = difflib.get_close_matches(str(key), allowed, n=1)
    mean = f"did you mean {hint[0]!r}? " if hint else ""
    return ConfigError(f"{where}unknown {what} {key!r}; {mean}allowed: {', '.join(allowed)}")


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


def build_optimizer(params: Iterable[Any], regime: Regime) -> torch.optim.Optimizer:
    """``torch.optim.<regime.optimizer>(params, **settings_at(0), **optimizer_options)``.

    Build it once per run and change settings with :func:`apply_settings`.

    Raises:
        ConfigError: an unknown optimizer, or a setting value the optimizer rejects (its message).
    """
    from bigbatch.recipes.regime import Regime  # regime.py imports this module

    if not isinstance(regime, Regime):
        regime = Regime.from_dict(regime)
    cls, _ = _optimizer_class(regime.optimizer)
    kwargs = {**regime.optimizer_options, **regime.settings_at(0.0)}
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {regime.optimizer} with {kwargs}: {e}") from e


def _plain_value(value: Any) -> Any:
    """A tensor-valued setting (capturable/fused Adam's lr) as a Python number, else unchanged."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _ratio(value: Any, default: Any) -> float | None:
    """A group's value as a multiple of the default: 1 when equal, None when not a multiple."""
    value, default = _plain_value(value), _plain_value(default)
    if value == default:
        return 1.0
    if _is_number(value) and _is_number(default) and default != 0:
        return float(value) / float(default)
    return None


def _group_scales(optimizer: torch.optim.Optimizer, keys: Iterable[str]) -> list[dict[str, Any]]:
    """Each param group's ratio to the optimizer's defaults for ``keys``, recorded on first use.

    A ratio is taken from the group's current value the first time a key is asked for, and kept
    in the group (under :data:`SCALE_KEY`) from then on (see the module docstring).

    Returns:
        One ``{setting: ratio or None}`` dict per param group (the stored dicts themselves).
    """
    # An only group equals the defaults when it is built; if it differs now, a schedule or a
    # checkpoint from before this ratio existed changed it, and it follows the regime exactly.
    only = len(optimizer.param_groups) == 1
    scales = []
    for group in optimizer.param_groups:
        scale = group.setdefault(SCALE_KEY, {})
        for key in keys:
            if key not in scale:
                default = optimizer.defaults.get(key, group[key])
                scale[key] = 1.0 if only else _ratio(group[key], default)
        scales.append(scale)
    return scales


def _scaled_value(value: Any, ratio: float | None, current: Any) -> Any:
    """What a group with ``ratio`` to the defaults gets for a regime value (``current``: keep)."""
    if ratio is None:
        return current
    if ratio == 1.0 or not _is_number(value):
        return value
    return value * ratio


def apply_settings(optimizer: torch.optim.Optimizer, settings: Mapping[str, Any]) -> None:
    """Set a regime's ``settings`` (lr, momentum, weight_decay, ...) on every param group, in place.

    Each group gets the setting relative to the optimizer's defaults (see the module docstring: a
    group equal to the defaults gets ``settings`` exactly, one with half the default lr half the
    lr, one with ``weight_decay=0`` keeps 0). The optimizer and its state (momentum buffers, Adam
    moments) are kept. A tensor-valued setting (e.g. ``lr`` of a capturable or fused Adam) is
    filled in place, so CUDA graphs and compiled steps that captured it see the new value.

    Raises:
        ConfigError: a setting that the optimizer's param groups do not have (nothing is changed).
    """
    import torch

    for group in optimizer.param_groups:
        for key in settings:
            if key not in group:
                allowed = [k for k in group if k not in ("params", SCALE_KEY)]
                raise _unknown("", f"setting for {type(optimizer).__name__}", key, allowed)
    scales = _group_scales(optimizer, settings)
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        for key, value in settings.items():
            new = _scaled_value(value, scale[key], group[key])
            if isinstance(group[key], torch.Tensor):
                group[key].fill_(new)
            else:
                group[key] = new
