"""Rewards and the spiking (LIF) LFP rule against numbers produced by the reference implementation.

``tests/data/lfprop/rewards.npz`` and ``snn_*.npz`` were written by
``tools/lfprop_reference/make_reward_fixtures.py`` with lfprop 1.0.0 (PyTorch 2.13, snntorch, float64);
its docstring maps lfprop's reward classes to lfp_jax's names. The spiking networks (a LIF MLP with the
rate-coded or a random reward, and a LIF CNN with max pooling of tied spikes) are rewritten here in plain
jnp on the torch-layout weights (``run_lif_layers``); nothing else is shared with the reference.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfp_jax
from lfp_jax import rewards
from lfp_jax.nn import run_lif_layers

DATA = pathlib.Path(__file__).parent / "data" / "lfprop"
RTOL = 1e-10  # float64 on both sides: the same formulas, evaluated in a different order at most


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "rewards.npz") as f:
        return dict(f)


def _close(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("name", ["softmax_loss", "sigmoid_loss", "correct_class", "misclassification",
                                  "maximize_neuron", "minimize_neuron"])
def test_reward_equals_lfprops(ref, name):
    got = jax.jit(getattr(rewards, name))(ref["z"], ref["y"])
    want = ref[f"reward/{name}"]
    assert np.abs(want).max() > 0
    _close(got, want)


def test_fixture_has_the_edge_cases(ref):
    """A tie for the largest output at the label (counted as correct by both) and an exact zero output."""
    z, y = ref["z"], ref["y"]
    assert z[5, y[5]] == z[5].max() and np.sum(z[5] == z[5].max()) == 2
    assert ref["reward/correct_class"][5, y[5]] == 1.0
    assert np.any(z == 0.0)
    correct = z[np.arange(len(y)), y] >= z.max(1)
    assert 0 < correct.sum() < len(y)  # both kinds of sample, for correct_class and misclassification


def test_binary_sigmoid_loss_is_sigmoid_loss_on_one_output(ref):
    targets = ref["y1"][:, None].astype(np.float64)
    _close(jax.jit(rewards.sigmoid_loss)(ref["z1"], targets), ref["reward/binary_sigmoid_loss"])


@pytest.mark.parametrize("bounds", [(0.0, 1.0, False), (0.1, 0.6, False), (0.1, 0.6, True),
                                    (0.25, 0.5, True)])
def test_bounded_softmax_equals_lfprops(ref, bounds):
    lower, upper, sign_only = bounds
    assert any(tuple(b) == (lower, upper, float(sign_only)) for b in ref["bounds"])
    fn = jax.jit(functools.partial(rewards.bounded_softmax, lower=lower, upper=upper, sign_only=sign_only))
    p = np.asarray(jax.nn.softmax(ref["z"], -1))
    if (lower, upper) != (0.0, 1.0):  # both clips take effect somewhere in the fixture
        assert np.any(p > upper) and np.any(p < lower)
    _close(fn(ref["z"], ref["y"]), ref[f"reward/bounded_softmax/{lower}_{upper}_{int(sign_only)}"])


def test_spike_rate_coded_equals_lfprops(ref):
    spikes, y = ref["spikes"], ref["spike_y"]
    assert spikes.ndim == 3 and set(np.unique(spikes)) == {0.0, 1.0}
    _close(jax.jit(rewards.spike_rate_coded)(spikes, y), ref["reward/spike_rate_coded"])


def test_spike_count_softmax_loss_sums_over_time_to_lfprops_softmax_loss_at_the_counts(ref):
    """No lfprop counterpart: its reward, summed over time, is lfprop's SoftmaxLossReward at the spike
    counts up to the factor N / (N + ε)."""
    spikes, y = ref["spikes"], ref["spike_y"]
    eps = 1e-12
    got = jax.jit(functools.partial(rewards.spike_count_softmax_loss, epsilon=eps))(spikes, y)
    want = ref["spike_counts_softmax_loss"]
    assert np.any(want != 0)
    _close(np.asarray(got).sum(0), want, rtol=1e-10)


# --- the spiking rule -----------------------------------------------------------------------------

SNN_CASES = ["mlp", "mlp_random_reward", "cnn_pool"]


def _pool(h):  # NCHW, 2x2 windows, stride 2
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def _conv(p, a):
    z = jax.lax.conv_general_dilated(a, p["0.parameterized_layer.weight"], (1, 1), "VALID",
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return z + p["0.parameterized_layer.bias"][None, :, None, None]


def _snn(p, frames, beta, threshold):
    """The reference's networks in plain jnp, torch layout (``x @ W.T + b``, NCHW convolutions)."""
    if frames.ndim == 3:  # mlp: Linear → LIF → Linear → LIF
        layers = [lambda a: a @ p["0.parameterized_layer.weight"].T + p["0.parameterized_layer.bias"],
                  lambda a: a @ p["1.parameterized_layer.weight"].T + p["1.parameterized_layer.bias"]]
    else:  # cnn_pool: Conv → LIF → MaxPool → Flatten → Linear → LIF
        def dense(a):
            h = _pool(a).reshape(a.shape[0], -1)
            return h @ p["3.parameterized_layer.weight"].T + p["3.parameterized_layer.bias"]
        layers = [lambda a: _conv(p, a), dense]
    return run_lif_layers(layers, frames, beta=beta, threshold=threshold)


@pytest.mark.parametrize("case", SNN_CASES)
def test_spiking_feedback_equals_lfprops(case):
    with np.load(DATA / f"snn_{case}.npz") as f:
        d = dict(f)
    keys = [str(k) for k in d["param_keys"]]
    p = {k: d[f"param/{k}"] for k in keys}
    beta, threshold, eps = float(d["beta"]), float(d["threshold"]), float(d["epsilon"])
    model = functools.partial(_snn, beta=beta, threshold=threshold)
    composite = lfp_jax.lfp_epsilon(eps)

    @jax.jit
    def run(p, frames, reward):
        spikes, back = lfp_jax.lfp_vjp(model, p, frames, composite=composite)
        return spikes, *back(reward)

    spikes, feedback, relevance = run(p, d["frames"], d["reward"])
    np.testing.assert_array_equal(spikes, d["spikes"])  # the same LIF dynamics
    assert 0.05 < float(d["hidden_spike_rate"]) < 0.95 and 0.05 < float(d["output_spike_rate"]) < 0.95
    if case != "mlp_random_reward":  # the rate-coded reward of these spikes, as lfprop's training loop does
        _close(rewards.spike_rate_coded(spikes, d["y"]), d["reward"])
    if case == "cnn_pool":  # the pooled spikes tie in many windows (at 1 and at 0): routing matters
        hidden = run_lif_layers([lambda a: _conv(p, a)], d["frames"], beta=beta, threshold=threshold)
        windows = np.asarray(hidden).reshape(*hidden.shape[:3], 3, 2, 3, 2).transpose(0, 1, 2, 3, 5, 4, 6)
        windows = windows.reshape(*windows.shape[:5], 4)
        count = (windows == windows.max(-1, keepdims=True)).sum(-1)
        assert np.mean(count >= 2) > 0.3 and np.any((windows.max(-1) == 1) & (count >= 2))
    for k in keys:
        want = d[f"feedback/{k}"]
        assert np.abs(want).max() > 0
        _close(feedback[k], want)
    _close(relevance, d["input_relevance"])
