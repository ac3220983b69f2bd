"""Parameters used through computations (reparameterisations, tied weights) get their feedback by the
chain rule from the parameter to its use: ``F_θ = |θ| ⊙ (∂W/∂θ)ᵀ c_W``, where ``c_W`` is the LFP
normalised reward at the weight's use. References: hand-computed values and Theorem 1."""

import jax
import jax.numpy as jnp
import numpy as np
from _helpers import assert_theorem1

import lfp_jax

EPS = lfp_jax.lfp_epsilon(1e-12)


def _rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def test_exp_reparameterised_weight_by_hand():
    """y = x · exp(θ): c_W = xᵀ (R / y) (ε rule), so F_θ = |θ| ⊙ exp(θ) ⊙ xᵀ (R / y)."""
    theta, x, reward = _rand(0, 3, 2) / 2, _rand(1, 4, 3), _rand(2, 4, 2)

    def fun(theta, x):
        return x @ jnp.exp(theta)

    y, fb_fn = lfp_jax.lfp_vjp(fun, theta, x, composite=EPS)
    fb, _ = fb_fn(reward)
    c_w = np.asarray(x).T @ (np.asarray(reward) / np.asarray(y))
    np.testing.assert_allclose(fb, np.abs(theta) * np.exp(theta) * c_w, rtol=1e-8)


def test_weight_normalisation_satisfies_theorem_1():
    """W = g · v / ‖v‖ (column norms) in a ReLU MLP: the chain rule keeps Theorem 1."""
    k = jax.random.split(jax.random.key(3), 4)
    params = {"v1": jax.random.normal(k[0], (5, 7), jnp.float64), "g1": jnp.linspace(0.5, 1.5, 7),
              "v2": jax.random.normal(k[1], (7, 3), jnp.float64), "g2": jnp.array([0.7, 1.1, 0.9])}

    def wn(v, g):
        return g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))

    def fun(p, x):
        return jax.nn.relu(x @ wn(p["v1"], p["g1"])) @ wn(p["v2"], p["g2"])

    x = jax.random.normal(k[2], (6, 5), jnp.float64)
    y = jax.random.randint(k[3], (6,), 0, 3)
    assert_theorem1(fun, params, x, labels=y, rtol=1e-6)
    table = lfp_jax.describe(fun, params, x)
    assert "parameters reaching their site through a computation" in table
    assert "site 0 (dense): v1 via " in table and "site 0 (dense): g1 via " in table
    assert "sqrt" in table


def test_tied_weights_sum_the_feedback_of_both_uses():
    """An autoencoder with decoder Eᵀ: F_E = |E| ⊙ (c_{W_enc} + c_{W_dec}ᵀ), the two uses' normalised
    rewards, which an untied copy (separate leaves) exposes: F_E = F_enc + (|E|/|Eᵀ|·F_dec)ᵀ."""
    e, x, reward = _rand(4, 5, 3), _rand(5, 4, 5), _rand(6, 4, 5)

    def tied(e, x):
        return jax.nn.relu(x @ e) @ e.T

    def untied(p, x):
        return jax.nn.relu(x @ p["enc"]) @ p["dec"]

    _, fb_tied = lfp_jax.lfp_vjp(tied, e, x, composite=EPS)
    _, fb_untied = lfp_jax.lfp_vjp(untied, {"enc": e, "dec": e.T}, x, composite=EPS)
    got = fb_tied(reward)[0]
    parts = fb_untied(reward)[0]
    np.testing.assert_allclose(got, parts["enc"] + parts["dec"].T, rtol=1e-9)
    table = lfp_jax.describe(tied, e, x)
    assert "parameters used by several sites" in table and "<argument 0>: sites 0, 2" in table


def test_reparameterised_bias_reaches_its_block_by_the_chain_rule():
    """y = x W + softplus(β): the bias block's ε rule gives c_b = Σ_batch R / y, so
    F_β = |β| ⊙ σ(β) ⊙ Σ_batch R / y."""
    w, beta, x, reward = _rand(7, 3, 2), _rand(8, 2), _rand(9, 4, 3), _rand(10, 4, 2)

    def fun(p, x):
        return x @ p["w"] + jax.nn.softplus(p["beta"])

    y, fb_fn = lfp_jax.lfp_vjp(fun, {"w": w, "beta": beta}, x, composite=EPS)
    fb, _ = fb_fn(reward)
    c_b = np.sum(np.asarray(reward) / np.asarray(y), axis=0)
    np.testing.assert_allclose(fb["beta"], np.abs(beta) * jax.nn.sigmoid(beta) * c_b, rtol=1e-8)
    assert "beta via " in lfp_jax.describe(fun, {"w": w, "beta": beta}, x)
