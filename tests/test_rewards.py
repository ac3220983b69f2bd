"""Rewards against values computed by hand (numpy formulas, no jax.nn)."""

import jax.numpy as jnp
import numpy as np

from lfp_jax import rewards

Z = np.array([[1.0, 2.0, -0.5], [0.5, -1.0, 3.0], [2.0, 2.0, 0.0]])
Y = np.array([1, 0, 0])
ONEHOT = np.eye(3)[Y]


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_softmax_loss_is_z_times_onehot_minus_softmax():
    np.testing.assert_allclose(rewards.softmax_loss(Z, Y), Z * (ONEHOT - _softmax(Z)), rtol=1e-12)
    np.testing.assert_allclose(rewards.softmax_loss(Z, ONEHOT), rewards.softmax_loss(Z, Y))


def test_softmax_loss_first_row_by_hand():
    p = np.exp([1.0, 2.0, -0.5]) / np.exp([1.0, 2.0, -0.5]).sum()   # 0.2559, 0.6955, 0.0571
    expected = [1.0 * (0 - p[0]), 2.0 * (1 - p[1]), -0.5 * (0 - p[2])]
    np.testing.assert_allclose(rewards.softmax_loss(Z, Y)[0], expected, rtol=1e-12)


def test_sigmoid_loss():
    np.testing.assert_allclose(rewards.sigmoid_loss(Z, Y), Z * (ONEHOT - 1 / (1 + np.exp(-Z))), rtol=1e-12)


def test_bounded_softmax_clips_the_softmax():
    p = _softmax(Z)
    clipped = np.where(p > 0.6, 1.0, p)
    clipped = np.where(clipped < 0.1, 0.0, clipped)
    got = rewards.bounded_softmax(Z, Y, lower=0.1, upper=0.6)
    np.testing.assert_allclose(got, Z * (ONEHOT - clipped), rtol=1e-12)
    got = rewards.bounded_softmax(Z, Y, lower=0.1, upper=0.6, sign_only=True)
    np.testing.assert_allclose(got, np.sign(Z) * (ONEHOT - clipped), rtol=1e-12)


def test_correct_class_rewards_only_correct_samples_at_the_true_class():
    # row 0: argmax 1 = label -> +sign(2); row 1: argmax 2 != 0 -> 0; row 2: tie 2 == 2 -> correct
    expected = np.array([[0, 1.0, 0], [0, 0, 0], [1.0, 0, 0]])
    np.testing.assert_allclose(rewards.correct_class(Z, Y), expected)


def test_misclassification_punishes_classes_above_the_true_one():
    # row 0: nothing above z_y = 2; row 1: class 2 (3 > 0.5); row 2: no class strictly above 2
    expected = np.array([[0, 0, 0], [0, 0, -1.0], [0, 0, 0]])
    np.testing.assert_allclose(rewards.misclassification(Z, Y), expected)


def test_single_neuron_rewards():
    sig = 1 / (1 + np.exp(-Z))
    np.testing.assert_allclose(rewards.maximize_neuron(Z), np.sign(Z) * (1 - sig), rtol=1e-12)
    np.testing.assert_allclose(rewards.minimize_neuron(Z), -np.sign(Z) * (1 - sig), rtol=1e-12)


def test_rewards_keep_the_output_dtype():
    z = jnp.asarray(Z, jnp.float32)
    for fn in (rewards.softmax_loss, rewards.correct_class, rewards.misclassification):
        assert fn(z, Y).dtype == jnp.float32
