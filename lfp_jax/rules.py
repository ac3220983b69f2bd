r"""Feedback rules: how reward crosses one site of a model.

The engine carries the *normalised reward* ``c`` backwards instead of the reward ``R`` itself, with
``R = value ⊙ c`` at every value. In this form the LFP-ε rule of a layer ``y = f(x; θ)``,

.. math::

    s = \frac{R_y}{y + \varepsilon\,\mathrm{sign}(y)}, \qquad
    R_x = x \odot J_x^\top s, \qquad F_\theta = |\theta| \odot J_\theta^\top s,

is exactly the ordinary vector-Jacobian product ``c_x = J_xᵀ c_y`` plus a factor ``y / stab(y)`` at the
block output, so most sites run at the cost of a gradient. Every rule is a small frozen dataclass
(hashable, hence static under ``jax.jit``). A rule is called with a :class:`SiteCall` and the site's
operands and returns the site's outputs; rules that change the backward pass wrap the site in a
``jax.custom_vjp`` whose backward works in the ``c`` form above: it receives the cotangent ``c_y`` of the
site output and returns ``c`` for every operand (``None`` for operands that carry no reward).

Rules and where they apply (site kinds are listed in :mod:`lfp_jax.sites`):

====================  ======================  ===============================================
rule                  site kinds              backward
====================  ======================  ===============================================
:class:`Epsilon`      linear, sum, pool,      ε rule (the LFP default); exact Jacobian of the
                      normalization           block, ``y/stab(y)`` at its output
:class:`Identity`     activation              ``R_x = R_y``:  ``c_x = c_y · φ(x) / stab(x)``
:class:`Gradient`     any                     the plain VJP (explicit opt-in, never a default)
:class:`WinnerTakeAll` max_pool, max          reward to the arg-max / the larger operand
:class:`Dropout`      dropout                 the reference's VJP on ``R`` (rescales by 1/(1-p)),
                                              or the conservative ``R_x = mask ⊙ R_y``
:class:`SpikingEpsilon` spiking (LIF step)   membrane-based normaliser, reward handed to the
                                              previous membrane, Heaviside bypassed
:class:`ZPlus`,       linear                  classic LRP rules as *terms* of a modified
:class:`Gamma`,                               forward pass (see :class:`LinearRule`)
:class:`AlphaBeta`,
:class:`Flat`,
:class:`WSquare`,
:class:`ZBox`
====================  ======================  ===============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


def stabilize(z: Array, epsilon: float) -> Array:
    r"""The ε stabiliser ``z + ε·sign(z)`` with ``sign(0) = +1`` (so it is never zero for ε > 0)."""
    return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


class _Absolute:
    """The marker :data:`ABSOLUTE`."""

    def __repr__(self) -> str:
        return "ABSOLUTE"

    def __reduce__(self):
        return "ABSOLUTE"


ABSOLUTE = _Absolute()
"""``output_epsilon`` of a rule whose output takes reward as is, ``R``, not normalised by its value.

Spikes are 0 or 1, so the normalised form ``c = R / y`` cannot hold reward on a silent neuron; a
spiking rule's output therefore receives ``R`` itself: at a model output the seed is the reward, and
where the spikes enter another layer the engine converts that layer's ``c`` to ``R = y ⊙ c``.
"""


def safe_divide(a: Array, z: Array) -> Array:
    """``a / z`` where ``z != 0`` and 0 where ``z == 0`` (no NaN or overflow in any dtype).

    Converting a reward ``R`` back to the normalised form ``c = R / x`` at a value that is exactly 0
    loses that reward (``R = x ⊙ c`` is 0 there whatever ``c`` is); this keeps the loss finite.
    """
    nonzero = z != 0
    return jnp.where(nonzero, a / jnp.where(nonzero, z, 1), 0).astype(jnp.result_type(a, z))


class SiteCall(NamedTuple):
    """What a rule sees of the site it is applied to.

    Attributes:
      site: the :class:`lfp_jax.sites.Site` (kind, label, source line, ...).
      fn: evaluates the site: ``fn(*operands) -> tuple`` of outputs; the first output carries reward,
        any further outputs are side values used elsewhere (e.g. batch statistics kept for later).
      carries_reward: per operand, whether reward flows into it (input-dependent floating point).
      input_epsilon: ε of the block whose output feeds the site and is stabilised there (activation
        rules); ``None`` when the input is no pending block output (a model input, an activation
        output, or a value already stabilised), so the rule must not stabilise it again.
    """

    site: Any
    fn: Callable[..., tuple]
    carries_reward: tuple[bool, ...]
    input_epsilon: float | None


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of all rules: the exact VJP of the site, no stabiliser.

    Subclasses override :meth:`__call__` (and usually wrap ``call.fn`` in a ``jax.custom_vjp``) and
    :attr:`output_epsilon`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()

    @property
    def output_epsilon(self) -> float | None:
        """ε of the stabiliser the engine applies at the output of the block this rule owns."""
        return None

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        return call.fn(*operands)


def with_backward(call: SiteCall, operands: Sequence[Array], backward: Callable, *,
                  recompute: bool = False) -> tuple:
    """Evaluate a site with a custom backward pass: the building block of site-local rules.

    ``backward(operands, outputs, ct)`` receives the site's operands and outputs (saved from the
    forward pass) and the normalised reward ``c_y`` at its first output, and returns one cotangent
    per operand in the normalised form (``R = value ⊙ c``). For reward-carrying operands this is
    ``c_x``; for parameter operands (weights) it is ``c_W`` with feedback ``|W| ⊙ c_W``; ``None``
    means zero (and is required for integer operands). Anything the rule needs (modified forward
    passes, state such as a membrane potential) is computed inside ``backward`` from saved values.
    With ``recompute=True`` only the operands are kept for the backward pass and the outputs are
    evaluated again there (cheap elementwise sites: one stored array and one memory pass less).
    """

    @jax.custom_vjp
    def site(*ops):
        return tuple(call.fn(*ops))

    def fwd(*ops):
        outs = tuple(call.fn(*ops))
        return outs, (ops, None if recompute else outs)

    def bwd(res, cts):
        ops, outs = res
        if recompute:
            outs = tuple(call.fn(*ops))
        grads = backward(ops, outs, cts[0])
        return tuple(
            g if (g is not None and jnp.issubdtype(jnp.result_type(op), jnp.inexact)) else None
            for g, op in zip(grads, ops)
        )

    site.defvjp(fwd, bwd)
    return site(*operands)


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

    @property
    def output_epsilon(self) -> float:
        return self.epsilon


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

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        eps = call.input_epsilon if self.epsilon is None else self.epsilon

        def backward(ops, outs, ct):
            x, y = ops[0], outs[0]
            c_x = safe_divide(ct * y, x) if eps is None else ct * y / stabilize(x, eps)
            return [c_x] + [None] * (len(ops) - 1)

        return with_backward(call, operands, backward, recompute=True)


@dataclasses.dataclass(frozen=True)
class Gradient(Rule):
    """The plain vector-Jacobian product: at this site LFP behaves like gradient descent.

    Never chosen by a preset: a user who wants it names it in a composite.
    """

    kinds: ClassVar[frozenset[str]] = frozenset(
        {"linear", "sum", "pool", "normalization", "activation", "max_pool", "max", "dropout",
         "softmax", "bilinear", "nonlinear", "spiking"}
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


@dataclasses.dataclass(frozen=True)
class SpikingEpsilon(Rule):
    r"""LFP for a LIF neuron step (the reference's spiking rule); see :mod:`lfp_jax.nn.spiking`.

    At one time step, with current ``I_t`` (from the parameterised layer before the neuron), membrane
    ``u_t`` before and ``u_{t+1}`` after the step, and the reset ``ρ_t = H(u_t - ϑ)``:

    .. math::

        R &= R_{\text{spikes}} + R_{u_{t+1}} \quad\text{(reward on the spikes, plus the reward that
             step } t+1 \text{ handed back to this membrane)}\\
        s &= R \,/\, \mathrm{stab}\big(|u_t| + |u_{t+1} + ρ_t ϑ - u_t|\big),\qquad
        R_{u_t} = u_t ⊙ β s,\qquad c_{I_t} = s .

    The spike's Heaviside is bypassed (reward on a spike counts as reward on the membrane) and the reset
    is not differentiated. ``c_{I_t} = s`` goes on into the layer that produced the current, whose own
    VJP then gives the feedback ``|θ| ⊙ J_θᵀ s`` and the input reward ``x ⊙ J_xᵀ s``: the ε of that
    layer is replaced by this membrane-based normaliser. Over a ``lax.scan`` in time, feedback of the
    same parameters adds up over steps (and over the batch).

    With ``normalizer="epsilon"`` the neuron step is treated as a plain LFP-ε block instead (for
    comparison): ``s = R / (u_{t+1} + ε·sign(u_{t+1}))``, the ε rule of ``u_{t+1} = β u_t + I_t − ρ_t ϑ``
    with the reset as a constant bias.

    Args:
      epsilon: the stabiliser of the denominator (``"membrane"``: the denominator is ``>= 0`` and
        ``stab(d) = d + ε``).
      normalizer: ``"membrane"`` (the reference) or ``"epsilon"``.
    """

    epsilon: float = 1e-6
    normalizer: str = "membrane"
    kinds: ClassVar[frozenset[str]] = frozenset({"spiking"})

    def __post_init__(self):
        if self.normalizer not in ("membrane", "epsilon"):
            raise ValueError(f"SpikingEpsilon: normalizer must be 'membrane' or 'epsilon', got "
                             f"{self.normalizer!r}")

    @property
    def output_epsilon(self):
        return ABSOLUTE

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        site = call.site
        if site.operand_positions is None or sorted(site.operand_positions) != [0, 1]:
            raise ValueError(f"SpikingEpsilon needs a lif_step site with a current and a membrane operand, "
                             f"got the {site.kind!r} site ({site.label}) at {site.source_line}")
        params = site.params[0]
        beta, threshold = params["beta"], params["threshold"]
        i_cur, i_mem = site.operand_positions.index(0), site.operand_positions.index(1)
        outs_at = {p: k for k, p in enumerate(site.output_positions)}  # primitive output -> output
        eps, membrane_form = self.epsilon, self.normalizer == "membrane"
        normalized = site.normalized_output  # the engine left converting c to R = spikes ⊙ c to us

        def _in_order(current, membrane):
            ops = [None, None]
            ops[i_cur], ops[i_mem] = current, membrane
            return ops

        @jax.custom_vjp
        def step(*ops):
            return tuple(call.fn(*ops))

        def fwd(*ops):
            # keep the membrane and the current (a constant current, as in direct encoding, is then
            # one array for all steps) and recompute the new membrane in the backward pass
            return tuple(call.fn(*ops)), (ops[i_mem], ops[i_cur])

        def bwd(res, cts):
            membrane, current = res
            reset = (membrane > threshold).astype(current.dtype) * threshold
            new = beta * membrane + current - reset
            reward = jnp.zeros_like(new)
            if 0 in outs_at:  # reward on the spikes: absolute (ABSOLUTE), or c with R = spikes ⊙ c
                ct = cts[outs_at[0]]
                if normalized:  # the spikes again, by the same primitive as in the forward pass
                    ct = ct * call.fn(*_in_order(current, membrane))[0]
                reward = reward + ct
            if 1 in outs_at:
                reward = reward + new * cts[outs_at[1]]  # handed back from step t+1 (normalised)
            if membrane_form:
                s = reward / (jnp.abs(membrane) + jnp.abs(new + reset - membrane) + eps)
            else:
                s = reward / stabilize(new, eps)
            grads: list = [None, None]
            grads[i_cur] = s
            grads[i_mem] = (beta * s).astype(membrane.dtype)
            return tuple(grads)

        step.defvjp(fwd, bwd)
        return step(*operands)


# --- classic LRP rules on linear sites -------------------------------------------------------------


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
