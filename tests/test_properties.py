"""Property-based tests (hypothesis) over random small ReLU networks, in float64.

Architectures: an optional first 2x2 convolution (VALID, on 3x3 inputs with 1-2 channels, 1-3 output
channels), then 1-3 dense layers (hidden widths 1-6, input width 1-6 without the convolution), 2-4
classes, batch 1-4, with or without biases. The weights, inputs and labels come from a numpy generator
seeded with an integer that hypothesis picks (and reports in a falsifying example), so they are
continuous random numbers: pre-activations are never exactly 0 unless a whole layer below is silent, and
examples whose layer outputs come within 1e-3 of 0 without being 0 are discarded (there ε's first-order
error ε/|y| or the rounding of R/z, not the property, would be tested).

(a) Theorem 1: LFP feedback with ``lfp_epsilon(1e-12)`` and the softmax-loss reward equals
    ``-|θ| ⊙ ∇_θ Σ_batch CE`` (jax.grad) to 1e-8 relative per parameter leaf.
(b) Conservation: on the same network with its biases set to 0, with ε = 0 (LRP-0 on every layer, the
    identity on ReLUs), the input relevance of each sample sums to the output relevance of that sample
    (a random seed of both signs) to 1e-8 of the sample's Σ|R_out|.

Each example compiles (a new architecture): both properties share one jitted program. The number of
examples comes from the hypothesis profile that ``conftest.py`` loads: 10 in the default suite (about
6 s), 60 with ``--slow`` (CI).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from _helpers import rel_err
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lfp_jax
from lfp_jax import composites, rewards

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # examples: the profile
MIN_ABS = 1e-3  # layer outputs are exactly 0 (a silent layer below) or at least this far from 0


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _layers(p, x):
    """All layer outputs (pre-activations); the last one is the logits."""
    outs = []
    if "conv" in p:
        z = _conv(x, p["conv"])
        z = z + p["conv_b"] if "conv_b" in p else z
        outs.append(z)
        x = jax.nn.relu(z).reshape(x.shape[0], -1)
    n = sum(1 for k in p if k.startswith("w"))
    for i in range(n):
        z = x @ p[f"w{i}"]
        z = z + p[f"b{i}"] if f"b{i}" in p else z
        outs.append(z)
        x = jax.nn.relu(z)
    return outs


def model(p, x):
    return _layers(p, x)[-1]


def _ce_sum(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(p, x), y).sum()


_lfp = lfp_jax.lfp_value_and_feedback(model, rewards.softmax_loss, composite=lfp_jax.lfp_epsilon(1e-12),
                                      reward_argnums=(2,))
_lrp0 = lfp_jax.lrp(model, composites.attn_lrp(0.0))


@jax.jit
def _programs(p, x, y, p_no_bias, seed_relevance):
    """Both sides of Theorem 1, and LRP-0 on the network with its biases set to 0, in one program (one
    compilation per architecture)."""
    return _lfp(p, x, y)[1], jax.grad(_ce_sum)(p, x, y), _lrp0(p_no_bias, x, target=seed_relevance)


@st.composite
def networks(draw):
    conv = draw(st.booleans())
    hidden = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
    classes = draw(st.integers(2, 4))
    batch = draw(st.integers(1, 4))
    bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # numpy: no compilation per shape
    p = {}
    if conv:
        cin, cout = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        x = rng.standard_normal((batch, 3, 3, cin))
        p["conv"] = rng.standard_normal((2, 2, cin, cout)) / np.sqrt(4 * cin)
        if bias:
            p["conv_b"] = 0.5 * rng.standard_normal(cout)
        width = 4 * cout
    else:
        width = draw(st.integers(1, 6))
        x = rng.standard_normal((batch, width))
    for i, out in enumerate([*hidden, classes]):
        p[f"w{i}"] = rng.standard_normal((width, out)) / np.sqrt(width)
        if bias:
            p[f"b{i}"] = 0.5 * rng.standard_normal(out)
        width = out
    y = rng.integers(0, classes, batch)
    seed_relevance = rng.standard_normal((batch, classes))
    return p, x, y, seed_relevance


def _numpy_layers(p, x):
    """The layer outputs of ``model``, in numpy (the convolution as a sum over the 2x2 window)."""
    outs = []
    if "conv" in p:
        k = p["conv"]
        z = sum(np.einsum("bhwc,co->bhwo", x[:, i:i + 2, j:j + 2], k[i, j])
                for i in range(2) for j in range(2))
        z = z + p.get("conv_b", 0.0)
        outs.append(z)
        x = np.maximum(z, 0).reshape(x.shape[0], -1)
    for i in range(sum(1 for k in p if k.startswith("w"))):
        z = x @ p[f"w{i}"] + p.get(f"b{i}", 0.0)
        outs.append(z)
        x = np.maximum(z, 0)
    return outs


def _well_conditioned(p, x) -> bool:
    return all(np.all((np.abs(z) == 0) | (np.abs(z) >= MIN_ABS)) for z in _numpy_layers(p, x))


@SETTINGS
@given(networks())
def test_theorem1_and_conservation_on_random_relu_networks(net):
    p, x, y, seed_relevance = net
    p0 = {k: (np.zeros_like(v) if k.startswith(("b", "conv_b")) else v) for k, v in p.items()}
    assume(_well_conditioned(p, x) and _well_conditioned(p0, x))
    z0 = _numpy_layers(p0, x)[-1]
    seed_relevance = np.where(z0 == 0, 0.0, seed_relevance)  # a silent output has nothing to explain
    got, grad, (z0_model, relevance) = _programs(p, x, y, p0, seed_relevance)
    np.testing.assert_allclose(z0_model, z0, rtol=1e-12, atol=1e-12)  # the numpy forward is the model's

    # (a) Theorem 1, per parameter leaf, relative to the leaf (floor: 1e-6 of the largest leaf)
    want = {k: -np.abs(v) * np.asarray(grad[k]) for k, v in p.items()}
    scale = max(float(np.max(np.abs(w))) for w in want.values())
    assert set(got) == set(want)
    for k in want:
        err = rel_err(got[k], want[k], floor=1e-6 * scale)
        assert err <= 1e-8, f"Theorem 1, {k}: relative error {err:.2e}"

    # (b) conservation without biases, per sample, relative to the sample's Σ|R_out|
    assert relevance.shape == x.shape
    r_in = np.asarray(relevance).reshape(x.shape[0], -1).sum(1)
    r_out = seed_relevance.sum(1)
    size = np.abs(seed_relevance).sum(1)  # 0 for a silent sample: its input relevance must be 0 too
    assert np.all(np.abs(r_in - r_out) <= 1e-8 * size), f"conservation: Σ R_in {r_in} vs Σ R_out {r_out}"
