r"""Rewards at the model outputs (the reference implementation's set).

Every reward takes the outputs ``z`` (shape ``(batch, classes)``) and labels, and returns an array
shaped like ``z``. Labels are integer class indices ``(batch,)`` or one-hot / multi-hot floats
``(batch, classes)``. Rewards are per sample: nothing is averaged over the batch (feedback is a batch
sum). Positive reward at an output means "more of this".

Bind the labels with a closure or ``functools.partial`` for :func:`lfp_jax.lfp_value_and_feedback`,
or pass them through its ``reward_argnums``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array


def _targets(z: Array, labels: ArrayLike) -> Array:
    labels = jnp.asarray(labels)
    if labels.ndim == z.ndim - 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        return jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    if labels.shape == z.shape:
        return labels.astype(z.dtype)
    raise ValueError(
        f"labels of shape {labels.shape} and dtype {labels.dtype} do not fit outputs of shape "
        f"{z.shape}: give integer class indices of shape {z.shape[:-1]} or one-hot targets of shape "
        f"{z.shape}."
    )


def _sign(z: Array) -> Array:
    return jnp.sign(z)


def softmax_loss(z: Array, labels: ArrayLike) -> Array:
    r"""Softmax-loss reward (the default for classification): ``r = z ⊙ (onehot(y) − softmax(z))``.

    ``onehot(y) − softmax(z)`` is the negative gradient of the cross-entropy with respect to ``z``;
    multiplying by ``z`` turns it into a reward in LRP's ``value ⊙ (−gradient)`` form, which is what
    makes LFP equal ``-|θ| ⊙ ∇CE`` on ReLU networks (Theorem 1).
    """
    return z * (_targets(z, labels) - jax.nn.softmax(z, axis=-1))


def sigmoid_loss(z: Array, labels: ArrayLike) -> Array:
    r"""Sigmoid-loss reward ``r = z ⊙ (y − σ(z))`` for one-hot or multi-label targets ``y``."""
    return z * (_targets(z, labels) - jax.nn.sigmoid(z))


def bounded_softmax(z: Array, labels: ArrayLike, *, lower: float = 0.0, upper: float = 1.0,
                    sign_only: bool = False) -> Array:
    r"""Softmax-loss reward with a clipped softmax: ``r = z ⊙ (onehot(y) − p̃)``.

    ``p̃ = 1`` where ``softmax(z) > upper``, ``0`` where it is ``< lower``, ``softmax(z)`` otherwise,
    so confident outputs stop being pushed. With ``sign_only`` the factor ``z`` becomes ``sign(z)``.
    """
    p = jax.nn.softmax(z, axis=-1)
    p = jnp.where(p > upper, 1.0, p)
    p = jnp.where(p < lower, 0.0, p)
    scale = _sign(z) if sign_only else z
    return scale * (_targets(z, labels) - p)


def correct_class(z: Array, labels: ArrayLike) -> Array:
    r"""``+sign(z_y)`` at the true class of correctly classified samples, 0 everywhere else.

    A sample is correct when its true class has the largest output (ties count as correct). The
    reward has no useful gradient; LFP trains with it anyway.
    """
    onehot = _targets(z, labels)
    z_true = jnp.sum(z * onehot, axis=-1, keepdims=True)
    correct = z_true >= jnp.max(z, axis=-1, keepdims=True)
    return jnp.where(correct, onehot * _sign(z), 0.0).astype(z.dtype)


def misclassification(z: Array, labels: ArrayLike) -> Array:
    r"""``−sign(z_c)`` for every class ``c`` scoring above the true class, 0 elsewhere."""
    onehot = _targets(z, labels)
    z_true = jnp.sum(z * onehot, axis=-1, keepdims=True)
    return jnp.where(z > z_true, -_sign(z), 0.0).astype(z.dtype)


def maximize_neuron(z: Array, labels: ArrayLike | None = None) -> Array:
    r"""``sign(z) ⊙ (1 − σ(z))`` at every output: pushes each output up, saturating as it grows."""
    return _sign(z) * (1.0 - jax.nn.sigmoid(z))


def minimize_neuron(z: Array, labels: ArrayLike | None = None) -> Array:
    r"""``−sign(z) ⊙ (1 − σ(z))`` at every output: the opposite of :func:`maximize_neuron`."""
    return -maximize_neuron(z)


__all__ = ["softmax_loss", "sigmoid_loss", "bounded_softmax", "correct_class", "misclassification",
           "maximize_neuron", "minimize_neuron"]
