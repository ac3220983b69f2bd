"""The ε stabiliser sits exactly where the reference puts it (at each layer's output, once), whatever
the program structure: scan carries, cond branches, chained activations, concatenation.

Reference: a layer-by-layer implementation of the spec's rules written here in numpy (ε rule at
every dense layer, identity rule at every activation), checked at a large ε where misplacing or
doubling the stabiliser changes the result by tens of percent.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lfp_jax
from lfp_jax import Match, rules

EPS = 0.5


def stab(z):
    return z + EPS * np.where(z >= 0, 1.0, -1.0)


def spec_chain(layers, x, reward):
    """LFP by the spec for a chain of ('dense', W, b) and ('act', φ) layers: (feedback list, R_x)."""
    values = [np.asarray(x)]
    for layer in layers:
        h = values[-1]
        values.append(h @ layer[1] + layer[2] if layer[0] == "dense" else np.asarray(layer[1](h)))
    r, feedback = np.asarray(reward), []
    for layer, h_in, h_out in reversed(list(zip(layers, values[:-1], values[1:]))):
        if layer[0] == "dense":
            s = r / stab(h_out)
            feedback.append((np.abs(layer[1]) * (h_in.T @ s), np.abs(layer[2]) * s.sum(0)))
            r = h_in * (s @ layer[1].T)
        # identity rule: r passes unchanged through activations
    return feedback[::-1], r


def _rand(seed, *shape, scale=1.0):
    return scale * np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float64))


def _params(depth=3, width=5):
    return {"ws": _rand(0, depth, width, width, scale=0.6), "bs": _rand(1, depth, width, scale=0.3),
            "wo": _rand(2, width, 3, scale=0.6), "bo": _rand(3, 3, scale=0.3)}


X, R = _rand(4, 4, 5), _rand(5, 4, 3)
COMPOSITE = lfp_jax.lfp_epsilon(EPS)


def _lfp(fun, params, x=X):
    out, fb_fn = lfp_jax.lfp_vjp(fun, params, x, composite=COMPOSITE)
    return fb_fn(R)


def test_scan_with_dense_carry_into_activation_matches_the_spec():
    p = _params()

    def fun(p, x):
        def body(h, wb):  # the carry is a dense output; the activation is applied at the next step
            return jnp.tanh(h) @ wb[0] + wb[1], None
        h, _ = jax.lax.scan(body, x @ p["ws"][0] + p["bs"][0], (p["ws"][1:], p["bs"][1:]))
        return jnp.tanh(h) @ p["wo"] + p["bo"]

    fb, rel = _lfp(fun, p)
    layers = [("dense", p["ws"][0], p["bs"][0])]
    for k in (1, 2):
        layers += [("act", np.tanh), ("dense", p["ws"][k], p["bs"][k])]
    layers += [("act", np.tanh), ("dense", p["wo"], p["bo"])]
    want, want_rel = spec_chain(layers, X, R)
    np.testing.assert_allclose(fb["ws"][1], want[1][0], rtol=1e-9)
    np.testing.assert_allclose(fb["ws"][0], want[0][0], rtol=1e-9)
    np.testing.assert_allclose(fb["wo"], want[3][0], rtol=1e-9)
    np.testing.assert_allclose(rel, want_rel, rtol=1e-9)


def test_chained_activations_and_an_activation_at_the_output_pass_reward_unchanged():
    p = _params()

    def fun(p, x):
        h = jnp.tanh(jax.nn.relu(x @ p["ws"][0] + p["bs"][0]))
        return jax.nn.sigmoid(h @ p["wo"] + p["bo"])

    fb, rel = _lfp(fun, p)
    layers = [("dense", p["ws"][0], p["bs"][0]), ("act", lambda z: np.maximum(z, 0)),
              ("act", np.tanh), ("dense", p["wo"], p["bo"]), ("act", lambda z: 1 / (1 + np.exp(-z)))]
    want, want_rel = spec_chain(layers, X, R)
    np.testing.assert_allclose(fb["ws"][0], want[0][0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fb["wo"], want[1][0], rtol=1e-9)
    np.testing.assert_allclose(rel, want_rel, rtol=1e-9, atol=1e-12)


def test_cond_branches_ending_differently_match_the_inlined_model():
    p = _params()

    def with_cond(p, x, flag):
        h = x @ p["ws"][0] + p["bs"][0]
        h = jax.lax.cond(flag, lambda h: h @ p["ws"][1] + p["bs"][1], jnp.tanh, h)
        return jnp.tanh(h) @ p["wo"] + p["bo"]

    for flag in (True, False):
        out, fb_fn = lfp_jax.lfp_vjp(with_cond, p, X, flag, composite=COMPOSITE)
        fb = fb_fn(R)[0]
        layers = [("dense", p["ws"][0], p["bs"][0])]
        layers += [("dense", p["ws"][1], p["bs"][1])] if flag else [("act", np.tanh)]
        layers += [("act", np.tanh), ("dense", p["wo"], p["bo"])]
        want, _ = spec_chain(layers, X, R)
        np.testing.assert_allclose(fb["ws"][0], want[0][0], rtol=1e-9, atol=1e-12)


def test_concatenated_dense_output_is_stabilised_once():
    p = {"w1": _rand(6, 5, 2), "w2": _rand(7, 5, 3), "w3": _rand(8, 5, 3)}

    def fun(p, x):
        return jnp.concatenate([x @ p["w1"], jnp.tanh(x @ p["w2"])], axis=-1) @ p["w3"]

    fb, rel = _lfp(fun, p)
    a, z2 = X @ p["w1"], X @ p["w2"]
    h = np.concatenate([a, np.tanh(z2)], -1)
    s3 = R / stab(h @ p["w3"])
    r_h = h * (s3 @ p["w3"].T)
    s1, s2 = r_h[:, :2] / stab(a), r_h[:, 2:] / stab(z2)   # each layer's own ε rule
    np.testing.assert_allclose(fb["w1"], np.abs(p["w1"]) * (X.T @ s1), rtol=1e-9)
    np.testing.assert_allclose(fb["w2"], np.abs(p["w2"]) * (X.T @ s2), rtol=1e-9)
    np.testing.assert_allclose(rel, X * (s1 @ p["w1"].T + s2 @ p["w2"].T), rtol=1e-9)


def test_module_paths_include_lifted_and_nested_scopes():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(4)(x))

    for lift, name in ((lambda c: c, "Block_0"), (nn.remat, "CheckpointBlock_0"), (nn.jit, "JitBlock_0")):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, lift=lift):
                return nn.Dense(3)(lift(Block)()(x))

        x = jnp.ones((2, 5))
        v = Net().init(jax.random.key(0), x)
        paths = [s.name_stack for s in lfp_jax.find_sites(lambda v, x: Net().apply(v, x), v, x)]
        assert paths[0] == f"Net/{name}/Dense_0", paths
        composite = lfp_jax.lfp_epsilon().with_rules(
            (Match(path=f"Net/{name}*", kind="activation"), rules.Gradient()))
        sites = lfp_jax.find_sites(lambda v, x: Net().apply(v, x), v, x, composite=composite)
        assert isinstance(sites[1].rule, rules.Gradient)
