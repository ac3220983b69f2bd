"""Small shared helpers for the tests (no assertions about lfp_jax's own output live here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lfp_jax
from lfp_jax import rewards


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(
        jnp.asarray(a).dtype, jnp.floating) else a, tree)


def rel_err(actual, expected, floor: float = 0.0) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), floor)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale if scale else float(
        np.max(np.abs(actual), initial=0.0))


def feedback(fun, params, *inputs, labels, composite=None, has_aux=False, **kw):
    g = lfp_jax.lfp_value_and_feedback(
        fun, lambda z: rewards.softmax_loss(z, labels), composite=composite, has_aux=has_aux, **kw)
    return g(params, *inputs)[1]


def theorem1_expected(fun, params, *inputs, labels, has_aux=False):
    """``-|θ| ⊙ ∇_θ Σ_batch CE`` with jax.grad: the independent reference of Theorem 1."""

    def loss(p):
        z = fun(p, *inputs)
        z = z[0] if has_aux else z
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).sum()

    grads = jax.jit(jax.grad(loss))(params)  # compiled: the reference is the same function, faster
    return jax.tree.map(lambda p, g: -jnp.abs(p) * g, params, grads)


def assert_theorem1(fun, params, *inputs, labels, has_aux=False, rtol=1e-3, **kw):
    composite = lfp_jax.lfp_epsilon(1e-12)
    got = feedback(fun, params, *inputs, labels=labels, composite=composite, has_aux=has_aux, **kw)
    want = theorem1_expected(fun, params, *inputs, labels=labels, has_aux=has_aux)
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want):
        err = rel_err(g, w, floor=1e-6 * scale)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
