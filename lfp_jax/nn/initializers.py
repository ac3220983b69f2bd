r"""PyTorch-style initialisation for Flax models.

LFP feedback is ``|θ| ⊙ J_θᵀ s``: a parameter that is exactly zero never moves. Flax initialises
biases (and normalisation offsets) to zero; the reference implementation inherits PyTorch's defaults,
where Dense/Conv kernels are ``kaiming_uniform(a=√5)``, i.e. ``U(−1/√fan_in, 1/√fan_in)``, and biases
``U(−1/√fan_in, 1/√fan_in)`` too. Normalisation scales start at 1 and offsets at 0 in both libraries
(so BatchNorm offsets stay frozen under LFP, as in the reference).

Use the initialisers when building a model, or re-initialise an existing parameter tree::

    params = model.init(key, x)["params"]
    params = lfp_jax.nn.torch_init(key, params)
"""

from __future__ import annotations

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
    """Re-initialise every ``kernel``/``bias`` pair of a parameter tree the way PyTorch would.

    Works on linen ``params`` dicts and nnx ``State`` trees: a leaf named ``kernel`` with at least two
    dimensions gets ``U(±1/√fan_in)``, and a ``bias`` leaf next to it ``U(±1/√fan_in)`` with the same
    fan-in. Other leaves (normalisation scales and offsets, embeddings) are kept.
    """
    leaves, treedef = jtu.tree_flatten_with_path(params)
    # nnx Variables add a trailing ``.value`` to the path of each array
    names = [tuple(n for n in map(_key_name, path) if n not in ("value", "raw_value"))
             for path, _ in leaves]
    fan_in = {}
    for name, (_, leaf) in zip(names, leaves):
        if name and name[-1] == "kernel" and jnp.ndim(leaf) >= 2:
            fan_in[name[:-1]] = _fan_in(jnp.shape(leaf))
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, name, (_, leaf) in zip(keys, names, leaves):
        owner = name[:-1]
        if name and name[-1] in ("kernel", "bias") and owner in fan_in:
            bound = 1.0 / math.sqrt(fan_in[owner])
            leaf = jax.random.uniform(k, jnp.shape(leaf), jnp.result_type(leaf), -bound, bound)
        out.append(leaf)
    return jtu.tree_unflatten(treedef, out)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)
