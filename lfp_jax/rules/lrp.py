r"""Classic LRP rules for linear sites (ε, z⁺, α-β, γ, flat, w², z^B) as Montavon et al. (2019) define
them and zennit 0.5 implements them: biases included, a following eval-mode normalisation merged into
the layer.

The site of a classic rule is the whole affine layer: the linear primitive (``dot_general`` or a
convolution) and the elementwise affine operations after it (``+ b``; an eval-mode BatchNorm
``(o − μ)·γ/σ + β``), so that ``y = a ⊙ f(x, W) + d`` with a per-output scale ``a`` and bias ``d``
(``a = 1`` without a normalisation). The rules see the *merged* layer ``W' = W·a`` (per output),
``b' = d``, exactly as if the normalisation had been folded into the weights beforehand (zennit's
``SequentialMergeBatchNorm`` canonizer): for a contribution ``x_i W'_{ij}`` the positive part is
``x⁺W'⁺ + x⁻W'⁻``, and ``f(u, W'^{+}) = a⁺ ⊙ f(u, W⁺) + a⁻ ⊙ f(u, W⁻)``.

Every rule is a list of *groups* ``(α_g, inputs u_{g,k}, z_g, mask_g)``: ``z_g`` is a modified forward
pass, linear in its inputs ``u`` (``x⁺``, ``x⁻``, ``x``, ones, bounds), and

.. math::

    s_g = \mathrm{mask}_g \odot \frac{R_y}{z_g + \varepsilon\,\mathrm{sign}(z_g)}, \qquad
    R_x = \sum_g \alpha_g \sum_k u_{g,k} \odot J_{u_{g,k}}^\top s_g, \qquad
    c_\theta = \sum_g \alpha_g\, J_\theta^\top s_g

for every parameter ``θ`` of the layer (weights, bias, normalisation parameters); LFP's parameter
feedback is ``|θ| ⊙ c_θ``. The rule receives ``R_y`` itself at its output (``output_epsilon`` is
:data:`~lfp_jax.rules.ABSOLUTE`) and hands ``R_x`` itself to its input (``returns_relevance``), so
relevance at inputs that are exactly zero is kept (flat, w², z^B give it by design): a model input
returns it as is (through reshapes and an input normalisation), an activation takes it whole, a block
output is converted with its ε. Inside ``scan`` and ``cond`` bodies a body input is converted to
``c = R / x`` (relevance at exact zeros is lost there); ``remat`` bodies hand it on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from lfp_jax.rules._base import ABSOLUTE, Array, Rule, SiteCall, stable_divide, with_backward


def _pos(a: Array) -> Array:
    return jnp.maximum(a, 0)


def _neg(a: Array) -> Array:
    return jnp.minimum(a, 0)


class Layer:
    r"""The merged affine layer ``y = a ⊙ f(x, W) + d`` a classic rule modifies.

    ``lin(u) = f(u, W')``, ``wpos(u) = f(u, W'⁺)``, ``wneg(u) = f(u, W'⁻)``, ``wsq(u) = f(u, W'²)`` and
    ``wones(u) = f(u, 1)`` with ``W' = W·a``; ``bias`` is ``d`` (0 with ``zero_bias``), ``bias_pos`` /
    ``bias_neg`` / ``bias_sq`` its parts and square.
    """

    def __init__(self, linear: Callable[[Array, Array], Array], weight: Array, scale: Array | None,
                 bias: Array | None):
        self._f, self.weight, self.scale, self._bias = linear, weight, scale, bias

    def _scaled(self, plus: Array, minus: Array) -> Array:
        """``a⁺ ⊙ plus + a⁻ ⊙ minus`` (``plus`` without a scale)."""
        if self.scale is None:
            return plus
        return _pos(self.scale) * plus + _neg(self.scale) * minus

    def lin(self, u: Array) -> Array:
        out = self._f(u, self.weight)
        return out if self.scale is None else self.scale * out

    def wpos(self, u: Array) -> Array:
        w = self.weight
        if self.scale is None:
            return self._f(u, _pos(w))
        return self._scaled(self._f(u, _pos(w)), self._f(u, _neg(w)))

    def wneg(self, u: Array) -> Array:
        w = self.weight
        if self.scale is None:
            return self._f(u, _neg(w))
        return self._scaled(self._f(u, _neg(w)), self._f(u, _pos(w)))

    def wsq(self, u: Array) -> Array:
        out = self._f(u, self.weight * self.weight)
        return out if self.scale is None else self.scale * self.scale * out

    def wones(self, u: Array) -> Array:
        return self._f(u, jnp.ones_like(self.weight))

    @property
    def bias(self) -> Array | float:
        return 0.0 if self._bias is None else self._bias

    @property
    def bias_pos(self) -> Array | float:
        return 0.0 if self._bias is None else _pos(self._bias)

    @property
    def bias_neg(self) -> Array | float:
        return 0.0 if self._bias is None else _neg(self._bias)

    @property
    def bias_sq(self) -> Array | float:
        return 0.0 if self._bias is None else self._bias * self._bias


class Group(NamedTuple):
    """One normalised part of a classic rule: ``R_x += coef · Σ_k u_k ⊙ J_{u_k}ᵀ (mask ⊙ R / stab(z))``."""

    coef: float
    inputs: Sequence[Array]
    z: Callable[[Layer, Sequence[Array]], Array]
    mask: Array | None = None


@dataclasses.dataclass(frozen=True)
class LinearRule(Rule):
    r"""Base of the classic LRP rules for a linear site; by itself the ε rule (LRP-ε, LRP-0 at ε = 0).

    ``z = W'x + b'``, ``s = R_y / (z + ε·sign(z))``, ``R_x = x ⊙ W'ᵀ s`` on the merged layer (see the
    module). Unlike :class:`~lfp_jax.rules.Epsilon`, whose stabiliser sits where the block output
    enters the next block, the stabiliser is applied to this layer's output.

    Args:
      epsilon: the stabiliser ε of ``z``.
      zero_bias: leave the bias (merged: ``d``) out of every modified forward pass, as zennit's
        ``zero_params="bias"``: then the rule conserves relevance exactly up to ε.

    Subclasses define :meth:`groups`.
    """

    epsilon: float = 1e-6
    zero_bias: bool = False
    kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    merges_affine_tail: ClassVar[bool] = True
    returns_relevance: ClassVar[bool] = True
    conservative: ClassVar[bool] = True

    @property
    def output_epsilon(self) -> Any:
        return ABSOLUTE

    def __post_init__(self) -> None:
        super().__post_init__()

    def groups(self, x: Array, y: Array) -> list[Group]:
        """The rule's groups for the input ``x`` and the layer's output ``y``."""
        return [Group(1.0, [x], lambda L, u: L.lin(u[0]) + L.bias)]

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        if len(operands) < 2 or sum(call.carries_reward) != 1 or not call.carries_reward[0]:
            raise TypeError(f"{type(self).__name__} needs a linear site with one input and a weight")
        head, tail, scales = _stages(call)

        def backward(ops, outs, ct):
            x, params = ops[0], list(ops[1:])
            r_x, c_params = self.propagate(head, tail, scales, x, params, outs[0], ct)
            return [r_x, *c_params]  # R itself (returns_relevance): the engine converts where needed

        return with_backward(call, operands, backward)

    def propagate(self, head, tail, scales, x, params, y, relevance):
        """``(R_x, c_params)`` for the output relevance ``relevance`` (see the module's formula)."""
        shape = jax.eval_shape(lambda a, *p: head(a, *p), x, *params)
        zero = jnp.zeros(shape.shape, shape.dtype)

        def layer(ps):
            def linear(u, w):
                return head(u, w, *ps[1:])

            if tail is None:
                return Layer(linear, ps[0], None, None)
            affine = lambda o: tail(o, *ps)  # noqa: E731
            bias, scale = jax.jvp(affine, (zero,), (jnp.ones_like(zero),))
            if not scales:
                scale = None
            return Layer(linear, ps[0], scale, None if self.zero_bias else bias)

        r_x = jnp.zeros_like(x)
        c_params = [jnp.zeros_like(p) for p in params]
        for group in self.groups(x, y):
            inputs = list(group.inputs)
            z, vjp = jax.vjp(lambda us, ps, g=group: g.z(layer(ps), us), inputs, params)
            s = stable_divide(relevance, z, self.epsilon)
            if z.dtype == jnp.float16:  # R / ε overflows half precision where z = 0 (no contributions)
                s = jnp.where(z == 0, 0, s)
            if group.mask is not None:
                s = jnp.where(group.mask, s, 0)
            ct_us, ct_ps = vjp(s)
            r_x = r_x + group.coef * sum(u * c for u, c in zip(inputs, ct_us))
            c_params = [c + group.coef * d for c, d in zip(c_params, ct_ps)]
        return r_x, c_params


def _stages(call: SiteCall):
    """``head(x, w, *rest)``: the bare linear primitive; ``tail(o, *params)``: the affine operations
    after it inside the site (``None`` when the site is the primitive alone), and whether they scale
    the linear output (anything but adding a bias)."""
    k = getattr(call.site, "head", 1)
    if call.stages is None or len(call.site.nodes) == k:
        return (lambda a, *ps: call.fn(a, *ps)[0]), None, False
    head, tail = call.stages(k)
    scales = any(p != "add" for p in call.site.primitives[k:])
    return (lambda a, *ps: head(a, *ps)), (lambda o, *ps: tail(o, None, *ps)), scales


@dataclasses.dataclass(frozen=True)
class ZPlus(LinearRule):
    r"""z⁺: positive contributions only, ``z = f(x⁺, W'⁺) + f(x⁻, W'⁻) + b'⁺`` (α = 1, β = 0)."""

    def groups(self, x, y):
        return [Group(1.0, [_pos(x), _neg(x)],
                      lambda L, u: L.wpos(u[0]) + L.wneg(u[1]) + L.bias_pos)]


@dataclasses.dataclass(frozen=True)
class AlphaBeta(LinearRule):
    r"""α-β: ``R = α R⁺ − β R⁻``, positive and negative contributions normalised apart.

    ``z⁺ = f(x⁺, W'⁺) + f(x⁻, W'⁻) + b'⁺`` and ``z⁻ = f(x⁺, W'⁻) + f(x⁻, W'⁺) + b'⁻``.

    Args:
      alpha, beta: non-negative with ``α − β = 1`` (the rule then conserves relevance up to biases
        and ε); the usual choices are (2, 1) and (1, 0).
    """

    alpha: float = 2.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"AlphaBeta: alpha and beta must be >= 0, got alpha={self.alpha}, "
                             f"beta={self.beta}")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta: alpha - beta must be 1 for the rule to conserve relevance, got "
                f"alpha={self.alpha}, beta={self.beta} (alpha - beta = {self.alpha - self.beta}). Use "
                f"e.g. AlphaBeta(alpha=2.0, beta=1.0) or AlphaBeta(alpha=1.0, beta=0.0).")

    def groups(self, x, y):
        xp, xn = _pos(x), _neg(x)
        return [Group(self.alpha, [xp, xn], lambda L, u: L.wpos(u[0]) + L.wneg(u[1]) + L.bias_pos),
                Group(-self.beta, [xp, xn], lambda L, u: L.wneg(u[0]) + L.wpos(u[1]) + L.bias_neg)]


@dataclasses.dataclass(frozen=True)
class Gamma(LinearRule):
    r"""γ rule: positive (for positive outputs) contributions favoured by ``γ``.

    The generalised form (Andéol et al. 2021, zennit 0.5's ``Gamma``), for inputs and outputs of any
    sign: where the layer output ``y > 0``,
    ``z⁺ = f(x⁺, W' + γW'⁺) + f(x⁻, W' + γW'⁻) + b' + γb'⁺`` distributes it; where ``y < 0``,
    ``z⁻ = f(x⁺, W' + γW'⁻) + f(x⁻, W' + γW'⁺) + b' + γb'⁻`` (outputs exactly 0 pass nothing). For
    ``x ≥ 0`` and ``y > 0`` it is the original rule ``z = f(x, W' + γW'⁺) + b' + γb'⁺``
    (Montavon et al. 2019), which ``generalized=False`` applies everywhere.

    Args:
      gamma: ``γ ≥ 0`` (0 gives the ε rule; large γ approaches z⁺).
      generalized: the sign-aware form (default, as zennit) or the original one.
    """

    gamma: float = 0.25
    generalized: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma >= 0:
            raise ValueError(f"Gamma: gamma must be >= 0, got {self.gamma!r}")

    def groups(self, x, y):
        g = self.gamma
        if not self.generalized:
            return [Group(1.0, [x], lambda L, u: L.lin(u[0]) + g * L.wpos(u[0]) + L.bias + g * L.bias_pos)]
        xp, xn = _pos(x), _neg(x)
        return [
            Group(1.0, [xp, xn], lambda L, u: (L.lin(u[0]) + g * L.wpos(u[0]) + L.lin(u[1])
                                               + g * L.wneg(u[1]) + L.bias + g * L.bias_pos), y > 0),
            Group(1.0, [xp, xn], lambda L, u: (L.lin(u[0]) + g * L.wneg(u[0]) + L.lin(u[1])
                                               + g * L.wpos(u[1]) + L.bias + g * L.bias_neg), y < 0),
        ]


@dataclasses.dataclass(frozen=True)
class Flat(LinearRule):
    r"""Flat: relevance spread uniformly over each output's receptive field, ``z = f(1, 1)``, whatever
    the input values and weights (no bias; the input relevance is independent of ``x``)."""

    def groups(self, x, y):
        return [Group(1.0, [jnp.ones_like(x)], lambda L, u: L.wones(u[0]))]


@dataclasses.dataclass(frozen=True)
class WSquare(LinearRule):
    r"""w²: relevance spread by squared weights, ``z = f(1, W'²) + b'²`` (independent of ``x``)."""

    def groups(self, x, y):
        return [Group(1.0, [jnp.ones_like(x)], lambda L, u: L.wsq(u[0]) + L.bias_sq)]


@dataclasses.dataclass(frozen=True)
class ZBox(LinearRule):
    r"""z^B for inputs bounded by ``low ≤ x ≤ high`` (the first layer on pixels):
    ``z = f(x, W') − f(l, W'⁺) − f(h, W'⁻)``, ``R_x = x ⊙ W'ᵀs − l ⊙ W'⁺ᵀs − h ⊙ W'⁻ᵀs`` (the bias
    cancels: ``b' − b'⁺ − b'⁻ = 0``).

    Args:
      low, high: the bounds (scalars or arrays broadcasting against the input, e.g. per channel).
    """

    low: Any = 0.0
    high: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            ok = bool(jnp.all(jnp.asarray(self.low) <= jnp.asarray(self.high)))
        except jax.errors.ConcretizationTypeError:
            ok = True
        if not ok:
            raise ValueError(f"ZBox: low must be <= high, got low={self.low!r}, high={self.high!r}")

    def __hash__(self) -> int:
        return hash((type(self), self.epsilon, self.zero_bias, _key(self.low), _key(self.high)))

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and self.epsilon == other.epsilon
                and self.zero_bias == other.zero_bias and _key(self.low) == _key(other.low)
                and _key(self.high) == _key(other.high))

    def groups(self, x, y):
        low = jnp.broadcast_to(jnp.asarray(self.low, x.dtype), x.shape)
        high = jnp.broadcast_to(jnp.asarray(self.high, x.dtype), x.shape)
        return [Group(1.0, [x, low, high],
                      lambda L, u: L.lin(u[0]) - L.wpos(u[1]) - L.wneg(u[2]))]


def _key(value: Any) -> Any:
    """A hashable stand-in for a bound (a number, or an array's shape and values)."""
    if isinstance(value, (int, float)):
        return float(value)
    arr = jnp.asarray(value)
    return (arr.shape, str(arr.dtype), tuple(float(v) for v in arr.ravel().tolist()))
