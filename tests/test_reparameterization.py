"""Parameters used through computations of parameters only (reparameterisations, offsets, tied weights)
get the feedback of their *effective weight* ``W = h(θ)``, pulled back by the chain rule:
``F_θ = (∂W/∂θ)ᵀ (|W| ⊙ c_W)``, where ``c_W`` is the LFP normalised reward at the weight's use
(lfp_jax._params). References: hand-computed values, and Theorem 1 in its effective-weight form
``F_θ = −J_hᵀ (|W| ⊙ ∇_W Σ CE)`` built with jax.vjp and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_theorem1

import lfp_jax

EPS = lfp_jax.lfp_epsilon(1e-12)


def _rand(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def test_exp_reparameterised_weight_by_hand():
    """y = x · exp(θ): W = exp(θ), c_W = xᵀ (R / y) (ε rule), so F_θ = exp(θ) ⊙ |exp(θ)| ⊙ c_W."""
    theta, x, reward = _rand(0, 3, 2) / 2, _rand(1, 4, 3), _rand(2, 4, 2)

    def fun(theta, x):
        return x @ jnp.exp(theta)

    y, fb_fn = lfp_jax.lfp_vjp(fun, theta, x, composite=EPS)
    fb, _ = fb_fn(reward)
    c_w = np.asarray(x).T @ (np.asarray(reward) / np.asarray(y))
    np.testing.assert_allclose(fb, np.exp(theta) * np.abs(np.exp(theta)) * c_w, rtol=1e-8)


def test_weight_normalisation_is_gradient_descent_with_the_weight_scaled_gradient_pulled_back():
    """W = g · v / ‖v‖ (column norms) in a ReLU MLP: F_(v, g) = −J_hᵀ (|W| ⊙ ∇_W Σ CE)."""
    k = jax.random.split(jax.random.key(3), 4)
    params = {"v1": jax.random.normal(k[0], (5, 7), jnp.float64), "g1": jnp.linspace(0.5, 1.5, 7),
              "v2": jax.random.normal(k[1], (7, 3), jnp.float64), "g2": jnp.array([0.7, 1.1, 0.9])}

    def wn(v, g):
        return g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))

    def net(w1, w2, x):
        return jax.nn.relu(x @ w1) @ w2

    def fun(p, x):
        return net(wn(p["v1"], p["g1"]), wn(p["v2"], p["g2"]), x)

    x = jax.random.normal(k[2], (6, 5), jnp.float64)
    y = jax.random.randint(k[3], (6,), 0, 3)
    g = lfp_jax.lfp_value_and_feedback(fun, lfp_jax.rewards.softmax_loss, composite=EPS, reward_argnums=(2,))
    got = jax.jit(g)(params, x, y)[1]
    (w1, w2), pull = jax.vjp(lambda p: (wn(p["v1"], p["g1"]), wn(p["v2"], p["g2"])), params)
    dw1, dw2 = jax.grad(lambda a, b: optax.softmax_cross_entropy_with_integer_labels(net(a, b, x), y).sum(),
                        argnums=(0, 1))(w1, w2)
    (want,) = pull((-jnp.abs(w1) * dw1, -jnp.abs(w2) * dw2))
    for name in params:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-7, atol=1e-12 * np.abs(want[name]).max())
    table = lfp_jax.describe(fun, params, x)
    assert "parameters reaching their site through a computation" in table
    assert "site 0 (dense): v1 via " in table and "site 0 (dense): g1 via " in table
    assert "sqrt" in table


def test_reparameterised_bias_reaches_its_block_by_the_chain_rule():
    """y = x W + softplus(β): the bias block's ε rule gives c_b = Σ_batch R / y, so
    F_β = σ(β) ⊙ |softplus(β)| ⊙ Σ_batch R / y."""
    w, beta, x, reward = _rand(7, 3, 2), _rand(8, 2), _rand(9, 4, 3), _rand(10, 4, 2)

    def fun(p, x):
        return x @ p["w"] + jax.nn.softplus(p["beta"])

    y, fb_fn = lfp_jax.lfp_vjp(fun, {"w": w, "beta": beta}, x, composite=EPS)
    fb, _ = fb_fn(reward)
    c_b = np.sum(np.asarray(reward) / np.asarray(y), axis=0)
    expected = jax.nn.sigmoid(beta) * np.abs(jax.nn.softplus(beta)) * c_b
    np.testing.assert_allclose(fb["beta"], expected, rtol=1e-8)
    assert "beta via " in lfp_jax.describe(fun, {"w": w, "beta": beta}, x)


def _rms_one_plus_scale(x, scale):
    """Gemma's RMSNorm: x / rms(x) · (1 + scale), scale initialised to 0."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + scale)


def test_an_offset_scale_initialised_to_zero_gets_the_feedback_of_its_weight_by_hand():
    """h = n(x) ⊙ (1 + s) before a linear layer: W = 1 + s, c_W = Σ_batch n(x) ⊙ c_h with c_h = (R / y)
    Vᵀ the ε rule's normalised reward at h, so F_s = |1 + s| ⊙ c_W = c_W at s = 0: it moves."""
    x, v, reward = _rand(11, 4, 5), _rand(12, 5, 3), _rand(13, 4, 3)
    params = {"scale": jnp.zeros(5), "v": v}

    def fun(p, x):
        return _rms_one_plus_scale(x, p["scale"]) @ p["v"]

    y, fb_fn = lfp_jax.lfp_vjp(fun, params, x, composite=EPS)
    fb, _ = fb_fn(reward)
    normed = np.asarray(_rms_one_plus_scale(x, 0.0))
    c_h = (np.asarray(reward) / np.asarray(y)) @ np.asarray(v).T
    np.testing.assert_allclose(fb["scale"], np.sum(normed * c_h, axis=0), rtol=1e-8)
    assert np.all(np.abs(fb["scale"]) > 0)


def test_an_offset_scale_satisfies_theorem_1_with_the_effective_weight():
    """ReLU network with 1 + s norms: F_s = −|1 + s| ⊙ ∇_s Σ CE (∂W/∂s = 1), for s = 0 and s ≠ 0."""
    k = jax.random.split(jax.random.key(14), 4)
    x = jax.random.normal(k[2], (8, 5), jnp.float64)
    y = jnp.arange(8) % 3

    def fun(p, x):
        return jax.nn.relu(_rms_one_plus_scale(x @ p["w1"], p["scale"])) @ p["w2"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(fun(p, x), y).sum()

    for scale in (jnp.zeros(6), jax.random.normal(k[3], (6,), jnp.float64) * 0.3):
        params = {"w1": jax.random.normal(k[0], (5, 6), jnp.float64), "scale": scale,
                  "w2": jax.random.normal(k[1], (6, 3), jnp.float64)}

        g = lfp_jax.lfp_value_and_feedback(fun, lfp_jax.rewards.softmax_loss, composite=EPS,
                                           reward_argnums=(2,))
        got = jax.jit(g)(params, x, y)[1]
        grad = jax.grad(loss)(params)
        np.testing.assert_allclose(got["scale"], -np.abs(1 + params["scale"]) * grad["scale"], rtol=1e-7)
        for name in ("w1", "w2"):  # used as they are: the paper's Theorem 1
            np.testing.assert_allclose(got[name], -np.abs(params[name]) * grad[name], rtol=1e-7,
                                       atol=1e-12)


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


def _rnn(k):
    return {"h0": jax.random.normal(k[0], (4,), jnp.float64),
            "w": jax.random.normal(k[1], (4, 4), jnp.float64) / 2,
            "u": jax.random.normal(k[2], (3, 4), jnp.float64),
            "o": jax.random.normal(k[3], (4, 3), jnp.float64)}


def test_a_learned_initial_state_carried_by_a_scan_gets_the_papers_feedback():
    """h0 is a scan's initial carry and meets h0 @ W inside the loop: both are weights used as they
    are (a product of two parameters is a layer, not one effective weight), so Theorem 1 holds for
    each, written with lax.scan and as a Python loop alike."""
    k = jax.random.split(jax.random.key(30), 6)
    params = _rnn(k)
    x = jax.random.normal(k[4], (5, 6, 3), jnp.float64)   # (batch, time, features)
    y = jax.random.randint(k[5], (5,), 0, 3)

    def scanned(p, x):
        h0 = jnp.broadcast_to(p["h0"], (x.shape[0], 4))
        step = lambda h, xt: (jax.nn.relu(h @ p["w"] + xt @ p["u"]), None)   # noqa: E731
        h, _ = jax.lax.scan(step, h0, x.transpose(1, 0, 2))
        return h @ p["o"]

    def looped(p, x):
        h = jnp.broadcast_to(p["h0"], (x.shape[0], 4))
        for t in range(x.shape[1]):
            h = jax.nn.relu(h @ p["w"] + x[:, t] @ p["u"])
        return h @ p["o"]

    for fun in (scanned, looped):
        assert_theorem1(fun, params, x, labels=y, rtol=1e-8)


def test_a_zero_bias_halved_is_reported_frozen():
    params = {"w": _rand(31, 3, 2), "b": jnp.zeros(2)}
    with pytest.warns(lfp_jax.errors.FrozenParameterWarning, match=r"\['b'\]"):
        lfp_jax.lfp_vjp(lambda p, x: x @ p["w"] + p["b"] / 2, params, _rand(32, 4, 3))
