"""Optimisers and schedules as in the reference: SGD with momentum or Adam, optional global-norm
clipping and weight decay, a constant, cosine or OneCycle learning rate.

Adam's β₁ is ``momentum`` (0.9 when unset) and its β₂ is ``beta2`` (0.999): the second-moment average
``v ← β₂ v + (1 - β₂) f²`` remembers about ``1 / (1 - β₂)`` steps, and the update is ``m / √v``.

OneCycle follows PyTorch's ``OneCycleLR`` defaults, which the reference uses: the learning rate rises
from ``max_lr / 25`` to ``max_lr`` over the first 30 % of steps and anneals (cosine) to
``max_lr / 25 / 1e4``; the momentum (Adam's β₁) is cycled the other way, 0.95 → 0.85 → 0.95,
overriding the configured momentum.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def _cosine(start: float, end: float, frac):
    return end + (start - end) * (1 + jnp.cos(math.pi * frac)) / 2


def _two_phase(total_steps: int, start: float, peak: float, end: float, pct_start: float):
    """Cosine from ``start`` to ``peak`` until step ``pct_start·total - 1``, then to ``end``."""
    up = max(int(pct_start * total_steps) - 1, 1)
    down = max(total_steps - 1 - up, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        first = _cosine(start, peak, jnp.clip(step / up, 0, 1))
        second = _cosine(peak, end, jnp.clip((step - up) / down, 0, 1))
        return jnp.where(step <= up, first, second)

    return schedule


def onecycle(total_steps: int, max_value: float, *, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4):
    """PyTorch's OneCycleLR learning rate as an optax schedule."""
    initial = max_value / div_factor
    return _two_phase(total_steps, initial, max_value, initial / final_div_factor, pct_start)


def onecycle_momentum(total_steps: int, *, base: float = 0.85, high: float = 0.95,
                      pct_start: float = 0.3):
    """OneCycle's momentum: ``high`` → ``base`` while the learning rate rises, then back."""
    return _two_phase(total_steps, high, base, high, pct_start)


def make(cfg: dict, total_steps: int) -> optax.GradientTransformation:
    """Build the optimiser described by ``cfg`` (the ``optimizer`` section of a run config)."""
    name, lr = cfg.get("name", "sgd"), float(cfg["lr"])
    schedule = cfg.get("schedule", "constant")
    momentum = cfg.get("momentum", 0.9 if name == "sgd" else None)
    if schedule == "onecycle":
        lr_fn = onecycle(total_steps, lr)
        momentum = onecycle_momentum(total_steps)
    elif schedule == "cosine":
        lr_fn = optax.cosine_decay_schedule(lr, total_steps)
    elif schedule == "constant":
        lr_fn = lr
    else:
        raise ValueError(f"unknown schedule {schedule!r}: constant, cosine or onecycle")
    if name == "sgd":
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=lr_fn, momentum=momentum,
                                                  nesterov=bool(cfg.get("nesterov", False)))
    elif name == "adam":
        b1 = momentum if momentum is not None else 0.9
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr_fn, b1=b1,
                                                   b2=float(cfg.get("beta2", 0.999)))
    else:
        raise ValueError(f"unknown optimizer {name!r}: sgd or adam")
    parts = []
    if cfg.get("clip_norm"):
        parts.append(optax.clip_by_global_norm(float(cfg["clip_norm"])))
    if cfg.get("weight_decay"):
        parts.append(optax.add_decayed_weights(float(cfg["weight_decay"])))
    return optax.chain(*parts, opt)
