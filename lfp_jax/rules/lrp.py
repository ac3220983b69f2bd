"""Classic LRP rules for linear sites (z⁺, γ, α-β, flat, w², z^B), given as terms of a modified
forward pass."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lfp_jax.rules._base import Array, Rule, SiteCall, safe_divide, stabilize, with_backward


@dataclasses.dataclass(frozen=True)
class LinearRule(Rule):
    r"""An LRP rule for a linear site ``o = f(x, W)`` (``dot_general`` or a convolution), given as terms.

    A rule is a list of terms ``(a_k, w_k, σ_k)`` (from :meth:`terms`) defining a modified forward
    ``z = Σ_k σ_k f(a_k, w_k)``. With the reward ``R_o = o ⊙ c_o`` at the site output,

    .. math::

        s = \frac{R_o}{\mathrm{stab}(z)},\quad R_x = \sum_k \sigma_k\, a_k \odot J_{a_k}^\top s,
        \quad c_W = \frac{\partial z}{\partial W}^\top s,

    and ``c_x = R_x / x`` (0 where ``x = 0``). The ε rule is ``[(x, W, +1)]``; z⁺ is
    ``[(x⁺, W⁺), (x⁻, W⁻)]``; γ is ``[(x, W + γW⁺)]``; flat ``[(1, 1)]``; w² ``[(1, W²)]``; z^B is
    ``[(x, W), (l, W⁺, −1), (h, W⁻, −1)]``. Parameter feedback is ``|W| ⊙ c_W``, like LFP-ε (zero for
    flat, whose ``z`` does not depend on ``W``).
    """

    epsilon: float = 1e-6
    kinds: ClassVar[frozenset[str]] = frozenset({"linear"})

    def terms(self, x: Array, w: Array) -> list[tuple[Array, Array, float]]:
        return [(x, w, 1.0)]

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        if len(operands) != 2 or sum(call.carries_reward) != 1:
            raise TypeError(f"{type(self).__name__} needs a linear site with one input and one weight")
        xi = call.carries_reward.index(True)
        wi = 1 - xi

        def f(a, w):
            ops = [None, None]
            ops[xi], ops[wi] = a, w
            return call.fn(*ops)[0]

        def backward(ops, outs, ct):
            x, w = ops[xi], ops[wi]
            relevance = outs[0] * ct
            r_x, c_w = self._propagate(f, x, w, relevance)
            grads: list = [None, None]
            grads[xi] = safe_divide(r_x, x)
            grads[wi] = c_w
            return grads

        return with_backward(call, operands, backward)

    def _propagate(self, f, x, w, relevance):
        return _propagate_terms(self.terms, self.epsilon, f, x, w, relevance)


def _propagate_terms(terms, epsilon, f, x, w, relevance):
    """``(R_x, c_W)`` of the modified forward ``z = Σ σ_k f(a_k, w_k)`` given by ``terms(x, w)``."""

    def z_of(activations, weight):
        return sum(s * f(a, wk) for (_, wk, s), a in zip(terms(x, weight), activations))

    acts = [a for a, _, _ in terms(x, w)]
    z, vjp_a = jax.vjp(lambda acts_: z_of(acts_, w), acts)
    s = relevance / stabilize(z, epsilon)
    (ct_acts,) = vjp_a(s)
    r_x = sum(a * c for a, c in zip(acts, ct_acts))  # c already carries the term's sign
    _, vjp_w = jax.vjp(lambda weight: z_of(acts, weight), w)
    (c_w,) = vjp_w(s)
    return r_x, c_w


def _pos(a: Array) -> Array:
    return jnp.maximum(a, 0)


def _neg(a: Array) -> Array:
    return jnp.minimum(a, 0)


@dataclasses.dataclass(frozen=True)
class ZPlus(LinearRule):
    """z⁺: only positive contributions, ``z = f(x⁺, W⁺) + f(x⁻, W⁻)``."""

    def terms(self, x, w):
        return [(_pos(x), _pos(w), 1.0), (_neg(x), _neg(w), 1.0)]


@dataclasses.dataclass(frozen=True)
class Gamma(LinearRule):
    """γ rule: positive weights favoured, ``z = f(x, W + γW⁺)``."""

    gamma: float = 0.25

    def terms(self, x, w):
        return [(x, w + self.gamma * _pos(w), 1.0)]


@dataclasses.dataclass(frozen=True)
class Flat(LinearRule):
    """Flat rule: reward spread uniformly over the receptive field, ``z = f(1, 1)``."""

    def terms(self, x, w):
        return [(jnp.ones_like(x), jnp.ones_like(w), 1.0)]


@dataclasses.dataclass(frozen=True)
class WSquare(LinearRule):
    """w² rule: reward spread by squared weights, ``z = f(1, W²)``."""

    def terms(self, x, w):
        return [(jnp.ones_like(x), w * w, 1.0)]


@dataclasses.dataclass(frozen=True)
class ZBox(LinearRule):
    """z^B rule for bounded inputs ``low ≤ x ≤ high``: ``z = f(x, W) − f(l, W⁺) − f(h, W⁻)``."""

    low: float = 0.0
    high: float = 1.0

    def terms(self, x, w):
        low = jnp.full_like(x, self.low)
        high = jnp.full_like(x, self.high)
        return [(x, w, 1.0), (low, _pos(w), -1.0), (high, _neg(w), -1.0)]


@dataclasses.dataclass(frozen=True)
class AlphaBeta(LinearRule):
    r"""α-β rule: ``R = α R⁺ − β R⁻`` with positive and negative contributions normalised apart.

    ``z⁺ = f(x⁺, W⁺) + f(x⁻, W⁻)`` and ``z⁻ = f(x⁺, W⁻) + f(x⁻, W⁺)``; ``α − β = 1`` conserves reward.
    """

    alpha: float = 2.0
    beta: float = 1.0

    def _propagate(self, f, x, w, relevance):
        r_x, c_w = 0.0, 0.0
        for coef, (wp, wn) in ((self.alpha, (_pos, _neg)), (-self.beta, (_neg, _pos))):
            def terms(x_, w_, wp=wp, wn=wn):
                return [(_pos(x_), wp(w_), 1.0), (_neg(x_), wn(w_), 1.0)]

            part_x, part_w = _propagate_terms(terms, self.epsilon, f, x, w, relevance)
            r_x, c_w = r_x + coef * part_x, c_w + coef * part_w
        return r_x, c_w
