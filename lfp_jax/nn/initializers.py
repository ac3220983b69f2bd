r"""PyTorch-style initialisation for Flax models.

LFP feedback is ``|θ| ⊙ J_θᵀ s``: a parameter that is exactly zero never moves. Flax initialises
biases (and normalisation offsets) to zero, and some Flax models (the ResNets of Flax's examples)
initialise the last normalisation scale of every residual block to zero, which freezes the whole
branch. The reference implementation inherits PyTorch's defaults, where Dense/Conv kernels are
``kaiming_uniform(a=√5)``, i.e. ``U(−1/√fan_in, 1/√fan_in)``, biases ``U(−1/√fan_in, 1/√fan_in)``
too, normalisation scales 1 and offsets 0 (so normalisation offsets stay frozen under LFP, as in the
reference). Equinox already initialises ``Linear`` and ``Conv`` layers that way.

Use the initialisers when building a model, or re-initialise an existing parameter tree::

    params = model.init(key, x)["params"]
    params = lfp_jax.nn.torch_init(key, params)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util as jtu


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


def torch_init(key: jax.Array, params: Any) -> Any:
    """Re-initialise a parameter tree the way PyTorch would.

    Works on linen ``params`` dicts, nnx ``State`` trees and equinox modules:

    * a leaf named ``kernel`` with at least two dimensions (Flax's Dense and Conv) gets
      ``U(±1/√fan_in)``, and a ``bias`` leaf next to it ``U(±1/√fan_in)`` with the same fan-in;
    * normalisation scales that are entirely zero, one-dimensional leaves named ``scale`` (Flax) or
      ``weight`` (equinox's LayerNorm, GroupNorm, BatchNorm, RMSNorm), are set to 1, PyTorch's
      default (Flax's ResNets start the last scale of every residual block at zero, which would
      freeze the whole branch under LFP); other scales are kept;
    * everything else is kept: normalisation offsets (0, as in PyTorch), embeddings, and equinox's
      ``Linear``/``Conv`` weights and biases, which equinox already draws from ``U(±1/√fan_in)``.
    """
    leaves, treedef = jtu.tree_flatten_with_path(params)
    names = [_leaf_name(path) for path, _ in leaves]
    fan_in = {}
    for name, (_, leaf) in zip(names, leaves):
        if name and name[-1] == "kernel" and jnp.ndim(leaf) >= 2:
            fan_in[name[:-1]] = _fan_in(jnp.shape(leaf))
    specs, scales = [], []  # (leaf index, shape, dtype, bound); leaf indices of normalisation scales
    for k, (name, (_, leaf)) in enumerate(zip(names, leaves)):
        if name and name[-1] in ("kernel", "bias") and name[:-1] in fan_in:
            specs.append((k, jnp.shape(leaf), jnp.result_type(leaf), 1.0 / math.sqrt(fan_in[name[:-1]])))
        elif is_norm_scale(name, leaf):
            scales.append(k)
    keys = jax.random.split(key, max(len(leaves), 1))
    drawn, ones = _draw(tuple(keys[k] for k, *_ in specs), tuple(spec[1:] for spec in specs),
                        [leaves[k][1] for k in scales])
    out = [leaf for _, leaf in leaves]
    for (k, *_), value in zip(specs, drawn):
        out[k] = value
    for k, value in zip(scales, ones):
        out[k] = value
    return jtu.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=1)
def _draw(keys: tuple, specs: tuple, scales: list) -> tuple[list, list]:
    """New kernels and biases, and the scales with all-zero ones set to 1, in one compiled call (eager
    draws would compile one small program per leaf shape)."""
    drawn = [jax.random.uniform(key, shape, dtype, -bound, bound)
             for key, (shape, dtype, bound) in zip(keys, specs)]
    ones = [jnp.where(jnp.all(scale == 0), jnp.ones_like(scale), scale) for scale in scales]
    return drawn, ones


def is_norm_scale(name: tuple[str, ...], leaf: Any) -> bool:
    """Whether a leaf at key names ``name`` is a normalisation scale (a 1-D Flax ``scale`` or
    equinox ``weight``)."""
    if not name or not hasattr(leaf, "shape"):
        return False
    return name[-1] in ("scale", "weight") and jnp.ndim(leaf) == 1


def _leaf_name(path) -> tuple[str, ...]:
    # nnx Variables add a trailing ``.value`` to the path of each array
    return tuple(n for n in map(_key_name, path) if n not in ("value", "raw_value"))


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)
