"""The "ultra-slow diffusion" diagnostic: distance of the weights from their initialisation.

Hoffer et al. 2017 (section 3) observe that in the initial high-learning-rate phase ``||w_t -
w_0||`` grows only logarithmically in the number of updates t, like a random walk on a random
potential, and not as ``sqrt(t)`` like a free random walk. Fewer updates (a large batch at a fixed
number of epochs) therefore mean the weights travel less far. :class:`WeightDistance` measures the
distance during training, :func:`log_spaced_updates` says when to measure it, and :func:`fit_log` /
:func:`fit_sqrt` compare the two growth laws on the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Fit", "LogFit", "SqrtFit", "WeightDistance", "fit_log", "fit_sqrt", "log_spaced_updates",
]


class WeightDistance:
    """``||w_t - w_0||`` over all parameters of a model, and per parameter.

    Takes a snapshot ``w_0`` (detached clones, on the parameters' devices; this doubles parameter
    memory) when created. Parameter names are those of the unwrapped model, so the snapshot keeps
    working after the model is wrapped in ``DistributedDataParallel`` or ``torch.compile``, and
    after ``convert_ghost_batchnorm`` (which keeps the same parameters and names).
    Args:
        model: the model at initialisation.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> wd = WeightDistance(model)
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(3.0)
        >>> total, per_parameter = wd(model)
        >>> round(total, 6), round(per_parameter["bias"], 6), per_parameter["weight"]
        (3.0, 3.0, 0.0)
    """

    def __init__(self, model: nn.Module) -> None:
        from bigbatch.distributed import unwrap  # DDP, DataParallel, torch.compile: by type

        self._w0: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in unwrap(model).named_parameters()
        }

    def __call__(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """Distance of ``model``'s parameters from the snapshot.

        Returns:
            ``(total, per_parameter)``: the L2 norm of the difference over all parameters, and the
            norm for each parameter name (``total ** 2`` is the sum of their squares).

        Raises:
            ValueError: the model's parameter names or shapes differ from the snapshot's.
        """
        import torch

        from bigbatch.distributed import unwrap

        params = dict(unwrap(model).named_parameters())
        self._check(params.keys(), {k: tuple(p.shape) for k, p in params.items()}, "the model")
        if not params:
            return 0.0, {}
        # A model moved after the snapshot (say created on the CPU, then .to("cuda"), as
        # nn.DataParallel does by itself): move the snapshot once, to where the parameters are.
        for name, w0 in self._w0.items():
            if w0.device != params[name].device:
                self._w0[name] = w0.to(params[name].device)
        # One norm per parameter, computed on its device in float32 (or wider), then a single
        # transfer to the host: a .item() per parameter would synchronise a GPU once per tensor.
        norms = [
            torch.linalg.vector_norm(
                params[name].detach().to(_wide(w0.dtype)) - w0.to(_wide(w0.dtype)))
            for name, w0 in self._w0.items()
        ]
        device = norms[0].device
        values = torch.stack([n.to(device) for n in norms]).tolist()
        per_parameter = dict(zip(self._w0, values, strict=True))
        total = math.sqrt(math.fsum(v * v for v in values))
        return total, per_parameter

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot ``{parameter name: w_0}``.

        Tensors only, so ``torch.load(weights_only=True)`` reads it back from a checkpoint.
        """
        return dict(self._w0)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore a snapshot (on resume), moved to the device and dtype of the current parameters.

        Raises:
            ValueError: names or shapes differ from the model this object was created with.
        """
        self._check(state_dict.keys(), {k: tuple(v.shape) for k, v in state_dict.items()},
                    "the loaded state_dict")
        self._w0 = {
            name: state_dict[name].detach().to(device=w0.device, dtype=w0.dtype).clone()
            for name, w0 in self._w0.items()
        }

    def _check(self, names, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
        missing = sorted(set(self._w0) - set(names))
        extra = sorted(set(names) - set(self._w0))
        if missing or extra:
            raise ValueError(f"{what} does not match the weight-distance snapshot: missing "
                             f"{missing or 'none'}, unexpected {extra or 'none'}")
        for name, w0 in self._w0.items():
            if tuple(w0.shape) != shapes[name]:
                raise ValueError(f"{what}: parameter {name!r} has shape {shapes[name]}, "
                                 f"the snapshot has {tuple(w0.shape)}")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters: a bf16 difference loses small drifts."""
    import torch

    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def log_spaced_updates(max_updates: int, per_decade: int = 8) -> list[int]:
    """Update counts spaced evenly on a log axis: 1, 2, 3, ..., up to and including ``max_updates``.

    The points ``round(10 ** (k / per_decade))`` for k = 0, 1, ..., deduplicated, plus
    ``max_updates`` itself.

    Raises:
        ValueError: ``max_updates < 1`` or ``per_decade < 1``.

    Example:
        >>> log_spaced_updates(100, per_decade=4)
        [1, 2, 3, 6, 10, 18, 32, 56, 100]
    """
    if isinstance(max_updates, bool) or not isinstance(max_updates, int) or max_updates < 1:
        raise ValueError(f"max_updates must be an integer >= 1, got {max_updates!r}")
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
        raise ValueError(f"per_decade must be an integer >= 1, got {per_decade!r}")
    num = math.ceil(per_decade * math.log10(max_updates)) + 1
    points = {round(10 ** (k / per_decade)) for k in range(num)}
    return sorted({p for p in points if p <= max_updates} | {max_updates})


class Fit(NamedTuple):
    """A least-squares fit ``d = a + b * f(t)``; ``r2`` is the coefficient of determination."""

    a: float
    b: float
    r2: float

    def predict(self, t):  # noqa: ANN001, ANN201 - float or array in, same out
        """``a + b * f(t)`` for a number or an array of update counts."""
        values = self.a + self.b * self._transform(np.asarray(t, dtype=np.float64))
        return float(values) if np.ndim(values) == 0 else values

    @staticmethod
    def _transform(t: np.ndarray) -> np.ndarray:
        raise NotImplementedError("use fit_log or fit_sqrt, whose fits know their f(t)")


class LogFit(Fit):
    """``d = a + b * ln t``: the paper's ultra-slow diffusion (returned by :func:`fit_log`)."""

    __slots__ = ()

    @staticmethod
    def _transform(t: np.ndarray) -> np.ndarray:
        return np.log(t)


class SqrtFit(Fit):
    """``d = a + b * sqrt t``: a free random walk (returned by :func:`fit_sqrt`)."""

    __slots__ = ()

    @staticmethod
    def _transform(t: np.ndarray) -> np.ndarray:
        return np.sqrt(t)


def _fit(cls: type[Fit], t: Sequence[float], d: Sequence[float]) -> Fit:
    t = np.asarray(t, dtype=np.float64).ravel()
    d = np.asarray(d, dtype=np.float64).ravel()
    if t.shape != d.shape:
        raise ValueError(f"t and d must have the same length, got {t.size} and {d.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(d))):
        raise ValueError("t and d must be finite (no NaN or Inf)")
    if np.any(t <= 0):
        raise ValueError(f"t must be > 0 (update counts start at 1), got min {t.min():g}")
    if np.unique(t).size < 2:
        raise ValueError(f"a fit needs at least 2 distinct values of t, got {np.unique(t).size}")
    x = cls._transform(t)
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, d, rcond=None)
    residual = float(np.sum((d - (a + b * x)) ** 2))
    total = float(np.sum((d - d.mean()) ** 2))
    # Constant d (up to float rounding of its mean): the fit with b = 0 is exact, so r2 = 1 rather
    # than 0/0 or a ratio of two rounding errors.
    rounding = d.size * (8 * np.finfo(np.float64).eps * float(np.max(np.abs(d)))) ** 2
    r2 = 1.0 - residual / total if total > rounding else 1.0
    return cls(float(a), float(b), r2)


def fit_log(t: Sequence[float], d: Sequence[float]) -> LogFit:
    """Least-squares fit of ``d = a + b * ln t`` (distance vs. updates; the paper's Figure 2 lines).

    Args:
        t: update counts (> 0), at least 2 distinct values.
        d: weight distances at those updates.

    Returns:
        ``LogFit(a, b, r2)``, a :class:`Fit` with ``predict(t)``.

    Raises:
        ValueError: fewer than 2 distinct t, t <= 0, lengths differ, or non-finite values.

    Example:
        >>> fit = fit_log([1, 10, 100], [2.0, 4.0, 6.0])
        >>> round(fit.b * math.log(10), 6), round(fit.r2, 6)
        (2.0, 1.0)
    """
    return _fit(LogFit, t, d)


def fit_sqrt(t: Sequence[float], d: Sequence[float]) -> SqrtFit:
    """Least-squares fit of ``d = a + b * sqrt t`` (the control: a free random walk).

    Same arguments and errors as :func:`fit_log`; returns ``SqrtFit(a, b, r2)``.
    """
    return _fit(SqrtFit, t, d)
