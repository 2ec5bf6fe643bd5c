"""A small timm-style model registry: ``@register`` a builder, ``create`` a model by name.

Each registered name carries a :class:`ModelSpec`: the dataset it was designed for (which supplies
``num_classes``, ``in_channels`` and ``image_size`` when the caller leaves them out), the paper's
default training regime in the regime format of :mod:`bigbatch.recipes.regime`, the gradient-norm
clip the official code used, and the published parameter count the tests check against.

Example:
    >>> import torch
    >>> from bigbatch import models
    >>> model = models.create("f1", in_channels=1, image_size=8, hidden=32, depth=2)
    >>> model(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    >>> models.get_spec("resnet44").default_regime["phases"][1]
    {'epoch': 81, 'lr': 0.01}
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from bigbatch.data.registry import get_info, is_dataset
from bigbatch.errors import ConfigError
from bigbatch.plugins import load_entry_points

__all__ = ["ModelSpec", "create", "get_spec", "is_registered", "names", "register", "step_regime"]

# Keyword arguments every builder takes; the rest of its keyword parameters are its "options".
_SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What bigbatch knows about a registered model besides how to build it.

    Attributes:
        name: registry name (follows the paper: ``f1``, ``c1``, ``resnet44`` ...). default_dataset:
        dataset the paper trains it on; supplies the input-shape defaults of ``create``.
        default_regime: training regime in the dict format of ``Regime.from_dict`` (optimizer,
        epochs,
            schedule, warmup_epochs, phases sorted by start epoch). :func:`get_spec` returns a copy.
        default_clip_grad_norm: gradient-norm clip (the official code clips at 5 every step), or
        None. default_batch_size: the small-batch reference size of the paper (128). paper_params:
        published parameter count of the architecture on ``default_dataset`` (see each
            builder's docstring for the source), or None where no figure is published.
        description: one line for ``bigbatch models``.
    """

    name: str
    default_dataset: str
    default_regime: dict[str, Any]
    default_clip_grad_norm: float | None = None
    default_batch_size: int = 128
    paper_params: int | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    builder: Callable[..., nn.Module]
    options: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register(
    name: str,
    *,
    default_dataset: str,
    default_regime: Mapping[str, Any],
    default_clip_grad_norm: float | None = None,
    default_batch_size: int = 128,
    paper_params: int | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model builder under ``name``.

    The builder must take keyword arguments ``num_classes``, ``in_channels`` and ``image_size``; its
    other keyword parameters (with defaults) become the options ``create`` accepts. ``**kwargs`` is
    not allowed, so that a misspelt option is an error rather than silently ignored.

    Args:
        name: registry name; must be new.
        default_dataset: a dataset name (``"cifar10"``, ``"mnist"`` ...).
        default_regime: the paper's regime dict (copied).
        default_clip_grad_norm: see :class:`ModelSpec`.
        default_batch_size: see :class:`ModelSpec`.
        paper_params: see :class:`ModelSpec`.
        description: one line; defaults to the first line of the builder's docstring.

    Returns:
        The decorator, which returns the builder unchanged.

    Raises:
        ValueError: the name is taken, the dataset unknown, or the builder's signature unsuitable
            (programming errors, raised at import time).
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if not is_dataset(default_dataset):
            raise ValueError(f"model {name!r}: unknown default_dataset {default_dataset!r} "
                             "(register the dataset first)")
        params = inspect.signature(builder).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"builder of {name!r} must list its options explicitly, not **kwargs")
        missing = [arg for arg in _SHAPE_ARGS if arg not in params]
        if missing:
            raise ValueError(f"builder of {name!r} lacks keyword argument(s) {missing}")
        options = tuple(sorted(p for p in params if p not in _SHAPE_ARGS))
        doc_line = (inspect.getdoc(builder) or "").strip().splitlines()
        spec = ModelSpec(
            name=name,
            default_dataset=default_dataset,
            default_regime=copy.deepcopy(dict(default_regime)),
            default_clip_grad_norm=default_clip_grad_norm,
            default_batch_size=default_batch_size,
            paper_params=paper_params,
            description=description if description is not None else (doc_line or [""])[0],
        )
        _REGISTRY[name] = _Entry(spec=spec, builder=builder, options=options)
        return builder

    return decorator


def names() -> list[str]:
    """Sorted names of all registered models (the ``bigbatch.models`` entry points loaded)."""
    load_entry_points("bigbatch.models")
    return sorted(_REGISTRY)


def is_registered(name: str) -> bool:
    """Whether ``name`` is a model, loading the ``bigbatch.models`` entry points once on a miss."""
    if name not in _REGISTRY:
        load_entry_points("bigbatch.models")
    return name in _REGISTRY


def _entry(name: str) -> _Entry:
    entry = _REGISTRY.get(name) if is_registered(name) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), names(), n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (known models: {', '.join(names())})")
    return entry


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``, with a private copy of its regime (safe to modify).

    Raises:
        ConfigError: unknown name (the message suggests close names).
    """
    spec = _entry(name).spec
    return dataclasses.replace(spec, default_regime=copy.deepcopy(spec.default_regime))


def dataset_shape(dataset: str) -> tuple[int, int, int]:
    """``(num_classes, in_channels, image_size)`` of a dataset (from ``bigbatch.data.DATASETS``,
    the one owner of these facts)."""
    info = get_info(dataset)
    return info.num_classes, info.in_channels, info.image_size


def step_regime(
    epochs: float,
    lr: float,
    *,
    momentum: float,
    weight_decay: float,
    drops: Mapping[float, float | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A step-schedule SGD regime dict in the format of ``Regime.from_dict``.

    Args:
        epochs: total training epochs. lr: learning rate of the first phase. momentum: SGD momentum
        (inherited by later phases). weight_decay: weight decay (inherited by later phases). drops:
        the later phases, ``{start_epoch: lr}`` or ``{start_epoch: {"lr": ..., other settings}}``;
            settings a phase does not name are inherited from the one before.

    Returns:
        ``{"optimizer": "SGD", "epochs", "schedule": "step", "warmup_epochs": 0.0, "phases":
        [...]}`` with phases sorted by start epoch.

    Example:
        >>> step_regime(3, 0.1, momentum=0.9, weight_decay=0.0, drops={2: 0.01})["phases"]
        [{'epoch': 0, 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.0}, {'epoch': 2, 'lr': 0.01}]
    """
    phases: list[dict[str, Any]] = [
        {"epoch": 0, "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    ]
    for epoch, value in sorted((drops or {}).items()):
        settings = dict(value) if isinstance(value, Mapping) else {"lr": value}
        phases.append({"epoch": epoch, **settings})
    return {
        "optimizer": "SGD",
        "epochs": epochs,
        "schedule": "step",
        "warmup_epochs": 0.0,
        "phases": phases,
    }


def _check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def create(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a registered model.

    Shape arguments left as None come from the model's default dataset (e.g. 10 classes, 3 channels
    and 32 px for the CIFAR-10 models), so ``create("resnet44")`` is the paper's network.

    Args:
        name: a name from :func:`names`.
        num_classes: number of outputs.
        in_channels: channels of the input images.
        image_size: height (= width) of the input images in pixels; a square ``(h, w)`` pair is
            accepted too.
        **options: model-specific options (e.g. ``hidden``/``depth`` for ``f1``); see each builder.

    Returns:
        A freshly initialised ``nn.Module`` with plain ``nn.BatchNorm`` layers (apply
        ``bigbatch.convert_ghost_batchnorm`` for ghost batch norm).

    Raises:
        ConfigError: unknown model name (with a did-you-mean), unknown option (naming the allowed
        ones),
            or an invalid value.

    Example:
        >>> import torch
        >>> create("c1", width=8, fc_sizes=(16, 8))(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    entry = _entry(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, entry.options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = ", ".join(entry.options) or "none"
        raise ConfigError(
            f"model {name!r} has no option {key!r}{hint} (allowed options: {allowed})"
        )
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if None in shape.values():  # only then: a registered loader of the default dataset runs
        defaults = dict(zip(shape, dataset_shape(entry.spec.default_dataset), strict=True))
        shape = {k: defaults[k] if v is None else v for k, v in shape.items()}
    size = shape["image_size"]
    if isinstance(size, (tuple, list)):
        # Datasets may describe their size as (height, width); the models take square inputs.
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"image_size must be an int or a square (h, w) pair, got {size!r}")
        shape["image_size"] = size[0]
    for key, value in shape.items():
        _check_positive_int(key, value)
    return entry.builder(**shape, **options)
