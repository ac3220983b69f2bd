r"""PyTorch-style initialisation for Flax models.

LFP feedback is ``|W| ⊙ J_Wᵀ s`` at every weight ``W``: a parameter that is exactly zero and used as a
weight (directly, moved or scaled) never moves. Flax initialises biases (and normalisation offsets) to
zero, and some Flax models (the ResNets of Flax's examples) initialise the last normalisation scale of
every residual block to zero, which freezes the whole branch. The reference implementation inherits
PyTorch's defaults, where Dense/Conv kernels are ``kaiming_uniform(a=√5)``, i.e.
``U(−1/√fan_in, 1/√fan_in)``, biases ``U(−1/√fan_in, 1/√fan_in)`` too, normalisation scales 1 and
offsets 0 (so normalisation offsets stay frozen under LFP, as in the reference). Equinox already
initialises ``Linear`` and ``Conv`` layers that way.

Use the initialisers when building a model, or re-initialise an existing parameter tree::

    params = model.init(key, x)["params"]
    params = lfp_jax.nn.torch_init(key, params)                  # kernels and biases
    params = lfp_jax.nn.torch_init(key, params, model_fn, x)     # ... and zero scales that LFP cannot move
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util as jtu

from lfp_jax._arguments import leaf_names
from lfp_jax._frozen import is_norm_scale, would_freeze


def _fan_in(shape: tuple[int, ...]) -> int:
    """Fan-in of a Flax kernel: Dense ``(in, out)``, Conv ``(*window, in, out)``."""
    if len(shape) < 2:
        raise ValueError(f"a kernel needs at least 2 dimensions, got shape {shape}")
    return math.prod(shape[:-1])


def torch_kernel_init():
    """Kernel initialiser ``U(±1/√fan_in)`` (PyTorch's ``kaiming_uniform_(a=√5)``) for Flax layers.

    Example: ``nn.Dense(10, kernel_init=torch_kernel_init(), bias_init=torch_bias_init(784))``.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(_fan_in(shape))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_bias_init(fan_in: int):
    """Bias initialiser ``U(±1/√fan_in)``; ``fan_in`` is the layer's input size (times window size)."""
    if fan_in <= 0:
        raise ValueError(f"fan_in must be positive, got {fan_in}")

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_init(key: jax.Array, params: Any, fun: Callable | None = None, *args: Any,
               keep_kernels: bool = False) -> Any:
    """Re-initialise a parameter tree the way PyTorch would.

    Works on linen ``params`` dicts, nnx ``State`` trees and equinox modules:

    * a leaf named ``kernel`` with at least two dimensions (Flax's Dense and Conv) gets
      ``U(±1/√fan_in)``, and a ``bias`` leaf next to it ``U(±1/√fan_in)`` with the same fan-in
      (``keep_kernels=True``: only the biases are drawn, the kernels keep the model's own
      initialisation, e.g. a Hugging Face model's ``N(0, 0.02)``);
    * given the model, ``fun(params, *args)`` with example arguments, the normalisation scales that are
      entirely zero and that the model uses as weights (directly or scaled, so that LFP can never move
      them: the last scale of a Flax ResNet's residual block), one-dimensional leaves named ``scale``
      (Flax) or ``weight`` (equinox), are set to 1, PyTorch's default. Scales that the model uses as
      ``1 + scale`` (Gemma's RMSNorm) are left at 0: there 0 is the identity, and LFP moves them.
      Without ``fun`` no scale is changed;
    * everything else is kept: normalisation offsets (0, as in PyTorch), embeddings, and equinox's
      ``Linear``/``Conv`` weights and biases, which equinox already draws from ``U(±1/√fan_in)``.

    Nothing else about the model changes: the kernels' and biases' distribution, and (with ``fun``)
    zero scales that silence their layer, are what this function is for.
    """
    leaves, treedef = jtu.tree_flatten_with_path(params)
    names = [leaf_names(path) for path, _ in leaves]
    fan_in = {}
    for name, (_, leaf) in zip(names, leaves):
        if name and name[-1] == "kernel" and jnp.ndim(leaf) >= 2:
            fan_in[name[:-1]] = _fan_in(jnp.shape(leaf))
    frozen = set()
    if fun is not None:
        frozen = {path for path, kind in would_freeze(params, fun, args) if kind == "scale"}
    specs, scales = [], []  # (leaf index, shape, dtype, bound); leaf indices of normalisation scales
    for k, (name, (path, leaf)) in enumerate(zip(names, leaves)):
        if name and name[-1] in ("kernel", "bias") and name[:-1] in fan_in:
            if not (keep_kernels and name[-1] == "kernel"):
                specs.append((k, jnp.shape(leaf), jnp.result_type(leaf),
                              1.0 / math.sqrt(fan_in[name[:-1]])))
        elif is_norm_scale(name, leaf) and jtu.keystr(path) in frozen:
            scales.append(k)
    keys = jax.random.split(key, max(len(leaves), 1))
    drawn = _draw(tuple(keys[k] for k, *_ in specs), tuple(spec[1:] for spec in specs))
    out = [leaf for _, leaf in leaves]
    for (k, *_), value in zip(specs, drawn):
        out[k] = value
    for k in scales:
        out[k] = jnp.where(jnp.all(out[k] == 0), jnp.ones_like(out[k]), out[k])   # zero scales only
    return jtu.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=1)
def _draw(keys: tuple, specs: tuple) -> list:
    """New kernels and biases in one compiled call (eager draws would compile one small program per
    leaf shape)."""
    return [jax.random.uniform(key, shape, dtype, -bound, bound)
            for key, (shape, dtype, bound) in zip(keys, specs)]
