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


def theorem1_reference(fun, params, inputs, labels, has_aux=False):
    """``-|θ| ⊙ ∇_θ Σ_batch CE`` of ``fun(params, *inputs)``, traceable: to be jitted together with the
    LFP side, so that a test compiles one program."""
    def loss(p):
        z = fun(p, *inputs)
        z = z[0] if has_aux else z
        return optax.softmax_cross_entropy_with_integer_labels(z, labels).sum()

    return jax.tree.map(lambda p, g: -jnp.abs(p) * g, params, jax.grad(loss)(params))


def theorem1_expected(fun, params, *inputs, labels, has_aux=False):
    """``-|θ| ⊙ ∇_θ Σ_batch CE`` with jax.grad: the independent reference of Theorem 1 (compiled: the
    reference is the same function, faster)."""
    return jax.jit(lambda p, i, y: theorem1_reference(fun, p, i, y, has_aux))(params, inputs, labels)


def assert_theorem1(fun, params, *inputs, labels, has_aux=False, rtol=1e-8, zero_gradient=(), composite=None,
                    **kw):
    """LFP feedback (``lfp_epsilon(1e-12)``, softmax-loss reward, jitted) equals ``-|θ| ⊙ ∇_θ Σ CE``.

    Per parameter leaf, ``max|got − want| / max(max|want|, 1e-6 · scale) <= rtol`` with ``scale`` the
    largest ``|want|`` of all leaves. The error that remains is ε's: the first-order relative error of
    ``R / (y + ε sign y)`` is ``ε / |y|`` (1e-12 / 4e-5 ≈ 2e-8 at the smallest layer output of the
    residual test), far below ``rtol`` elsewhere.

    ``zero_gradient``: leaves (``jax.tree_util.keystr`` paths) whose exact gradient is 0, e.g. a bias
    before a train-mode BatchNorm, which subtracts it again. For them ``|want|`` must be rounding noise
    (``<= 1e-14 · scale``) and ``|got|`` (ε's residue alone) at most ``rtol · scale``.
    """
    composite = lfp_jax.lfp_epsilon(1e-12) if composite is None else composite
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, composite=composite,
                                       has_aux=has_aux, reward_argnums=(1 + len(inputs),), **kw)

    # both sides in one program (one compile), the labels an argument (no constants baked in)
    @jax.jit
    def both(params, inputs, labels):
        return g(params, *inputs, labels)[1], theorem1_reference(fun, params, inputs, labels, has_aux)

    got, want = both(params, inputs, labels)
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    names = [jax.tree_util.keystr(path) for path, _ in flat_got]
    assert set(zero_gradient) <= set(names), sorted(set(zero_gradient) - set(names))
    for name, (_, g), w in zip(names, flat_got, flat_want):
        if name in zero_gradient:
            assert float(jnp.max(jnp.abs(w))) <= 1e-14 * scale, f"{name}: the gradient is not 0"
            err = float(jnp.max(jnp.abs(g))) / scale
        else:
            err = rel_err(g, w, floor=1e-6 * scale)
        assert err <= rtol, f"{name}: relative error {err:.2e}"
