"""The LFP core rules: LFP-ε for layers, identity for activations, winner-takes-all, dropout, and the
explicit opt-in to the plain gradient."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lfp_jax.rules._base import Array, Rule, SiteCall, safe_divide, stable_divide, widened, with_backward


@dataclasses.dataclass(frozen=True)
class Epsilon(Rule):
    r"""LFP-ε (the reference rule for Dense, Conv, BatchNorm, pooling and residual sums).

    ``s = R_y / (y + ε·sign(y))``, ``R_x = x ⊙ J_xᵀ s``, ``F_θ = |θ| ⊙ J_θᵀ s`` with the exact
    Jacobian ``J`` of the block (for a normalisation in training mode: batch statistics included).

    Args:
      epsilon: the stabiliser; the reference uses 1e-6 (1.0 for transformers).
    """

    epsilon: float = 1e-6
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "sum", "pool", "normalization"})
    merges_affine_tail: ClassVar[bool] = True  # the site is the layer with its bias (same numbers)
    conservative: ClassVar[bool] = True

    @property
    def output_epsilon(self) -> float:
        return self.epsilon


@widened
def _identity_share(ct: Array, y: Array, x: Array, eps: float | None, absolute: bool) -> Array:
    """``c_x`` of the identity rule from ``c_y`` (``R_y`` itself when ``absolute``)."""
    r = ct if absolute else ct * y  # R_y (given whole where a rule upstream hands R)
    return safe_divide(r, x) if eps is None else stable_divide(r, x, eps)


@dataclasses.dataclass(frozen=True)
class Identity(Rule):
    r"""Identity rule for activations: ``R_x = R_y``.

    In the normalised form ``c_x = c_y · φ(x) / (x + ε·sign(x))`` when ``x`` is the output of a block
    with ε (the block's ε rule, ``s = R_x / stab(x)``, is applied here); otherwise ``c_x = c_y · φ(x)/x``
    (0 where ``x = 0``), so chained activations pass reward unchanged. ``epsilon`` overrides the
    block's ε. No derivative of φ is used, so step functions pass reward wherever they fire.
    """

    epsilon: float | None = None
    kinds: ClassVar[frozenset[str]] = frozenset({"activation"})
    accepts_relevance: ClassVar[bool] = True
    conservative: ClassVar[bool] = True

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        eps = call.input_epsilon if self.epsilon is None else self.epsilon
        absolute = call.relevance_output

        def backward(ops, outs, ct):
            return [_identity_share(ct, outs[0], ops[0], eps, absolute)] + [None] * (len(ops) - 1)

        return with_backward(call, operands, backward, recompute=True)


@dataclasses.dataclass(frozen=True)
class Gradient(Rule):
    """The plain vector-Jacobian product: at this site LFP behaves like gradient descent.

    Never chosen by a preset: a user who wants it names it in a composite.
    """

    kinds: ClassVar[frozenset[str]] = frozenset(
        {"linear", "sum", "pool", "normalization", "activation", "max_pool", "max", "dropout",
         "softmax", "bilinear", "quotient", "nonlinear", "spiking"}
    )


@dataclasses.dataclass(frozen=True)
class WinnerTakeAll(Rule):
    r"""Max pooling and maxout: all reward goes to the winner (the VJP of ``max``).

    In a pooling window (``max_pool`` sites) ties go to the first maximum of the window in row-major
    order, as in the VJP of ``reduce_window``. For the elementwise ``y = max(a, b)`` (or ``min``) of
    two input-dependent values (``max`` sites: maxout ``max(x A, x B)``, a spiking residual
    ``max(x, x_skip)``), ``R_a = R_y`` where ``a > b`` and ``R_b = R_y`` where ``b > a``; where
    ``a = b`` each operand receives ``R_y / 2`` (JAX's convention for the derivative of ``max``),
    so reward is conserved. In the normalised form this is ``c_a = c_y · [a > b] + c_y/2 · [a = b]``.

    Non-overlapping pooling (window = stride, no padding or dilation; the usual 2x2/2 pool) is
    evaluated on CPU as a reshape and a reduction, forward and backward, with the same values and
    routing: XLA's CPU ``reduce_window`` and its VJP ``select_and_scatter_add`` are several times
    slower than that (benchmarks/lenet_cpu.py).
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"max_pool", "max"})
    conservative: ClassVar[bool] = True

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        if call.site.kind == "max":
            return call.fn(*operands)
        window = _tiling_window(call)
        if window is None:
            return call.fn(*operands)

        def backward(ops, outs, ct):
            return [_tiled_argmax_route(ops[0], outs[0], ct, window)] + [None] * (len(ops) - 1)

        def tiled(*ops):
            return with_backward(call._replace(fn=lambda *o: (_tiled_max(o[0], window),)), ops, backward)

        return jax.lax.platform_dependent(*operands, cpu=tiled, default=call.fn)


def _tiling_window(call: SiteCall) -> tuple[int, ...] | None:
    """The window of a ``reduce_window_max`` site whose windows tile its input, else ``None``."""
    site = call.site
    if tuple(site.primitives) != ("reduce_window_max",) or len(call.carries_reward) != 1:
        return None
    params = site.params[0]
    window = tuple(params["window_dimensions"])
    if (tuple(params["window_strides"]) != window
            or any(tuple(p) != (0, 0) for p in params["padding"])
            or any(d != 1 for d in params["base_dilation"])
            or any(d != 1 for d in params["window_dilation"])):
        return None
    return window


def _tiled_max(x: Array, window: tuple[int, ...]) -> Array:
    out = tuple(n // w for n, w in zip(x.shape, window))
    x = x[tuple(slice(0, o * w) for o, w in zip(out, window))]
    split = [d for o, w in zip(out, window) for d in (o, w)]
    return jnp.max(x.reshape(split), axis=tuple(range(1, 2 * len(window), 2)))


def _tiled_argmax_route(x: Array, y: Array, ct: Array, window: tuple[int, ...]) -> Array:
    """``ct`` of each window sent to the first maximum of the window (row-major), zeros elsewhere."""
    out = y.shape
    kept = x[tuple(slice(0, o * w) for o, w in zip(out, window))]
    split = [d for o, w in zip(out, window) for d in (o, w)]
    xs = kept.reshape(split)
    axes = tuple(range(1, 2 * len(window), 2))
    expand = lambda a: jnp.expand_dims(a, axes)
    # Row-major position of each element inside its window, shaped to broadcast against ``xs``.
    index = jnp.zeros([1] * len(split), jnp.int32)
    stride = 1
    for k in reversed(range(len(window))):
        shape = [1] * len(split)
        shape[2 * k + 1] = window[k]
        index = index + stride * jnp.arange(window[k], dtype=jnp.int32).reshape(shape)
        stride *= window[k]
    candidate = jnp.where(xs == expand(y), index, stride)
    first = jnp.min(candidate, axis=axes)
    routed = jnp.where(index == expand(first), expand(ct), jnp.zeros((), ct.dtype)).reshape(kept.shape)
    pad = [(0, n - k) for n, k in zip(x.shape, kept.shape)]
    return jnp.pad(routed, pad) if any(p[1] for p in pad) else routed


@dataclasses.dataclass(frozen=True)
class Dropout(Rule):
    r"""Dropout ``y = mask ⊙ x / (1 - p)``.

    Args:
      rescale: ``True`` (the reference): the plain VJP is applied to the reward itself,
        ``R_x = mask ⊙ R_y / (1 - p)``, so each dropout layer multiplies the reward below it by
        ``1/(1-p)``. ``False``: reward is conserved, ``R_x = mask ⊙ R_y``.
    """

    rescale: bool = True
    kinds: ClassVar[frozenset[str]] = frozenset({"dropout"})

    @property
    def conservative(self) -> bool:  # type: ignore[override]
        return not self.rescale

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        if not self.rescale:
            return call.fn(*operands)
        index = call.carries_reward.index(True)

        def backward(ops, outs, ct):
            relevance = outs[0] * ct
            _, vjp = jax.vjp(lambda a: call.fn(*ops[:index], a, *ops[index + 1:])[0], ops[index])
            (r_x,) = vjp(relevance)
            grads: list = [None] * len(ops)
            grads[index] = safe_divide(r_x, ops[index])
            return grads

        return with_backward(call, operands, backward)
