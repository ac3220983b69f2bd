"""Feedback, input relevance and rewards against numbers produced by the reference implementation.

``tests/data/lfprop/*.npz`` were written by ``tools/lfprop_reference/make_fixtures.py`` with lfprop
1.0.0 (PyTorch 2.13, float64, ε = 1e-6, torch.manual_seed(0)). The JAX models below are written in
plain jnp on the torch-layout parameters, so nothing but the weights is shared with the reference.
These are the networks on which LFP differs from gradient descent (tanh, SiLU, step, BatchNorm in
train mode, residual sums, pooling).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lfp_jax
from lfp_jax import rewards

DATA = pathlib.Path(__file__).parent / "data" / "lfprop"


def _linear(p, name, x):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _conv(p, name, x):
    y = lax.conv_general_dilated(x, p[f"{name}.weight"], (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p[f"{name}.bias"][None, :, None, None]


def _step(x):
    return (x > 0).astype(x.dtype)


def _mlp(act):
    def fun(p, x):
        x = act(_linear(p, "0", x))
        x = act(_linear(p, "2", x))
        return _linear(p, "4", x)
    return fun


def _cnn_pool(p, x):
    x = jax.nn.relu(_conv(p, "0", x))
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    x = jnp.tanh(_conv(p, "3", x))
    x = lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0
    return _linear(p, "7", x.reshape(x.shape[0], -1))


def _mlp_bn_train(p, x):
    h = _linear(p, "0", x)
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)  # torch normalises with the biased batch variance
    h = (h - mean) / jnp.sqrt(var + 1e-5) * p["1.weight"] + p["1.bias"]
    return _linear(p, "3", jax.nn.relu(h))


def _residual(p, x):
    h = jax.nn.relu(_linear(p, "fc_in", x))
    h = h + _linear(p, "fc_b", jnp.tanh(_linear(p, "fc_a", h)))
    return _linear(p, "fc_out", h)


MODELS = {
    "mlp_tanh": _mlp(jnp.tanh),
    "mlp_silu": _mlp(jax.nn.silu),
    "mlp_relu": _mlp(jax.nn.relu),
    "mlp_step": _mlp(_step),
    "cnn_pool": _cnn_pool,
    "mlp_bn_train": _mlp_bn_train,
    "residual": _residual,
}


def _load(case):
    d = np.load(DATA / f"{case}.npz", allow_pickle=False)
    keys = [str(k) for k in d["param_keys"]]
    params = {k: jnp.asarray(d[f"param/{k}"]) for k in keys}
    fb = {k: d[f"feedback/{k}"] for k in keys}
    return d, params, fb


@pytest.mark.parametrize("case", sorted(MODELS))
def test_feedback_matches_lfprop(case):
    d, params, want = _load(case)
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    logits, fb_fn = lfp_jax.lfp_vjp(MODELS[case], params, x)
    np.testing.assert_allclose(logits, d["logits"], rtol=1e-10, atol=1e-12)
    reward = rewards.softmax_loss(logits, y)
    np.testing.assert_allclose(reward, d["reward"], rtol=1e-9, atol=1e-12)
    got, relevance = fb_fn(reward)
    scale = max(np.abs(v).max() for v in want.values())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-9 * scale, err_msg=k)
    r_scale = np.abs(d["input_relevance"]).max()
    np.testing.assert_allclose(relevance, d["input_relevance"], rtol=1e-6, atol=1e-9 * r_scale)


@pytest.mark.parametrize("case", ["mlp_tanh", "mlp_silu", "cnn_pool"])
def test_lfp_differs_from_gradient_where_the_paper_says(case):
    """tanh and SiLU break φ(x) = x·φ'(x): first-layer feedback is not -|θ|·∇CE (reference agrees)."""
    d, params, want = _load(case)
    first = [k for k in want if k.endswith("weight")][0]
    theorem1 = -np.abs(d[f"param/{first}"]) * d[f"grad/{first}"]
    assert np.abs(want[first] - theorem1).max() > 1e-2 * np.abs(theorem1).max()
    got = lfp_jax.lfp_value_and_feedback(
        MODELS[case], lambda z: rewards.softmax_loss(z, jnp.asarray(d["y"])))(params, jnp.asarray(d["x"]))[1]
    assert np.abs(got[first] - theorem1).max() > 1e-2 * np.abs(theorem1).max()
