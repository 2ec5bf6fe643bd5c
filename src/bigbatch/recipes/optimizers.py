"""Layer-wise adaptive large-batch optimizers: LARS (You et al. 2017) and LAMB (You et al. 2019).

Both scale each parameter tensor's step by a *trust ratio* ``||w|| / ||update||``, so every layer
moves by a similar fraction of its norm whatever the size of its gradient. As is usual (SimCLR,
VICReg, timm's ``always_adapt=False`` with the bias/norm exclusion), tensors with ``ndim <= 1``
(biases, BN and ghost-BN weights) get neither the trust ratio nor weight decay: their norm says
nothing about a layer's scale. A regime names them like any ``torch.optim`` class
(``optimizer = "LARS"``); :data:`OPTIMIZERS` is the table ``recipes.regime`` consults first.

Why not a dependency: ``pytorch-optimizer`` 4.1 (checked on torch 2.13 CPU) has both, but its
LAMB decouples weight decay, clips the global gradient norm and clamps ``||w||`` at 10 by default
(none of which is in the paper), excludes nothing from the trust ratio, and both take ``**kwargs``,
so a misspelt regime setting would pass silently; its LARS rescales ``p.grad`` in place.

Caution (Nado et al. 2021): tuned Nesterov momentum and Adam match LARS and LAMB at large batch
sizes; compare against re-tuned baselines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = ["LAMB", "LARS", "OPTIMIZERS"]


def _check(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
           low_ok: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value >= low if low_ok else value > low) and value < high
    if not ok:
        bounds = f"{'[' if low_ok else '('}{low:g}, {high:g})"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    return float(value)


def _trust_ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor,
                 coefficient: float = 1.0) -> torch.Tensor:
    """``coefficient * weight_norm / update_norm``, or 1 where either norm is 0 (a zero layer, or
    no update): the convention of timm and pytorch-optimizer."""
    ok = (weight_norm > 0) & (update_norm > 0)
    return torch.where(ok, coefficient * weight_norm / torch.where(ok, update_norm, 1.0), 1.0)


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """The step both share: each parameter with a dense gradient is updated on its own."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


class LARS(_LayerwiseOptimizer):
    """LARS, Algorithm 1 of You, Gitman, Ginsburg 2017 ("Large Batch Training of Convolutional
    Networks"), with the momentum buffer holding the global lr as in the paper.

    For each parameter tensor ``w`` with gradient ``g`` (``lr`` = the global lr ``gamma_t``)::

        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)
        v = momentum * v + lr * local_lr * (g + weight_decay * w)
        w = w - v

    and for tensors with ``ndim <= 1`` (when ``exclude_1d``) ``v = momentum * v + lr * g``. A
    ``local_lr`` whose numerator or denominator is 0 is taken as 1.

    Args:
        params: parameters or parameter groups.
        lr: the global learning rate (the paper's base lr is large, e.g. 2 to 30 for AlexNet-BN
            at 8k, because ``trust_coefficient`` is small).
        momentum: ``m`` in [0, 1).
        weight_decay: ``beta`` >= 0.
        trust_coefficient: ``eta`` > 0 (0.001 in the paper).
        exclude_1d: leave biases and normalisation weights out of the trust ratio and decay.
    """

    def __init__(self, params: Iterable, lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                 exclude_1d: bool = True) -> None:
        defaults = {"lr": _check("lr", lr), "momentum": _check("momentum", momentum, high=1.0),
                    "weight_decay": _check("weight_decay", weight_decay),
                    "trust_coefficient": _check("trust_coefficient", trust_coefficient,
                                                low_ok=False),
                    "exclude_1d": bool(exclude_1d)}
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        if group["exclude_1d"] and p.ndim <= 1:
            step = grad * group["lr"]
        else:
            decay = group["weight_decay"]
            w_norm = torch.linalg.vector_norm(p)
            local_lr = _trust_ratio(w_norm, torch.linalg.vector_norm(grad) + decay * w_norm,
                                    group["trust_coefficient"])
            step = (grad + decay * p) * (local_lr * group["lr"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = step.clone()  # v_0 = 0, so v_1 = step
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(step)
        p.sub_(state["momentum_buffer"])


class LAMB(_LayerwiseOptimizer):
    """LAMB, Algorithm 2 of You et al. 2019 ("Large Batch Optimization for Deep Learning: Training
    BERT in 76 minutes"), with bias correction and the identity scaling ``phi(z) = z``.

    For each parameter tensor ``w`` with gradient ``g`` at step ``t``::

        m = beta1 * m + (1 - beta1) * g          v = beta2 * v + (1 - beta2) * g**2
        r = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)
        u = r + weight_decay * w
        w = w - lr * ||w|| / ||u|| * u

    and for tensors with ``ndim <= 1`` (when ``exclude_1d``) ``w = w - lr * r`` (Adam). A trust
    ratio with ``||w|| = 0`` or ``||u|| = 0`` is taken as 1.

    Args:
        params: parameters or parameter groups.
        lr: the learning rate ``eta``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: ``lambda`` >= 0.
        exclude_1d: leave biases and normalisation weights out of the trust ratio and decay.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, exclude_1d: bool = True) -> None:
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        defaults = {"lr": _check("lr", lr),
                    "betas": (_check("betas[0]", betas[0], high=1.0),
                              _check("betas[1]", betas[1], high=1.0)),
                    "eps": _check("eps", eps, low_ok=False),
                    "weight_decay": _check("weight_decay", weight_decay),
                    "exclude_1d": bool(exclude_1d)}
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        update = (state["exp_avg"] / (1.0 - beta1**t)).div_(denom)
        if group["exclude_1d"] and p.ndim <= 1:
            p.sub_(update, alpha=group["lr"])
            return
        update.add_(p, alpha=group["weight_decay"])
        ratio = _trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(update))
        p.sub_(update * (ratio * group["lr"]))


#: Optimizers a regime can name beside ``torch.optim``'s, by the name it uses.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"LARS": LARS, "LAMB": LAMB}
