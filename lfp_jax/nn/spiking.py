r"""Leaky integrate-and-fire (LIF) neurons with a true Heaviside spike, and input encodings.

One time step of a LIF layer, for the current ``I_t`` produced by a parameterised layer (Dense, Conv)
and the membrane ``u_t`` (reset by subtraction, delayed by one step as in snntorch's ``Leaky``):

.. math::

    \mathrm{reset}_t = H(u_t - \vartheta),\qquad
    u_{t+1} = \beta\,u_t + I_t - \mathrm{reset}_t\,\vartheta,\qquad
    s_{t+1} = H(u_{t+1} - \vartheta),

with ``H(v) = 1[v > 0]``, leak ``β`` (0.9 in the reference) and threshold ``ϑ`` (1). :func:`lif_step`
is one JAX primitive, ``lif_step``, so that the LFP engine finds every LIF neuron in a program (inside
``lax.scan`` over time too) and applies :class:`lfp_jax.rules.SpikingEpsilon` there.

Derivatives (for gradient-descent baselines): the spike's derivative is that of the true Heaviside
(zero) unless a ``surrogate`` is named; ``"atan"`` uses snntorch's arc-tangent surrogate
``∂s/∂u = (α/2) / (1 + (π α (u - ϑ) / 2)²)`` (α = 2). The reset is not differentiated, so
``∂u_{t+1}/∂u_t = β`` and ``∂u_{t+1}/∂I_t = 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

Array = jax.Array

SURROGATES = (None, "atan")

lif_step_p = Primitive("lif_step")
lif_step_p.multiple_results = True


def lif_step(current: Array, membrane: Array, *, beta: float = 0.9, threshold: float = 1.0,
             surrogate: str | None = None, alpha: float = 2.0) -> tuple[Array, Array]:
    """One time step of a LIF neuron layer: ``(spikes, new_membrane)``; see the module docstring.

    Args:
      current: input current ``I_t`` (the output of the parameterised layer at this step).
      membrane: membrane potential ``u_t`` (zeros at the first step); broadcast to ``current``.
      beta: leak, ``0 <= beta <= 1``.
      threshold: firing threshold ``ϑ > 0``; a spike subtracts it from the membrane one step later.
      surrogate: derivative of the spike used by gradient descent: ``None`` (the true Heaviside: zero)
        or ``"atan"``. LFP never uses it.
      alpha: sharpness of the ``atan`` surrogate.
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (the leak) must lie in [0, 1], got {beta}")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    current = jnp.asarray(current)
    if not jnp.issubdtype(current.dtype, jnp.floating):
        raise TypeError(f"lif_step needs a floating-point current, got {current.dtype}")
    membrane = jnp.broadcast_to(jnp.asarray(membrane, current.dtype), current.shape)
    spikes, new = lif_step_p.bind(current, membrane, beta=float(beta), threshold=float(threshold),
                                  surrogate=surrogate, alpha=float(alpha))
    return spikes, new


def _impl(current, membrane, *, beta, threshold, surrogate, alpha):
    del surrogate, alpha
    reset = (membrane > threshold).astype(current.dtype)
    new = beta * membrane + current - reset * threshold
    return (new > threshold).astype(current.dtype), new


def _abstract(current, membrane, **params):
    if current.shape != membrane.shape or current.dtype != membrane.dtype:
        raise TypeError(f"lif_step: current {current.str_short()} and membrane {membrane.str_short()} "
                        f"must have one shape and dtype")
    return current, current


def _surrogate_slope(v: Array, surrogate: str | None, alpha: float) -> Array | None:
    if surrogate == "atan":
        return (alpha / 2) / (1 + (math.pi / 2 * alpha * v) ** 2)
    return None


def _jvp(primals, tangents, *, beta, threshold, surrogate, alpha):
    current, membrane = primals
    spikes, new = lif_step_p.bind(current, membrane, beta=beta, threshold=threshold,
                                  surrogate=surrogate, alpha=alpha)
    d_current, d_membrane = (ad.instantiate_zeros(t) for t in tangents)
    d_new = beta * d_membrane + d_current
    slope = _surrogate_slope(new - threshold, surrogate, alpha)
    # the true Heaviside: a symbolic zero (nothing computed or stored for the gradient baseline)
    d_spikes = ad.Zero(jax.typeof(spikes).to_tangent_aval()) if slope is None else slope * d_new
    return (spikes, new), (d_spikes, d_new)


def _batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
             for a, d in zip(args, dims)]
    return lif_step_p.bind(*moved, **params), (0, 0)


lif_step_p.def_impl(_impl)
lif_step_p.def_abstract_eval(_abstract)
ad.primitive_jvps[lif_step_p] = _jvp
batching.primitive_batchers[lif_step_p] = _batch
mlir.register_lowering(lif_step_p, mlir.lower_fun(_impl, multiple_results=True))


def rate_encode(key: Array, x: Array, steps: int) -> Array:
    """Poisson (Bernoulli) rate coding: ``steps`` binary frames with ``P(spike) = clip(x, 0, 1)``.

    Returns an array of shape ``(steps, *x.shape)`` in ``x``'s dtype.
    """
    p = jnp.clip(x, 0, 1)
    return jax.random.bernoulli(key, p, (steps, *x.shape)).astype(x.dtype)


def direct_encode(x: Array, steps: int) -> Array:
    """Direct (constant current) encoding: the same input at every one of ``steps`` time steps."""
    return jnp.broadcast_to(x, (steps, *x.shape))


class LIF(nn.Module):
    """A LIF neuron layer for Flax: ``(spikes, membrane) = LIF()(current, membrane)``.

    Stateless: the membrane is passed in and returned, so the layer runs inside ``lax.scan`` /
    ``nn.scan`` over time steps. Attributes as in :func:`lif_step`.
    """

    beta: float = 0.9
    threshold: float = 1.0
    surrogate: str | None = None
    alpha: float = 2.0

    def __call__(self, current: Array, membrane: Array) -> tuple[Array, Array]:
        return lif_step(current, membrane, beta=self.beta, threshold=self.threshold,
                        surrogate=self.surrogate, alpha=self.alpha)


def run_lif_layers(layers: list[Callable[[Array], Array]], inputs: Array, *, steps: int | None = None,
                   beta: float = 0.9, threshold: float = 1.0, surrogate: str | None = None,
                   order: str = "step", unroll: int | bool = 1) -> Array:
    """Run parameterised layers, each followed by a LIF layer, over time with ``lax.scan``.

    Args:
      layers: functions ``current = layer(x)`` (closures over parameters), applied in order, each
        followed by :func:`lif_step`; the spikes of one layer are the input of the next.
      inputs: ``(T, batch, ...)`` input frames (e.g. :func:`rate_encode`); or, with ``steps = T``,
        one input ``(batch, ...)`` fed at every step (direct encoding), whose first-layer current is
        then computed once (the same numbers, and the same feedback: a sum over steps).
      order: ``"step"``: one scan over time whose body runs every layer (the reference's loop);
        ``"layer"``: one scan over time per layer, and each layer applied to all ``T·batch`` inputs at
        once in between. A feed-forward network computes the same values and the same LFP feedback in
        both orders; ``"layer"`` keeps convolutions out of loops, where XLA's CPU backend runs their
        derivatives many times slower.
      unroll: passed to ``lax.scan``; unrolling the few steps of a short simulation lets XLA fuse
        across steps (on CPU, a loop body of a few small elementwise operations is dominated by the
        per-iteration overhead).

    Returns:
      the last layer's spikes, ``(T, batch, ...)``.
    """
    if order not in ("step", "layer"):
        raise ValueError(f"order must be 'step' or 'layer', got {order!r}")
    lif = functools.partial(lif_step, beta=beta, threshold=threshold, surrogate=surrogate)
    constant = steps is not None
    T = steps if constant else inputs.shape[0]
    current0 = layers[0](inputs) if constant else None

    if order == "layer":
        h = None
        for k, layer in enumerate(layers):
            if k == 0 and constant:
                zeros = jnp.zeros(current0.shape, current0.dtype)
                _, h = jax.lax.scan(lambda u, _: lif(current0, u)[::-1], zeros, None, length=T,
                                    unroll=unroll)
                continue
            src = inputs if k == 0 else h
            flat = layer(src.reshape(T * src.shape[1], *src.shape[2:]))
            cur = flat.reshape(T, src.shape[1], *flat.shape[1:])
            _, h = jax.lax.scan(lambda u, c: lif(c, u)[::-1], jnp.zeros(cur.shape[1:], cur.dtype), cur,
                                unroll=unroll)
        return h

    shapes, h = [], inputs if constant else jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype)
    for layer in layers:
        h = jax.eval_shape(layer, h)
        shapes.append(h)
    membranes = [jnp.zeros(sh.shape, sh.dtype) for sh in shapes]

    def step(carry, frame):
        new, h = [], frame
        for k, (layer, u) in enumerate(zip(layers, carry)):
            cur = current0 if (k == 0 and constant) else layer(h)
            h, u = lif(cur, u)
            new.append(u)
        return new, h

    _, spikes = jax.lax.scan(step, membranes, None if constant else inputs, length=T, unroll=unroll)
    return spikes
