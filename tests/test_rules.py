"""Rules in matrix form: each rule against a reference built from the layer Jacobian (jax.jacobian),
and the conservation property of the ε rule."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfp_jax
from lfp_jax import Match, rules
from lfp_jax.rules.core import _tiled_argmax_route, _tiled_max

EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _rand(seed, *shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float64))


def _dense_jacobians(w, b, x):
    """Per-sample Jacobians of y = x W + b: J_x (out, in) and J_W (out, in, out)."""
    jx = jax.jacobian(lambda v: v @ w + b)(x)
    jw = jax.jacobian(lambda m: x @ m + b)(w)
    return np.asarray(jx), np.asarray(jw)


def _run(fun, params, x, reward, composite=None, **kw):
    out, fb_fn = lfp_jax.lfp_vjp(fun, params, x, composite=composite, **kw)
    return out, *fb_fn(reward)


@pytest.mark.parametrize("act", ["tanh", "silu", "step"])
def test_epsilon_and_identity_rules_in_matrix_form(act):
    phi = {"tanh": jnp.tanh, "silu": jax.nn.silu, "step": lambda z: jnp.where(z > 0, 1.0, 0.0)}[act]
    p = {"w1": _rand(0, 4, 5), "b1": _rand(1, 5), "w2": _rand(2, 5, 3), "b2": _rand(3, 3)}
    x, reward = _rand(4, 1, 4), _rand(5, 1, 3)

    def fun(p, x):
        return phi(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    z, fb, rel = _run(fun, p, x, reward)
    # reference: layer by layer, Jacobians of each affine map at the sample
    x0 = x[0]
    z1 = x0 @ p["w1"] + p["b1"]
    a1 = np.asarray(phi(z1))
    z2 = a1 @ p["w2"] + p["b2"]
    s2 = reward[0] / stab(z2)
    jx2, jw2 = _dense_jacobians(p["w2"], p["b2"], a1)
    r_a1 = a1 * (jx2.T @ s2)                      # ε rule: R_x = x ⊙ J_xᵀ s
    f_w2 = np.abs(p["w2"]) * np.einsum("o,oij->ij", s2, jw2)  # F_θ = |θ| ⊙ J_θᵀ s
    r_z1 = r_a1                                   # identity rule
    s1 = r_z1 / stab(z1)
    jx1, jw1 = _dense_jacobians(p["w1"], p["b1"], x0)
    r_x = x0 * (jx1.T @ s1)
    f_w1 = np.abs(p["w1"]) * np.einsum("o,oij->ij", s1, jw1)
    np.testing.assert_allclose(fb["w2"], f_w2, rtol=1e-9)
    np.testing.assert_allclose(fb["b2"], np.abs(p["b2"]) * s2, rtol=1e-9)
    np.testing.assert_allclose(fb["w1"], f_w1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(fb["b1"], np.abs(p["b1"]) * s1, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(rel[0], r_x, rtol=1e-8, atol=1e-14)


def _conserving_models():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            kw = dict(use_bias=False, kernel_init=nn.initializers.normal(1.0))
            x = jnp.tanh(nn.Conv(3, (3, 3), **kw)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.silu(nn.Conv(4, (3, 3), **kw)(x))
            x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
            h = nn.relu(nn.Dense(6, **kw)(x))
            h = h + nn.Dense(6, **kw)(jnp.tanh(nn.Dense(6, **kw)(h)))   # residual sum
            return nn.Dense(3, **kw)(h)

    model = CNN()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(1), x)["params"])
    return lambda p, x: model.apply({"params": p}, x), params, x


def test_epsilon_zero_conserves_reward_layer_by_layer():
    """With ε = 0 and no biases, Σ R_in = Σ R_out through dense, conv, pooling, sums, activations."""
    fun, params, x = _conserving_models()
    reward = _rand(7, 2, 3)
    _, _, rel = _run(fun, params, x, reward, composite=lfp_jax.lfp_epsilon(0.0))
    np.testing.assert_allclose(np.sum(rel, axis=(1, 2, 3)), reward.sum(-1), rtol=1e-9)


def test_residual_sum_splits_reward_and_never_duplicates_it():
    """y = a + b with ε rule: R_a = a ⊙ R_y / y and R_b = b ⊙ R_y / y, so R_a + R_b = R_y."""
    def fun(p, x):
        a, b = x @ p["wa"], x @ p["wb"]
        return a + b

    p = {"wa": _rand(0, 3, 2), "wb": _rand(1, 3, 2)}
    x, reward = _rand(2, 1, 3), _rand(3, 1, 2)
    _, fb, rel = _run(fun, p, x, reward, composite=lfp_jax.lfp_epsilon(0.0))
    y = x @ p["wa"] + x @ p["wb"]
    s = reward / y
    # feedback of each branch's weight is |W| ⊙ xᵀ (R_branch / branch) = |W| ⊙ xᵀ s
    np.testing.assert_allclose(fb["wa"], np.abs(p["wa"]) * (x.T @ s), rtol=1e-10)
    np.testing.assert_allclose(fb["wb"], np.abs(p["wb"]) * (x.T @ s), rtol=1e-10)
    np.testing.assert_allclose(rel.sum(), reward.sum(), rtol=1e-10)


# --- classic LRP rules on one dense layer -----------------------------------------------------


def _pos(a):
    return np.maximum(a, 0)


def _neg(a):
    return np.minimum(a, 0)


def _zplus(x, w, r):
    z = _pos(x) @ _pos(w) + _neg(x) @ _neg(w)
    s = r / stab(z)
    return _pos(x) * (s @ _pos(w).T) + _neg(x) * (s @ _neg(w).T)


def _gamma(x, w, r, g=0.25):
    wg = w + g * _pos(w)
    return x * ((r / stab(x @ wg)) @ wg.T)


def _gamma_generalized(x, w, r, g=0.25):
    """Sign-aware γ: positive outputs spread by x⁺(W + γW⁺) + x⁻(W + γW⁻), negative ones by
    x⁺(W + γW⁻) + x⁻(W + γW⁺); outputs exactly 0 pass nothing."""
    y = x @ w
    rel = np.zeros_like(x)
    for mask, (wa, wb) in (((y > 0), (w + g * _pos(w), w + g * _neg(w))),
                           ((y < 0), (w + g * _neg(w), w + g * _pos(w)))):
        s = np.where(mask, r / stab(_pos(x) @ wa + _neg(x) @ wb), 0)
        rel += _pos(x) * (s @ wa.T) + _neg(x) * (s @ wb.T)
    return rel


def _flat(x, w, r):
    ones = np.ones_like(w)
    return np.ones_like(x) * ((r / stab(np.ones_like(x) @ ones)) @ ones.T)


def _wsquare(x, w, r):
    w2 = w * w
    return np.ones_like(x) * ((r / stab(np.ones_like(x) @ w2)) @ w2.T)


def _zbox(x, w, r, low=-3.0, high=3.0):
    lo, hi = np.full_like(x, low), np.full_like(x, high)
    z = x @ w - lo @ _pos(w) - hi @ _neg(w)
    s = r / stab(z)
    return x * (s @ w.T) - lo * (s @ _pos(w).T) - hi * (s @ _neg(w).T)


def _alphabeta(x, w, r, alpha=2.0, beta=1.0):
    zp = _pos(x) @ _pos(w) + _neg(x) @ _neg(w)
    zn = _pos(x) @ _neg(w) + _neg(x) @ _pos(w)
    sp, sn = r / stab(zp), r / stab(zn)
    rp = _pos(x) * (sp @ _pos(w).T) + _neg(x) * (sp @ _neg(w).T)
    rn = _pos(x) * (sn @ _neg(w).T) + _neg(x) * (sn @ _pos(w).T)
    return alpha * rp - beta * rn


@pytest.mark.parametrize("rule,reference", [
    (rules.ZPlus(), _zplus),
    (rules.Gamma(gamma=0.25, generalized=False), _gamma),
    (rules.Gamma(gamma=0.25), _gamma_generalized),
    (rules.Flat(), _flat),
    (rules.WSquare(), _wsquare),
    (rules.ZBox(low=-3.0, high=3.0), _zbox),
    (rules.AlphaBeta(alpha=2.0, beta=1.0), _alphabeta),
])
def test_classic_lrp_rule_on_a_dense_layer(rule, reference):
    w, x, r = _rand(0, 5, 3), _rand(1, 2, 5), _rand(2, 2, 3)
    composite = lfp_jax.lfp_epsilon(1e-12).with_rules((Match(kind="linear"), rule))
    _, _, rel = _run(lambda w, x: x @ w, w, x, r, composite=composite)
    # R at the site output is o ⊙ r / stab(o), equal to r up to ε = 1e-12
    np.testing.assert_allclose(rel, reference(x, w, r), rtol=1e-6, atol=1e-9)


def test_dropout_rescales_reward_like_the_reference_or_conserves_it():
    q = 0.5
    w, x, r = _rand(0, 4, 3), _rand(1, 2, 4), _rand(2, 2, 3)
    key = jax.random.key(3)
    mask = np.asarray(jax.random.bernoulli(key, q, (2, 4)))

    def fun(w, x, key):
        m = jax.random.bernoulli(key, q, x.shape)
        return jax.lax.select(m, x / q, jnp.zeros_like(x)) @ w

    d = np.where(mask, x / q, 0.0)
    s = r / stab(d @ w, 1e-12)
    r_d = d * (s @ w.T)                      # ε rule at the dense layer
    for rescale, expected in ((True, mask * r_d / q), (False, mask * r_d)):
        composite = lfp_jax.lfp_epsilon(1e-12, dropout_rescale=rescale)
        out, fb_fn = lfp_jax.lfp_vjp(fun, w, x, key, composite=composite)
        rel = fb_fn(r)[1]
        np.testing.assert_allclose(rel, expected, rtol=1e-8, atol=1e-12)


def test_identity_rule_uses_the_epsilon_of_the_block_feeding_it():
    """With a large ε the activation reward is φ(z)·c / (z + ε sign z) (its block's ε, not 1e-6)."""
    p = {"w": _rand(0, 3, 4), "v": _rand(1, 4, 2)}
    x, r = _rand(2, 1, 3), _rand(3, 1, 2)
    fun = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    eps = 0.5
    _, fb, rel = _run(fun, p, x, r, composite=lfp_jax.lfp_epsilon(eps))
    z1 = x @ p["w"]
    a = np.tanh(z1)
    s2 = r / stab(a @ p["v"], eps)
    s1 = a * (s2 @ p["v"].T) / stab(z1, eps)
    np.testing.assert_allclose(rel, x * (s1 @ p["w"].T), rtol=1e-10)


def test_gradient_rule_is_the_plain_vjp_when_asked_for():
    p = {"w": _rand(0, 3, 4), "v": _rand(1, 4, 2)}
    x, r = _rand(2, 1, 3), _rand(3, 1, 2)
    fun = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    composite = lfp_jax.lfp_epsilon(0.0).with_rules((Match(label="tanh"), rules.Gradient()))
    out, fb, rel = _run(fun, p, x, r, composite=composite)
    # c at the logits is r / z; the plain VJP of the whole net gives c_x = Jᵀ c
    _, vjp = jax.vjp(functools.partial(fun, p), jnp.asarray(x))
    np.testing.assert_allclose(rel, x * vjp(r / out)[0], rtol=1e-10)


def test_a_user_defined_site_local_rule_plugs_into_a_composite():
    """The Rule protocol: a rule with its own backward (here R_x = R_y / 2 at tanh) needs no engine change."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class HalfIdentity(rules.Rule):
        kinds = frozenset({"activation"})

        def __call__(self, call, *operands):
            def backward(ops, outs, ct):
                return [0.5 * ct * outs[0] / rules.stabilize(ops[0], call.input_epsilon)]

            return rules.with_backward(call, operands, backward)

    p = {"w": _rand(0, 3, 4), "v": _rand(1, 4, 2)}
    x, r = _rand(2, 1, 3), _rand(3, 1, 2)
    fun = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]  # noqa: E731
    plain = _run(fun, p, x, r)[2]
    halved = _run(fun, p, x, r, composite=lfp_jax.lfp_epsilon().with_rules(
        (Match(label="tanh"), HalfIdentity())))[2]
    np.testing.assert_allclose(halved, 0.5 * plain, rtol=1e-10)


def test_linear_rules_give_parameter_feedback():
    """Classic rules also produce |W| ⊙ (∂z/∂W)ᵀ s: the ε terms equal Epsilon, z⁺ its own formula."""
    w, x, r = _rand(0, 5, 3), _rand(1, 2, 5), _rand(2, 2, 3)
    fun = lambda w, x: x @ w  # noqa: E731
    eps_fb = _run(fun, w, x, r, composite=lfp_jax.lfp_epsilon(1e-6))[1]
    terms_fb = _run(fun, w, x, r, composite=lfp_jax.lfp_epsilon(1e-6).with_rules(
        (Match(kind="linear"), rules.LinearRule(epsilon=1e-6))))[1]
    np.testing.assert_allclose(terms_fb, eps_fb, rtol=1e-9)
    np.testing.assert_allclose(eps_fb, np.abs(w) * (x.T @ (r / stab(x @ w))), rtol=1e-9)
    zplus_fb = _run(fun, w, x, r, composite=lfp_jax.lfp_epsilon(1e-12).with_rules(
        (Match(kind="linear"), rules.ZPlus(epsilon=1e-6))))[1]
    s = r / stab(_pos(x) @ _pos(w) + _neg(x) @ _neg(w))
    c_w = (_pos(x).T @ s) * (w > 0) + (_neg(x).T @ s) * (w < 0)
    np.testing.assert_allclose(zplus_fb, np.abs(w) * c_w, rtol=1e-6)


def test_half_precision_dropout_and_zero_activations_stay_finite():
    w1, w2 = _rand(0, 4, 6).astype(np.float16), _rand(1, 6, 3).astype(np.float16)
    x = _rand(2, 3, 4).astype(np.float16)

    def fun(p, x, key):
        h = jax.nn.relu(x @ p[0])            # exact zeros
        m = jax.random.bernoulli(key, 0.5, h.shape)
        return jax.lax.select(m, h / 0.5, jnp.zeros_like(h)) @ p[1]

    out, fb_fn = lfp_jax.lfp_vjp(fun, (w1, w2), x, jax.random.key(0))
    fb, rel, _ = fb_fn(jnp.ones_like(out))
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in (*fb, rel))


@pytest.mark.parametrize(
    "shape, window",
    [((3, 8, 6, 2), (1, 2, 2, 1)),  # the usual 2x2/2 pool
     ((2, 7, 5, 3), (1, 2, 2, 1)),  # sizes that do not divide: the remainder is dropped
     ((2, 9, 4), (1, 3, 2)),  # 1-d pooling with a non-square window
     ((4, 6), (2, 3))],
)
def test_tiled_max_pool_matches_reduce_window_and_its_vjp_with_ties(shape, window):
    """On CPU, non-overlapping max pooling is evaluated by reshape + reduce: same values, and the reward
    of each window goes to the same element as XLA's ``select_and_scatter`` (first maximum)."""
    x = jnp.round(jax.random.normal(jax.random.key(0), shape))  # many ties inside windows

    def pool(a):
        return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, window, window, "VALID")

    y, vjp = jax.vjp(pool, x)
    ct = jax.random.normal(jax.random.key(1), y.shape)
    # ties do occur: windows (numpy, cropped to whole windows) whose maximum appears at least twice
    xs = np.asarray(x)[tuple(slice(0, (n // w) * w) for n, w in zip(shape, window))]
    split = [d for n, w in zip(xs.shape, window) for d in (n // w, w)]
    windows = xs.reshape(split).transpose([*range(0, 2 * len(shape), 2), *range(1, 2 * len(shape), 2)])
    windows = windows.reshape(*y.shape, -1)
    np.testing.assert_array_equal(windows.max(-1), y)  # the windows are the pool's
    tied = np.sum(windows == windows.max(-1, keepdims=True), axis=-1) >= 2
    assert windows.shape[-1] >= 2 and 0 < int(tied.sum()) < tied.size
    np.testing.assert_array_equal(_tiled_max(x, window), y)
    np.testing.assert_array_equal(_tiled_argmax_route(x, y, ct, window), vjp(ct)[0])


def test_max_pool_feedback_with_ties_is_the_same_as_the_plain_vjp_rule():
    """WinnerTakeAll (tiled on CPU) and the Gradient rule (reduce_window's VJP) route identically."""

    def f(p, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return jax.nn.relu(h.reshape(h.shape[0], -1) @ p["d"])

    k = jax.random.split(jax.random.key(2), 3)
    x = jnp.round(jax.random.normal(k[0], (4, 9, 9, 2)))
    p = {"w": jnp.round(jax.random.normal(k[1], (2, 2, 2, 3)) * 2), "d": jax.random.normal(k[2], (48, 5))}
    y = jnp.arange(4)
    assert lfp_jax.describe(f, p, x).count("max_pool") >= 1
    plain = lfp_jax.lfp_epsilon().with_rules((Match(kind="max_pool"), rules.Gradient()))
    fast = lfp_jax.lfp_grad(f, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))(p, x, y)
    slow = lfp_jax.lfp_grad(f, lfp_jax.rewards.softmax_loss, reward_argnums=(2,), composite=plain)(p, x, y)
    assert float(jnp.abs(fast["w"]).max()) > 0
    for key in p:
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-12, atol=1e-12)
