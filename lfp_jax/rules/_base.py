"""The rule protocol: :class:`Rule`, :class:`SiteCall`, :func:`with_backward`, and the stabiliser."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def _same(*arrays: Any) -> bool:
    """Whether the arrays share shape and floating dtype: the helpers below then bind ``lax`` primitives
    directly. ``jnp``'s functions are jitted wrappers whose tracing costs several times more, and these
    helpers run once per site in every backward pass the engine traces (a 48-layer decoder: hundreds)."""
    first = arrays[0]
    return all(isinstance(a, jax.Array) and a.shape == first.shape and a.dtype == first.dtype
               for a in arrays) and jnp.issubdtype(first.dtype, jnp.floating)


def _scalar(x: Array, value: float) -> np.ndarray:
    """``value`` as a 0-d constant of ``x``'s dtype (``lax``'s binary operations broadcast it)."""
    return np.array(value, x.dtype)


_NARROW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def widened(fn: Callable[..., Array]) -> Callable[..., Array]:
    """``fn`` evaluated in float32 where its array arguments are bfloat16 or float16 (their result type
    is), its result rounded once to that type.

    The stabilisers are chains of elementwise operations; evaluated in a 16-bit type each intermediate
    is rounded (and on a CPU, which has no 16-bit arithmetic, converted to float32 and back around every
    operation). Rounding once is the more accurate value, and XLA fuses the chain into one pass."""

    @functools.wraps(fn)
    def wide(*args: Any, **kwargs: Any) -> Array:
        arrays = [a for a in args if isinstance(a, jax.Array)]
        dtype = jnp.result_type(*arrays) if arrays else None
        if dtype not in _NARROW:
            return fn(*args, **kwargs)
        args = tuple(lax.convert_element_type(a, jnp.float32) if isinstance(a, jax.Array) else a
                     for a in args)
        return lax.convert_element_type(fn(*args, **kwargs), dtype)

    return wide


def stabilize(z: Array, epsilon: float) -> Array:
    r"""The ε stabiliser ``z + ε·sign(z)`` with ``sign(0) = +1`` (so it is never zero for ε > 0)."""
    if _same(z):
        return lax.add(z, lax.select(lax.ge(z, _scalar(z, 0)), lax.full_like(z, epsilon),
                                     lax.full_like(z, -epsilon)))
    return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


def _check_epsilon(rule: Any) -> None:
    """A rule's ``epsilon`` field (where it has one) must be a finite number ``>= 0`` or ``None``: a NaN
    or infinite stabiliser turns every share into NaN or 0, a negative one can cancel ``z`` exactly."""
    if not any(f.name == "epsilon" for f in dataclasses.fields(rule)):
        return
    eps = rule.epsilon
    if eps is None:
        return
    name = type(rule).__name__
    if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}: epsilon must be a Python number (finite, >= 0), got {eps!r} "
                        f"({type(eps).__name__}); it is a static setting of the rule, not an array")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name}: epsilon must be finite and >= 0, got {eps!r} (0 is LRP-0: plain "
                         f"shares, 0 where a unit is silent)")


@widened
def stable_divide(a: Array, z: Array, epsilon: float) -> Array:
    r"""``a / (z + ε·sign(z))``; for ``ε = 0`` the plain ``a / z``, 0 where ``z = 0`` (LRP-0: no NaN where
    a unit is silent)."""
    if epsilon == 0:
        return safe_divide(a, z)
    if _same(a, z):
        return lax.div(a, stabilize(z, epsilon))
    return a / stabilize(z, epsilon)


_CLAMP = 2.0 ** 64


@widened
def stabilizer_factor(c: Array, y: Array, epsilon: float) -> Array:
    r"""``c ⊙ y / (y + ε·sign(y))``: the ε factor of a block output ``y``.

    Since ``y`` and ``ε·sign(y)`` have the same sign this is ``c ⊙ |y| / (|y| + ε)``; it is evaluated
    with ``a = min(|y|, 2⁶⁴)``,

    .. math:: c \odot a \,/\, (a + ε),

    the same number wherever ``|y| ≤ 2⁶⁴`` and its limit ``c`` (to rounding) beyond, infinite ``y``
    included (the softmax rule gives masked ``-inf`` scores 0 itself). The form needs no selection
    and starts from ``c``, so XLA fuses it into one backward pass and has no ``y``-only part to
    compute ahead in the forward pass and keep. 0 at ``y = 0``; a NaN ``y`` gives NaN, as in
    ``jax.grad``. (``c ⊙ a`` overflows float32 only for ``|c| > 10¹⁹``.) For ``ε = 0`` the factor
    is 1 where ``y ≠ 0`` and 0 where ``y = 0`` (LRP-0)."""
    if not _same(c, y):
        if epsilon == 0:
            return jnp.where(y == 0, 0, jnp.where(jnp.isnan(y), y, c)).astype(jnp.result_type(c, y))
        a = jnp.minimum(jnp.abs(y), _CLAMP)
        return c * a / (a + epsilon)
    if epsilon == 0:
        return lax.select(lax.eq(y, _scalar(y, 0)), lax.full_like(c, 0), lax.select(lax.ne(y, y), y, c))
    a = lax.min(lax.abs(y), _scalar(y, _CLAMP))
    return lax.div(lax.mul(c, a), lax.add(a, _scalar(a, epsilon)))


def output_share(r: Array, y: Array, epsilon: float | None) -> Array:
    r"""The normalised reward ``c = R / (y + ε·sign(y))`` at a block output ``y`` (``R / y`` for ``ε =
    None``, 0 where ``y = 0``), finite wherever ``R`` and ``y`` are: 0 at infinite ``y`` (masked
    attention scores are ``-inf``) and, in float16, at ``y = 0``, where ``R / ε`` would overflow (ε = 1e-6
    is below float16's smallest normal number) while ``R = y ⊙ c`` is 0 whatever ``c`` is. A NaN ``y``
    gives NaN, as in ``jax.grad``: NaN is never hidden."""
    if epsilon is None:
        return safe_divide(r, y)
    keep = ~jnp.isinf(y) & (y != 0) if y.dtype == jnp.float16 else ~jnp.isinf(y)
    safe = jnp.where(keep, y, 1)
    return jnp.where(keep, stable_divide(r, safe, epsilon), 0)


class _Absolute:
    """The marker :data:`ABSOLUTE`."""

    def __repr__(self) -> str:
        return "ABSOLUTE"

    def __reduce__(self):
        return "ABSOLUTE"


ABSOLUTE = _Absolute()
"""``output_epsilon`` of a rule whose output takes reward as is, ``R``, not normalised by its value
(spiking rules, and the classic LRP rules of :mod:`lfp_jax.rules.lrp`, which stabilise their own ``z``).

Spikes are 0 or 1, so the normalised form ``c = R / y`` cannot hold reward on a silent neuron; a
spiking rule's output therefore receives ``R`` itself: at a model output the seed is the reward, and
where the spikes enter another layer the engine converts that layer's ``c`` to ``R = y ⊙ c``.
"""


@widened
def safe_divide(a: Array, z: Array) -> Array:
    """``a / z`` where ``z != 0`` and 0 where ``z == 0`` (no NaN or overflow in any dtype).

    Converting a reward ``R`` back to the normalised form ``c = R / x`` at a value that is exactly 0
    loses that reward (``R = x ⊙ c`` is 0 there whatever ``c`` is); this keeps the loss finite.
    """
    if _same(a, z):
        nonzero = lax.ne(z, _scalar(z, 0))
        return lax.select(nonzero, lax.div(a, lax.select(nonzero, z, lax.full_like(z, 1))),
                          lax.full_like(a, 0))
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
      detached: ``detached(names)`` is a function like ``fn`` in which the outputs of the site's
        primitives named in ``names`` are constants for differentiation (``stop_gradient``), e.g.
        ``{"rsqrt", "sqrt"}`` for a normalisation with ``1/σ`` held constant.
      stages: ``stages(k) -> (head, tail)`` splits the site after its first ``k`` primitives:
        ``head(*operands)`` is the output of primitive ``k − 1``, ``tail(value, *operands)`` the site's
        output with that value in its place (a linear layer and the affine operations after it).
      relevance_output: the cotangent at the site's output is the relevance ``R`` itself, not ``c``
        (the site feeds a rule that hands ``R``; only for rules with :attr:`Rule.accepts_relevance`).
      carriers: an embedding site's token-id carriers, one per operand (``None`` for operands that
        are no token ids): float arrays whose cotangents are the tokens' relevance (see
        :mod:`lfp_jax._embedding`); ``None`` when no id input's relevance is asked for.
    """

    site: Any
    fn: Callable[..., tuple]
    carries_reward: tuple[bool, ...]
    input_epsilon: float | None
    detached: Callable[[frozenset[str]], Callable[..., tuple]] | None = None
    stages: Callable[[int], tuple[Callable, Callable]] | None = None
    relevance_output: bool = False
    carriers: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of all rules: the exact VJP of the site, no stabiliser.

    Subclasses override :meth:`__call__` (and usually wrap ``call.fn`` in a ``jax.custom_vjp``) and
    :attr:`output_epsilon`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()
    absorbs_input_epsilon: ClassVar[bool] = False
    """Whether the rule applies the ε of the block feeding its first operand itself (it reads
    ``SiteCall.input_epsilon``) instead of the engine placing a stabiliser on that edge. Activation
    sites always get it this way; other kinds (softmax) when their rule says so."""
    merges_affine_tail: ClassVar[bool] = False
    """Whether a linear site given this rule extends over the elementwise affine operations that follow
    it (``+ b``, an eval-mode BatchNorm's shift and scale), so that the rule sees the merged layer."""
    returns_relevance: ClassVar[bool] = False
    """Whether the rule hands the relevance ``R`` itself (not ``c``) to its reward-carrying operands:
    relevance at values that are exactly 0 is then kept (flat, w², z^B give it by design). The engine
    converts it where the producer of the operand needs ``c``."""
    accepts_relevance: ClassVar[bool] = False
    """Whether the rule (of an activation) can take ``R`` itself at its output
    (``SiteCall.relevance_output``)."""
    conservative: ClassVar[bool] = False
    """Whether the rule conserves relevance up to biases and stabilisers (checked by
    :func:`lfp_jax.conservation` in strict mode)."""

    def __post_init__(self) -> None:
        _check_epsilon(self)

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
    ``c_x`` (``R_x`` itself for rules with :attr:`Rule.returns_relevance`; ``ct`` is then ``R_y``
    where the rule's output is :data:`ABSOLUTE`); for parameter operands (weights) it is ``c_W`` with
    feedback ``|W| ⊙ c_W``; ``None`` means zero (and is required for integer operands). Anything the
    rule needs (modified forward passes, state such as a membrane potential) is computed inside
    ``backward`` from saved values.
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
