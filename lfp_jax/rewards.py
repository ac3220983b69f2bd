r"""Rewards at the model outputs (the reference implementation's set).

Every reward takes the outputs ``z`` (shape ``(batch, classes)``; spike rewards: output spike trains of
shape ``(T, batch, classes)``) and labels, and returns an array shaped like ``z``. Labels are integer
class indices ``(batch,)`` or one-hot / multi-hot floats ``(batch, classes)``. Rewards are per sample:
nothing is averaged over the batch (feedback is a batch sum). Positive reward at an output means "more
of this".

Bind the labels with a closure or ``functools.partial`` for :func:`lfp_jax.lfp_value_and_feedback`,
or pass them through its ``reward_argnums``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array


def _targets(z: Array, labels: ArrayLike) -> Array:
    """One-hot targets shaped like ``z`` from integer ``labels`` of shape ``z.shape[:-1]`` (or the
    targets themselves, shaped like ``z``). Concrete integer labels outside ``[0, classes)`` are refused
    (``jax.nn.one_hot`` would silently make them all-zero targets); traced ones cannot be checked."""
    concrete = not isinstance(labels, jax.core.Tracer)
    labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
    integer = jnp.issubdtype(labels.dtype, jnp.integer)
    if integer and labels.shape == z.shape[:-1]:
        if concrete and labels.size:  # numpy: labels closed over inside a jit trace are concrete too
            values = np.asarray(labels)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= z.shape[-1]:
                raise ValueError(f"labels must be class indices in [0, {z.shape[-1]}) for outputs with "
                                 f"{z.shape[-1]} classes, got values from {low} to {high}")
        return jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
    if labels.shape == z.shape:  # one-hot / multi-hot targets (float or integer)
        return labels.astype(z.dtype)
    want = (f"integer class indices of shape {z.shape[:-1]} (one per sample) or one-hot targets of shape "
            f"{z.shape}")
    if integer and labels.ndim == z.ndim - 1:
        raise ValueError(f"labels of shape {labels.shape} do not fit outputs of shape {z.shape}: the batch "
                         f"sizes differ ({labels.shape} vs {z.shape[:-1]}); give {want}.")
    raise ValueError(f"labels of shape {labels.shape} and dtype {labels.dtype} do not fit outputs of shape "
                     f"{z.shape}: give {want}.")


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


# --- spiking outputs: spike trains of shape (T, batch, classes) --------------------------------------


def _spike_targets(spikes: Array, labels: ArrayLike) -> Array:
    if spikes.ndim != 3:
        raise ValueError(f"spike rewards take output spikes of shape (T, batch, classes), got shape "
                         f"{spikes.shape}")
    return _targets(spikes[0], labels)[None]


def spike_rate_coded(spikes: Array, labels: ArrayLike) -> Array:
    r"""The reference's rate-coded reward on output spike trains ``spikes`` of shape ``(T, B, C)``.

    With ``N_c = Σ_t s_{t,c}`` spikes and ``N̄_c = T − N_c`` silent steps of class ``c``:

    .. math::

        r_{t,c} = \begin{cases} 1 - σ(N_y - ⌊T/2⌋) & c = y \text{ (every step)}\\
                  -s_{t,c}\,\big(1 - σ(N̄_c - ⌊T/2⌋)\big) & c ≠ y \text{ (steps where it fired)}
                  \end{cases}

    The true class is rewarded at every step, less as it fires more than half the time; a wrong class
    is punished where it fired, less as it stays silent more. Predict with ``spikes.sum(0).argmax(-1)``.
    """
    onehot = _spike_targets(spikes, labels)
    half = spikes.shape[0] // 2
    fired = jnp.sum(spikes, axis=0, keepdims=True)
    silent = jnp.sum(jnp.abs(spikes - 1), axis=0, keepdims=True)
    pos = 1 - jax.nn.sigmoid(fired - half)
    neg = 1 - jax.nn.sigmoid(silent - half)
    return jnp.where(onehot == 1, jnp.ones_like(spikes) * pos, -spikes * neg).astype(spikes.dtype)


def spike_count_softmax_loss(spikes: Array, labels: ArrayLike, *, epsilon: float = 1e-6) -> Array:
    r"""Softmax-loss reward on spike counts, spread over the steps where each output fired.

    With counts ``N = Σ_t s_t`` (the logits of a rate-coded network), ``r_N = N ⊙ (onehot(y) −
    softmax(N))`` (:func:`softmax_loss`), handed to the steps in proportion to their spikes, as the ε rule
    of the sum over time does: ``r_{t} = s_t ⊙ r_N / (N + ε)``. A class that never fired gets none.
    """
    onehot = _spike_targets(spikes, labels)[0]
    counts = jnp.sum(spikes, axis=0)
    r = counts * (onehot - jax.nn.softmax(counts, axis=-1))
    return (spikes * (r / (counts + epsilon))[None]).astype(spikes.dtype)


__all__ = ["softmax_loss", "sigmoid_loss", "bounded_softmax", "correct_class", "misclassification",
           "maximize_neuron", "minimize_neuron", "spike_rate_coded", "spike_count_softmax_loss"]
