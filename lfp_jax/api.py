r"""The LFP transformations: :func:`lfp_vjp`, :func:`lfp_value_and_feedback`, :func:`lfp_grad`.

LFP (Weber et al., *Efficient and Flexible Neural Network Training through Layer-wise Feedback
Propagation*, TMLR 2025) distributes a reward ``r`` given at the model outputs ``z`` backwards with LRP
rules. The seed is ``r / (z + ε·sign(z))`` (ε of the layer producing ``z``); each parameter ``θ``
receives the feedback

.. math::  F_\theta = |\theta| \odot J_\theta^\top s

summed over the batch, where ``s`` is the normalised reward reaching its layer. Positive feedback
strengthens a parameter, so ``θ ← θ + η·F`` (``lfp_grad`` returns ``-F`` for optax minimisers). For ReLU
networks with the softmax-loss reward and ε → 0 the feedback equals ``-|θ| ⊙ ∇_θ Σ_batch CE``
(Theorem 1 of the paper).

A parameter used through a computation of parameters only, ``W = h(θ)`` (weight normalisation, a
``softplus``/``exp`` reparameterisation, a tied ``Wᵀ``), receives its feedback by the chain rule from
``θ`` to its uses:

.. math::  F_\theta = |\theta| \odot \sum_{\text{uses}} (\partial h / \partial \theta)^\top c_W,

with ``c_W = J_Wᵀ s`` the normalised reward at the use; ``F_θ = |θ| ⊙ J_θᵀ s`` then holds with the
Jacobian of the whole map from ``θ`` to the layer output, and Theorem 1 carries over to reparameterised
ReLU networks. :func:`describe` lists such parameters.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lfp_jax import _graph, sites
from lfp_jax.composites import Composite, _show, check_composite, lfp_epsilon, unmatched
from lfp_jax.errors import (
    FrozenParameterError,
    FrozenParameterWarning,
    LFPError,
    NoRuleError,
    RewardError,
    UnmatchedRuleWarning,
)
from lfp_jax.interpreter import evaluate
from lfp_jax.rules import ABSOLUTE
from lfp_jax.rules._base import output_share

Array = jax.Array


def _as_argnums(value: Any, name: str, n: int | None = None) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple, checked against ``n`` positional arguments
    (negative numbers count from the end, as in ``jax.grad``; out of range is an error, never wrapped)."""
    def is_index(k):
        return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))

    if is_index(value):
        nums = (int(value),)
    elif isinstance(value, (tuple, list)) and all(is_index(k) for k in value):
        nums = tuple(int(k) for k in value)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints (argument positions), got {value!r} "
                        f"({type(value).__name__})")
    if n is not None:
        bad = [k for k in nums if not -n <= k < n]
        if bad:
            raise ValueError(f"{name}={value!r} does not fit a call with {n} positional arguments: "
                             f"position{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
                             f"{'are' if len(bad) > 1 else 'is'} out of range (valid: {-n} to {n - 1})")
    if len(set(k % n for k in nums) if n else set(nums)) != len(nums):
        raise ValueError(f"{name}={value!r} names an argument twice")
    return nums


def _argnums_tuple(argnums: int | Sequence[int], n: int, allow_empty: bool = False) -> tuple[int, ...]:
    nums = _as_argnums(argnums, "argnums", n)
    if not nums and not allow_empty:
        raise ValueError("argnums must name at least one argument holding parameters")
    return tuple(sorted(k % n for k in nums))


def _input_argnums(input_argnums, n: int, argnums: tuple[int, ...]) -> tuple[int, ...] | None:
    if input_argnums is None:
        return None
    nums = tuple(sorted({k % n for k in _as_argnums(input_argnums, "input_argnums", n)}))
    if set(nums) & set(argnums):
        raise ValueError(f"input_argnums={input_argnums!r} and argnums={argnums!r} overlap: an argument "
                         f"holds either parameters or inputs")
    return nums


def _is_array(leaf: Any) -> bool:
    """Leaves that are traced: arrays (JAX, NumPy). Anything else (an equinox module's activation
    function, a pooling layer's Python ``-inf``, a dropout flag) is a static part of the model and is
    closed over, as ``equinox.filter_jit`` does."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or hasattr(leaf, "__jax_array__")


def _path_name(path) -> str:
    """``layers/0/linear/kernel`` for a pytree key path (nnx's trailing ``.value`` dropped)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


class _Traced:
    """``fun`` traced once for given primals: graph, plan, and where every leaf goes."""

    def __init__(self, fun, primals, composite, argnums, has_aux, input_argnums=None,
                 positions=None, strict=True):
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        self.argnums = _argnums_tuple(argnums, len(primals), allow_empty=input_argnums is not None)
        self.input_argnums = _input_argnums(input_argnums, len(primals), self.argnums)
        self.positions = list(positions) if positions is not None else list(range(len(primals)))
        all_leaves, self.in_tree = jtu.tree_flatten(primals)
        self.all_leaves = all_leaves
        self.traced = [k for k, leaf in enumerate(all_leaves) if _is_array(leaf)]
        self.leaves = [all_leaves[k] for k in self.traced]
        owner = []  # primal index of each leaf
        for k, p in enumerate(primals):
            owner += [k] * len(jtu.tree_leaves(p))
        self.owner = [owner[k] for k in self.traced]
        paths = _leaf_paths(primals)
        self.paths = [paths[k] for k in self.traced]
        self.is_param = [k in self.argnums for k in self.owner]
        avals = [jax.typeof(x) for x in self.leaves]
        for leaf_aval, param, path in zip(avals, self.is_param, self.paths):
            if param and not _graph.is_float(leaf_aval):
                raise LFPError(
                    f"parameter leaf {path} has dtype {leaf_aval.dtype}: LFP feedback is defined for "
                    f"floating-point parameters only. Pass integer or key state through an argument "
                    f"that is not in argnums={self.argnums}."
                )

        def flat_fun(*leaves):
            full = list(all_leaves)
            for k, v in zip(self.traced, leaves):
                full[k] = v
            return fun(*jtu.tree_unflatten(self.in_tree, full))

        closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*self.leaves)
        if has_aux:
            if not (isinstance(out_shape, tuple) and len(out_shape) == 2):
                raise LFPError("has_aux=True needs fun to return a pair (outputs, aux)")
            self.out_tree = jtu.tree_structure(out_shape[0])
            n_primary = self.out_tree.num_leaves
        else:
            self.out_tree = jtu.tree_structure(out_shape)
            n_primary = self.out_tree.num_leaves
        self.full_out_tree = jtu.tree_structure(out_shape)
        self.graph = _graph.build_graph(closed)
        self.is_input = [not p and (self.input_argnums is None or k in self.input_argnums)
                         for p, k in zip(self.is_param, self.owner)]
        self.in_taint = [i and _graph.is_float(a) for i, a in zip(self.is_input, avals)]
        out_avals = [self.graph.aval(o) for o in self.graph.outputs]
        self.primary = [k < n_primary for k in range(len(out_avals))]
        self.float_out = [_graph.is_float(a) for a in out_avals]
        leaf_names = tuple(_path_name(path) or f"<argument {self.positions[k]}>"
                           for path, k in zip(self.key_paths(primals), self.owner))
        self.names = leaf_names
        self.plan = sites.analyse(
            self.graph, self.in_taint, self.primary, composite,
            in_src=[1 << self.positions[k] for k in self.owner],
            # explanations (no parameter arguments): the constant arguments hold the weights, and
            # name the sites for Match(path=...) as parameters do
            in_origin=[(frozenset({j}), frozenset()) if p or (not self.argnums and not i) else None
                       for j, (p, i) in enumerate(zip(self.is_param, self.is_input))],
            leaf_paths=leaf_names)
        self._refuse_mixed_products()
        self._warn_unmatched(composite)
        if strict:
            missing = sites.problems(self.plan)
            if missing:
                raise NoRuleError(_problem_report(self, missing))
        reached = [k for k, o in enumerate(self.graph.outputs)
                   if self.primary[k] and self.float_out[k] and isinstance(o, int)
                   and o in self.plan.tainted]
        if not reached:
            kinds = sorted({str(a.dtype) for a, i in zip(avals, self.is_input) if i})
            raise LFPError(
                "no floating-point input of fun reaches its (floating-point) outputs, so there is "
                f"nothing reward could flow back through (input dtypes: {kinds}"
                + ("" if self.input_argnums is None else f", input_argnums={self.input_argnums}")
                + "). LFP propagates reward to float inputs: pass images/features as floats; for integer "
                "inputs such as token ids, embed them first and pass the embeddings."
            )
        self.diff = [k for k in range(len(self.leaves)) if self.is_param[k] or self.in_taint[k]]

    def _warn_unmatched(self, composite: Composite) -> None:
        """Warn about pairs added to a preset (``with_rules``) that select no site of this model: a
        misspelt path, label or kind would otherwise leave the preset's rule in place unnoticed."""
        all_sites = [site for _, site in sites.iter_sites(self.plan)]
        missing = unmatched(composite, all_sites)
        if not missing:
            return
        paths = sorted({s.path for s in all_sites if s.path})
        labels = sorted({f"{s.kind}/{s.label}" for s in all_sites})
        for match, rule in missing:
            warnings.warn(
                f"{_show(match)} -> {_show(rule)} in composite {composite.name!r} selects no site of "
                f"this model, so it has no effect. The model's sites (kind/label): {', '.join(labels)}"
                + (f"; module paths: {', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}"
                   if paths else "") + ". lfp_jax.describe(fun, *args) shows the table.",
                UnmatchedRuleWarning, stacklevel=_user_stacklevel())

    def _refuse_mixed_products(self) -> None:
        """Without ``input_argnums``, a product of a value computed from the input with one computed
        only from another argument (``(x − mean) · rsqrt(var)`` with running statistics passed in) is
        ambiguous: the argument may be a constant. Such sites get no rule; the error asks which."""
        if self.input_argnums is not None:
            return
        for _, site in sites.iter_sites(self.plan):
            if site.kind == "bilinear" and site.rule is not None and _argument_hint(self, site):
                site.rule, site.problem = None, _MIXED

    def key_paths(self, primals):
        """Key paths of the traced leaves, without the argument's position."""
        flat = jtu.tree_flatten_with_path(primals)[0]
        return [flat[k][0][1:] for k in self.traced]

    def unflatten(self, values: list) -> Any:
        """The primals' structure with ``values`` at traced leaves and ``None`` at static ones."""
        full: list[Any] = [None] * len(self.all_leaves)
        for k, v in zip(self.traced, values):
            full[k] = v
        return jtu.tree_unflatten(self.in_tree, full)

    def argument(self, position: int) -> str:
        """``argument 2 (['batch_stats']['BatchNorm_0']['mean'], ...)``: a user-facing description."""
        local = self.positions.index(position)
        names = [p for p, o in zip(self.names, self.owner) if o == local]
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        return f"argument {position}" + (f" ({shown})" if shown else "")


def _leaf_paths(primals) -> list[str]:
    return [jtu.keystr(path) for path, _ in jtu.tree_flatten_with_path(primals)[0]]


def lfp_vjp(
    fun: Callable,
    *primals: Any,
    composite: Composite | None = None,
    argnums: int | Sequence[int] = 0,
    input_argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    allow_frozen: bool = False,
):
    r"""Evaluate ``fun(*primals)`` and return a function that propagates a reward back through it.

    Like ``jax.vjp``, but the backward pass follows the feedback rules of ``composite`` (default:
    :func:`~lfp_jax.lfp_epsilon`, the reference LFP-ε rules).

    Args:
      fun: any JAX callable, e.g. a linen ``model.apply``, an nnx model call, an equinox model, or
        plain jnp code.
      *primals: its arguments. Floating-point leaves of input arguments (see ``input_argnums``) are
        the inputs reward flows back to; integer leaves (labels, PRNG keys) are constants. Leaves that
        are not arrays (Python numbers, an equinox module's activation function) are static parts
        of ``fun`` and get ``None``.
      composite: which rule at which site; see :mod:`lfp_jax.composites`.
      argnums: position(s) of the argument(s) holding the parameters.
      input_argnums: position(s) of the argument(s) holding the model inputs, which carry reward.
        Every other non-parameter argument is a constant: running statistics passed to a BatchNorm
        in eval mode (``batch_stats``), a padding or attention mask, a dropout mask, an nnx state.
        Default: every argument not in ``argnums`` is an input.
      has_aux: ``fun`` returns ``(outputs, aux)``; only ``outputs`` receive reward.
      allow_frozen: do not warn (:class:`~lfp_jax.errors.FrozenParameterWarning`) about parameter
        arrays that are entirely zero and so can never move (checked only when the parameters are
        concrete, i.e. outside ``jit``; :func:`check_params` raises instead).

    Returns:
      ``(outputs, feedback_fn)`` or ``(outputs, feedback_fn, aux)``. ``feedback_fn(reward)``, with
      ``reward`` shaped like ``outputs``, returns one entry per primal: for parameter arguments the
      feedback ``|θ| ⊙ J_θᵀ s`` (same pytree, summed over the batch); for input arguments the input
      relevance ``x ⊙ c_x``, or ``R`` itself where the input's layer hands it whole (classic rules:
      flat, w², z^B keep relevance at inputs that are 0), ``None`` for integer and static leaves;
      ``None`` for constant arguments.

    Raises:
      NoRuleError: sites that no rule of ``composite`` covers, all of them in one table.
    """
    return _lfp_vjp(fun, primals, composite, argnums, input_argnums, has_aux, allow_frozen, None)


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the user's call, past every lfp_jax frame."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _lfp_vjp(fun, primals, composite, argnums, input_argnums, has_aux, allow_frozen, positions):
    composite = lfp_epsilon() if composite is None else check_composite(composite)
    t = _Traced(fun, primals, composite, argnums, has_aux, input_argnums, positions)
    if not allow_frozen:
        frozen = _frozen(tuple(primals[k] for k in t.argnums))
        if frozen:
            warnings.warn(_frozen_message(frozen), FrozenParameterWarning, stacklevel=_user_stacklevel())

    def f(*diff_leaves):
        full = list(t.leaves)
        for k, v in zip(t.diff, diff_leaves):
            full[k] = v
        outs = evaluate(t.plan, full)
        return [o for o, fl in zip(outs, t.float_out) if fl], outs

    if not any(isinstance(leaf, jax.core.Tracer) for leaf in t.leaves):
        # called eagerly: run the rewritten program compiled (one XLA computation for the forward pass and
        # one for the backward pass) instead of dispatching its operations one by one, which costs
        # several times a compile on anything but the smallest model; under jit/vmap it is inlined anyway
        f = jax.jit(f)
    float_outs, vjp_fn, outs = jax.vjp(f, *[t.leaves[k] for k in t.diff], has_aux=True)
    result = jtu.tree_unflatten(t.full_out_tree, outs)
    outputs, aux = result if has_aux else (result, None)
    constant = [k not in t.argnums and t.input_argnums is not None and k not in t.input_argnums
                for k in range(len(primals))]

    def feedback_fn(reward: Any) -> tuple:
        seeds, _ = _seeds(t, outs, _check_reward(reward, outputs, t.out_tree))
        cts = vjp_fn(seeds)
        result_leaves: list[Any] = [None] * len(t.leaves)
        for k, ct in zip(t.diff, cts):
            x = t.leaves[k]
            if t.is_param[k]:
                result_leaves[k] = jnp.abs(x) * ct
            else:  # an input: R = x ⊙ c, or R itself where the rules handed it (rules.LinearRule)
                result_leaves[k] = ct if k in t.plan.relevance_inputs else x * ct
        per_arg = t.unflatten(result_leaves)
        return tuple(None if c else a for a, c in zip(per_arg, constant))

    if has_aux:
        return outputs, feedback_fn, aux
    return outputs, feedback_fn


def _seeds(t: _Traced, outs: list, r_leaves: list) -> tuple[list, dict]:
    """The cotangents that start the backward pass from the reward leaves ``r_leaves`` (one per primary
    output), and the reward of each float output position that has one."""
    seeds, given, r_iter = [], {}, iter(r_leaves)
    for k, (out, fl) in enumerate(zip(outs, t.float_out)):
        r = next(r_iter) if t.primary[k] else None
        if not fl:
            continue
        if r is None:
            seeds.append(jnp.zeros_like(out))
            continue
        eps = t.plan.output_epsilon.get(k)  # the ε rule of the block producing the output
        r = jax.lax.stop_gradient(jnp.asarray(r, out.dtype))
        given[k] = r
        if eps is ABSOLUTE:  # the output takes the reward itself (see rules.ABSOLUTE)
            seeds.append(r)
        else:
            seeds.append(output_share(r, out, eps))
    return seeds, given


_MIXED = "a product of a value computed from the input with one computed only from another argument"

_OPAQUE_ATTENTION = re.compile(r"cudnn|flash|fused|dot_product_attention|custom_call|mosaic|triton",
                               re.IGNORECASE)

_HINTS = {
    "opaque_attention": (
        "`{label}` is an attention implementation the engine cannot see into (a fused kernel), so "
        "its softmax and products cannot get their rules. Use the XLA implementation: "
        "jax.nn.dot_product_attention(..., implementation='xla'), or Flax's attention modules, which "
        "are written in jnp."),
    "unknown": (
        "lfp_jax has no feedback rule for the primitive `{label}`. If it acts elementwise, moves "
        "values, is linear in its input or selects one input per output, declare it with "
        "lfp_jax.sites.register_primitive({label!r}, 'elementwise' | 'structural' | 'mixing' | "
        "'routing')."),
    "softmax": (
        "a softmax of input-dependent values inside the model, and this composite has no rule for it. "
        "The presets give it AttnLRP's rule: composite.with_rules((Match(kind='softmax', "
        "label='softmax'), rules.SoftmaxTaylor()))."),
    "logsumexp": (
        "a log-softmax or log-sum-exp of input-dependent values inside the model: no LRP rule is "
        "defined for it (AttnLRP's is for the softmax). A log-softmax at the output belongs in the "
        "reward: return the logits; inside the model, use jax.nn.softmax. To accept the plain gradient "
        "here, say so: composite.with_rules((Match(label='logsumexp'), rules.Gradient()))."),
    "bilinear": (
        "a product of input-dependent values (attention scores q·kᵀ, attention weights · values, a "
        "gate such as an LSTM's σ(·) ⊙ tanh(·)), and this composite has no rule for it. The presets "
        "give products AttnLRP's uniform rule: composite.with_rules((Match(kind='bilinear'), "
        "rules.UniformProduct()))."),
    "quotient": (
        "a quotient of two input-dependent values (a normalisation written by hand, a ratio): no LRP "
        "rule splits reward between a numerator and a denominator. A normalisation by a reduced "
        "standard deviation or norm (sqrt/rsqrt of a sum) is recognised as one; otherwise hold the "
        "denominator constant with jax.lax.stop_gradient, or opt in to the plain gradient: "
        "composite.with_rules((Match(kind='quotient'), rules.Gradient()))."),
    "bool_to_float": (
        "a float made from a comparison (or another boolean or integer) of input-dependent values that "
        "was reshaped, broadcast, stacked by a loop or combined with an index before its conversion. "
        "A comparison converted to float is a step activation only where the conversion follows the "
        "comparison: convert where you compare ((h > 0).astype(h.dtype), inside a scan body before "
        "the values are stacked), apply boolean masks with jnp.where, or use lfp_jax.nn.lif_step for "
        "spiking neurons."),
    "nonlinear": (
        "input-dependent values combined in a way no rule covers: neither an activation of one value, "
        "a normalisation, a softmax, a product of values nor a max of two values. A Gradient rule "
        "(Match(kind='nonlinear')) would give the whole region the plain gradient, every layer among "
        "its primitives included; rewriting the computation is usually better."),
}


def _problem_report(t: _Traced, missing: list) -> str:
    """One error for every site without a rule: a table like describe's, then one hint per kind."""
    rows = [(str(n), s.kind, s.label, s.path or "-", _prims(s), _short_source(s.source_line))
            for n, s in enumerate(missing)]
    lines = [f"lfp_jax has no feedback rule for {len(missing)} site{'s' * (len(missing) != 1)} of this "
             f"model (LFP never falls back to the plain gradient silently):"]
    lines += _table([("", "kind", "label", "module", "primitives", "source")] + rows,
                    (4, 14, 14, 34, 22, 36))
    hints: dict[str, list[int]] = {}
    for n, site in enumerate(missing):
        if "only applies" in (site.problem or ""):  # a rule the composite chose for the wrong kind
            hint = site.problem
        elif site.problem == _MIXED:
            hint = (_MIXED + ". If that argument is an input too, say so with input_argnums (then the "
                    "product gets AttnLRP's rule).")
        elif site.kind == "unknown" and _OPAQUE_ATTENTION.search(site.label):
            hint = _HINTS["opaque_attention"].format(label=site.label)
        else:
            hint = _HINTS.get(site.label, _HINTS.get(site.kind, site.problem or "")).format(
                label=site.label)
        hint = hint + site.hint + _argument_hint(t, site)
        hints.setdefault(hint, []).append(n)
    for hint, ns in hints.items():
        kind = missing[ns[0]].kind
        which = ("site " if len(ns) == 1 else "sites ") + ", ".join(map(str, ns))
        lines.append(f"{which} ({kind}): {hint}")
    return "\n".join(lines)


def _argument_hint(t: _Traced, site) -> str:
    """When the model's arguments are all inputs by default and a refused site depends on an
    argument that may be a constant (running statistics, a mask), say how to declare the inputs."""
    if t.input_argnums is not None or not site.sources:
        return ""
    inputs = sorted({t.positions[k] for k, i in zip(t.owner, t.in_taint) if i})
    if len(inputs) < 2:
        return ""

    def args(mask):
        return [p for p in inputs if mask >> p & 1]

    per_operand = [args(m) for m in site.sources]
    first = inputs[0]
    suspects = sorted({p for ops in per_operand if first not in ops for p in ops})
    if not suspects:
        return ""
    keep = tuple(p for p in inputs if p not in suspects)
    what = "; ".join(t.argument(p) for p in suspects)
    return (f" One of its values depends only on {what}. If that argument is a constant (running "
            f"statistics, a mask), name the arguments that carry reward: input_argnums={keep!r}.")


def _check_reward(reward: Any, outputs: Any, out_tree) -> list[Any]:
    r_leaves, r_tree = jtu.tree_flatten(reward)
    if r_tree != out_tree:
        raise RewardError(
            f"the reward must have the structure of the model outputs: got {r_tree}, expected "
            f"{out_tree}. reward_fn(outputs) should return one array per output array."
        )
    for r, o in zip(r_leaves, jtu.tree_leaves(outputs)):
        shape = jnp.shape(r)
        if shape != o.shape:
            raise RewardError(
                f"reward shape {shape} does not match output shape {o.shape}: the reward is given "
                f"per output value (e.g. per sample and class for logits of shape (batch, classes))."
            )
        dtype = jnp.result_type(r)
        if not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
            raise RewardError(f"reward dtype {dtype} is not numeric")
    return r_leaves


def frozen_parameters(params: Any) -> list[str]:
    """Paths of the floating-point arrays in ``params`` that are entirely zero (traced ones skipped)."""
    return [path for path, _ in _frozen(params)]


def _frozen(params: Any) -> list[tuple[str, str]]:
    """``(path, what)`` of every all-zero floating-point array; ``what`` says what it is (see
    :func:`_frozen_message`)."""
    from lfp_jax.nn.initializers import _leaf_name, is_norm_scale

    flat = jtu.tree_flatten_with_path(params)[0]
    names = [_leaf_name(path) for path, _ in flat]
    kernels = {n[:-1] for n, (_, leaf) in zip(names, flat) if n and n[-1] == "kernel" and jnp.ndim(leaf) >= 2}
    scales = {n[:-1] for n, (_, leaf) in zip(names, flat) if is_norm_scale(n, leaf)}
    frozen = []
    for name, (path, leaf) in zip(names, flat):
        if isinstance(leaf, jax.core.Tracer) or not _graph.is_float(getattr(leaf, "aval", leaf)):
            continue
        # numpy, not jnp: under jit a jnp comparison of a captured constant would be traced
        if not (leaf.size and not np.any(np.asarray(leaf) != 0)):
            continue
        last, owner = (name[-1] if name else ""), name[:-1]
        if last in ("kernel", "bias") and owner in kernels:
            what = "layer"
        elif is_norm_scale(name, leaf):
            what = "scale"
        elif last in ("bias", "offset") and owner in scales:
            what = "offset"
        else:
            what = "other"
        frozen.append((jtu.keystr(path), what))
    return frozen


_FROZEN_ADVICE = {
    "layer": "Flax initialises biases to zero: params = lfp_jax.nn.torch_init(key, params) gives "
             "kernels and biases PyTorch's U(±1/√fan_in), as in the reference",
    "scale": "a normalisation scale of zero silences its layer (Flax's ResNets start every residual "
             "block's last scale at zero): lfp_jax.nn.torch_init sets all-zero normalisation scales "
             "to 1, PyTorch's default",
    "offset": "normalisation offsets start at 0 in PyTorch and Flax alike, so they stay frozen under "
              "LFP, as in the reference; lfp_jax.nn.torch_init keeps them",
    "other": "give them non-zero initial values (lfp_jax.nn.torch_init covers only Flax kernels and "
             "biases and normalisation scales)",
}


def _frozen_message(frozen: list[tuple[str, str]]) -> str:
    lines = ["parameters that are all exactly zero never change under LFP (feedback is proportional "
             "to |θ|):"]
    for what in ("layer", "scale", "offset", "other"):
        paths = [p for p, w in frozen if w == what]
        if paths:
            lines.append(f"  {', '.join(paths)}: {_FROZEN_ADVICE[what]}.")
    lines.append("Pass allow_frozen=True where freezing is intended.")
    return "\n".join(lines)


def check_params(params: Any) -> None:
    """Raise :class:`~lfp_jax.errors.FrozenParameterError` if a parameter array is entirely zero.

    LFP feedback is ``|θ| ⊙ (...)``, so such arrays never move (Flax initialises biases to zero; use
    :func:`lfp_jax.nn.torch_init`). Traced values are skipped (call this once outside ``jit``).
    """
    frozen = _frozen(params)
    if frozen:
        raise FrozenParameterError(_frozen_message(frozen))


def _split_args(args, argnums, reward_argnums, input_argnums):
    """``fun``'s arguments, the reward's, and the argument numbers in ``fun``'s positions."""
    n = len(args)
    _as_argnums(reward_argnums, "reward_argnums", n)
    reward_set = {k % n for k in reward_argnums}
    fun_args = [a for i, a in enumerate(args) if i not in reward_set]
    reward_args = [args[i % n] for i in reward_argnums]
    mapping = [i for i in range(n) if i not in reward_set]

    def to_fun(nums, name):
        single = not isinstance(nums, (tuple, list))
        nums = _as_argnums(nums, name, n)
        for k in nums:
            if k % n in reward_set:
                raise ValueError(f"{name} {nums} and reward_argnums {tuple(reward_argnums)} overlap")
        fun_nums = tuple(mapping.index(k % n) for k in nums)
        return fun_nums[0] if single else fun_nums

    inputs = None if input_argnums is None else to_fun(input_argnums, "input_argnums")
    return fun_args, reward_args, to_fun(argnums, "argnums"), inputs, mapping


def lfp_value_and_feedback(
    fun: Callable,
    reward_fn: Callable,
    *,
    composite: Composite | None = None,
    argnums: int | Sequence[int] = 0,
    input_argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    reward_argnums: Sequence[int] = (),
    allow_frozen: bool = False,
) -> Callable:
    r"""LFP's ``jax.value_and_grad``: ``g(*args) -> (outputs, feedback)``.

    ``reward = reward_fn(outputs, *reward_args)`` is computed from the outputs (and treated as a
    constant); a reward needing labels can be a closure, or the labels can be passed through
    ``reward_argnums``::

        fun = lambda p, x: model.apply({"params": p}, x)
        g = lfp_value_and_feedback(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))
        logits, feedback = g(params, images, labels)   # fun(params, images); reward_fn(logits, labels)
        params = jax.tree.map(lambda p, f: p + lr * f, params, feedback)

    Constants passed as arguments (running statistics, masks) are declared by naming the inputs::

        fun = lambda p, x, stats: net.apply({"params": p, "batch_stats": stats}, x)
        g = lfp_value_and_feedback(fun, rewards.softmax_loss, input_argnums=(1,), reward_argnums=(3,))
        variables = net.init(key, images)            # {"params": ..., "batch_stats": ...}
        logits, feedback = g(variables["params"], images, variables["batch_stats"], labels)

    Args:
      fun: the model; ``fun(*args)`` with the reward arguments removed.
      reward_fn: ``reward_fn(outputs, *reward_args) -> reward`` with the structure of ``outputs``.
      composite, has_aux, allow_frozen: as in :func:`lfp_vjp`.
      argnums, input_argnums: as in :func:`lfp_vjp`, counting positions of ``g``'s arguments.
      reward_argnums: positions of ``g``'s arguments passed to ``reward_fn`` instead of ``fun``.

    Returns:
      ``g`` with ``g(*args) = (outputs, feedback)``, or ``((outputs, aux), feedback)`` with
      ``has_aux``. ``feedback`` has the structure of ``args[argnums]`` (a tuple for several argnums),
      positive = strengthen, summed over the batch.
    """
    reward_argnums = _as_argnums(reward_argnums, "reward_argnums")
    _as_argnums(argnums, "argnums")
    if input_argnums is not None:
        _as_argnums(input_argnums, "input_argnums")

    def g(*args):
        fun_args, reward_args, nums, inputs, mapping = _split_args(args, argnums, reward_argnums,
                                                                   input_argnums)
        res = _lfp_vjp(fun, fun_args, composite, nums, inputs, has_aux, allow_frozen, mapping)
        outputs, feedback_fn = res[0], res[1]
        reward = jax.lax.stop_gradient(reward_fn(outputs, *reward_args))
        per_arg = feedback_fn(reward)
        feedback = per_arg[nums] if isinstance(nums, int) else tuple(per_arg[k] for k in nums)
        value = (outputs, res[2]) if has_aux else outputs
        return value, feedback

    return g


def lfp_value_and_grad(fun: Callable, reward_fn: Callable, **kwargs: Any) -> Callable:
    """Like :func:`lfp_value_and_feedback` but returns ``-feedback``: ``g(*args) -> (outputs, -F)``.

    ``-F`` is what an optax *minimiser* needs: ``updates, state = opt.update(-F, state, params)``.
    """
    vf = lfp_value_and_feedback(fun, reward_fn, **kwargs)

    def g(*args):
        value, feedback = vf(*args)
        return value, jtu.tree_map(jnp.negative, feedback)

    return g


def lfp_grad(fun: Callable, reward_fn: Callable, **kwargs: Any) -> Callable:
    """LFP's ``jax.grad``: ``g(*args) -> -feedback`` (``(-feedback, aux)`` with ``has_aux``).

    Feeding it to any optax minimiser (``optax.sgd``, ``adam``, chains with clipping, schedules,
    weight decay) performs LFP: plain SGD moves parameters by ``+lr · feedback``.
    """
    vg = lfp_value_and_grad(fun, reward_fn, **kwargs)
    has_aux = kwargs.get("has_aux", False)

    def g(*args):
        value, neg_feedback = vg(*args)
        return (neg_feedback, value[1]) if has_aux else neg_feedback

    return g


def lrp(fun: Callable, composite: Composite | None = None, *,
        argnums: int | Sequence[int] = 1) -> Callable:
    r"""LRP explanations: ``g(*args, target=...) -> (outputs, relevance)``, one backward pass.

    The relevance of the inputs ``args[argnums]`` for the output relevance ``target`` under the rules
    of ``composite`` (default :func:`~lfp_jax.composites.attn_lrp`): ``R_x = x ⊙ c_x``, with ``c``
    carried back from ``c_z = target / (z + ε·sign(z))`` at the outputs ``z``, or the relevance itself
    where the input's layer hands it whole (classic rules such as flat, w², z^B: inputs that are exactly
    0 keep their relevance). Zennit's presets are in :mod:`lfp_jax.composites` (``epsilon_plus``, ...);
    :func:`lfp_jax.conservation` shows where relevance goes, site by site. Every other argument is
    a constant (parameters included: no feedback is computed); ``fun`` may close over its parameters.
    Works under ``jit`` and ``vmap``.

    Args:
      fun: the model.
      composite: which rule at which site.
      argnums: position(s) of the argument(s) to explain (default 1: ``fun(params, x)``).

    Returns:
      ``g``; ``g(*args, target=t)`` returns ``(outputs, relevance)`` with ``relevance`` of the structure
      of ``args[argnums]`` (a tuple for several). ``target`` is either integer class labels, one per
      sample (output relevance ``one_hot(label) ⊙ outputs``, so that under a conservative composite
      ``Σ relevance ≈`` the class logit), or the output relevance itself, shaped like the outputs.

    Example::

        explain = lfp_jax.lrp(lambda p, x: model.apply({"params": p}, x))
        logits, heatmap = jax.jit(explain)(params, images, target=labels)
    """
    from lfp_jax.composites import attn_lrp

    composite = attn_lrp() if composite is None else check_composite(composite)
    single = not isinstance(argnums, (tuple, list))
    nums = _as_argnums(argnums, "argnums")

    def g(*args, target):
        inputs = _input_argnums(nums, len(args), ())
        outputs, relevance_fn = _lfp_vjp(fun, args, composite, (), inputs, False, True, None)
        per_arg = relevance_fn(_output_relevance(outputs, target))
        relevance = tuple(per_arg[k] for k in inputs)
        return outputs, relevance[0] if single else relevance

    return g


def _output_relevance(outputs: Any, target: Any) -> Any:
    """The output relevance of ``lrp``: ``one_hot(labels) ⊙ outputs`` for integer labels, else ``target``."""
    if isinstance(outputs, jax.Array) and jnp.issubdtype(jnp.result_type(target), jnp.integer):
        labels = jnp.asarray(target)
        if labels.shape != outputs.shape[:-1]:
            raise RewardError(
                f"integer targets are class labels, one per output row: expected shape "
                f"{outputs.shape[:-1]} for outputs of shape {outputs.shape}, got {labels.shape}. Pass "
                f"the output relevance itself (an array shaped like the outputs) for anything else.")
        return jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype) * outputs
    return target


def find_sites(fun: Callable, *args: Any, composite: Composite | None = None,
               argnums: int | Sequence[int] = 0, input_argnums: int | Sequence[int] | None = None,
               has_aux: bool = False) -> list[sites.Site]:
    """The sites of ``fun`` at ``args`` (including those inside scan/cond/remat bodies), in order.

    Each :class:`~lfp_jax.sites.Site` has its ``kind``, ``label``, resolved ``rule`` (``None`` where
    the composite has none, with the reason in ``problem``), module ``path``, ``param_paths`` and
    ``source_line``; :func:`describe` prints them as a table.
    """
    composite = lfp_epsilon() if composite is None else check_composite(composite)
    t = _Traced(fun, args, composite, argnums, has_aux, input_argnums, strict=False)
    return [site for _, site in sites.iter_sites(t.plan)]


def describe(fun: Callable, *args: Any, composite: Composite | None = None,
             argnums: int | Sequence[int] = 0, input_argnums: int | Sequence[int] | None = None,
             has_aux: bool = False) -> str:
    """A table of the sites of ``fun`` at ``args``: kind, what it computes, rule, module, source line.

    Sites without a rule are listed with ``-- none --`` and the reason below the table (``lfp_vjp``
    refuses such a model). Long cells wrap onto further lines. Below the table: parameters that reach
    their site through a computation (weight normalisation, a ``softplus``/``exp``
    reparameterisation, a transposed copy) and parameters used by several sites; their feedback
    follows the chain rule from the parameter to its uses (see :func:`lfp_vjp`). Example for a linen
    MLP::

        composite: lfp_epsilon(epsilon=1e-06)
           kind        label  rule            module       primitives       source
        0  linear      dense  Epsilon(1e-06)  MLP/Dense_0  dot_general+add  model.py:12 (MLP.__call__)
        1  activation  relu   Identity()      MLP          max              model.py:13 (MLP.__call__)
        2  linear      dense  Epsilon(1e-06)  MLP/Dense_1  dot_general+add  model.py:14 (MLP.__call__)
        3 sites
    """
    composite = lfp_epsilon() if composite is None else check_composite(composite)
    t = _Traced(fun, args, composite, argnums, has_aux, input_argnums, strict=False)
    found = list(sites.iter_sites(t.plan))
    rows = [("", "kind", "label", "rule", "module", "primitives", "source")]
    for n, (depth, site) in enumerate(found):
        rows.append((str(n), "  " * depth + site.kind, site.label, _rule_name(site.rule),
                     site.path or "-", _prims(site), _short_source(site.source_line)))
    lines = [f"composite: {composite.name}"]
    lines += _table(rows, (4, 14, 14, 24, 34, 22, 36))
    lines.append(f"{len(found)} sites")
    missing = [site for _, site in found if site.rule is None]
    if missing:
        lines.append(f"{len(missing)} without a rule (lfp_vjp refuses the model; its error says how "
                     f"to fix each):")
        index = {id(site): n for n, (_, site) in enumerate(found)}
        for site in missing:
            lines.append(f"  site {index[id(site)]} ({site.kind}): {site.problem}")
    lines += _parameter_paths([site for _, site in found])
    return "\n".join(lines)


def _parameter_paths(found: list) -> list[str]:
    lines = []
    reparam = [(n, s) for n, s in enumerate(found) if s.reparameterized]
    if reparam:
        lines.append("parameters reaching their site through a computation (feedback by the chain rule, "
                     "F_θ = |θ| ⊙ (∂W/∂θ)ᵀ c_W):")
        for n, site in reparam:
            for name, prims in site.reparameterized:
                lines.append(f"  site {n} ({site.label}): {name} via {'+'.join(prims)}")
    users: dict[str, list[int]] = {}
    for n, site in enumerate(found):
        for name in site.param_paths:
            users.setdefault(name, []).append(n)
    shared = {name: ns for name, ns in users.items() if len(ns) > 1}
    if shared:
        lines.append("parameters used by several sites (feedback summed over the uses):")
        for name, ns in shared.items():
            lines.append(f"  {name}: sites {', '.join(map(str, ns))}")
    return lines


def _prims(site, limit: int = 40) -> str:
    """The site's distinct primitives, ``+``-joined, cut after ``limit`` characters."""
    text = "+".join(dict.fromkeys(site.primitives))
    return text if len(text) <= limit else text[:text.rfind("+", 0, limit - 3) + 1] + "..."


def _short_source(line: str) -> str:
    """``model.py:12 (Net.__call__)``: the file's base name."""
    path, sep, rest = line.partition(":")
    return os.path.basename(path) + sep + rest if sep else line


def _wrap(text: str, width: int | None) -> list[str]:
    """``text`` cut into pieces of at most ``width`` characters, preferably after ``/``, ``+``, ``,``
    or a space (a long module path, primitive list or rule stays readable); ``None``: never cut (numbers)."""
    if width is None:
        return [text]
    pieces = []
    while len(text) > width:
        cut = max(text.rfind(c, 0, width) for c in "/+, ")
        cut = cut + 1 if cut > 0 else width
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return pieces + [text]


def _table(rows: list[tuple], widths: tuple[int | None, ...]) -> list[str]:
    """Rows as aligned columns; a cell longer than its column's width wraps onto further lines (a width of
    ``None``: the column is as wide as its longest cell)."""
    cells = [[_wrap(c, w) for c, w in zip(r, widths)] for r in rows]
    cols = [max(len(piece) for r in cells for piece in r[c]) for c in range(len(widths))]
    lines = []
    for r in cells:
        for k in range(max(len(c) for c in r)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(r, cols)]
            lines.append("  ".join(parts).rstrip())
    return lines


def _rule_name(rule: Any) -> str:
    """``Epsilon(1e-06)``, ``Identity()``, ``Gamma(1e-06, gamma=0.25)``: ε first, then other fields."""
    if rule is None:
        return "-- none --"
    if not dataclasses.is_dataclass(rule):
        return repr(rule)
    fields = [f.name for f in dataclasses.fields(rule)]
    parts = []
    if "epsilon" in fields and rule.epsilon is not None:
        parts.append(f"{rule.epsilon:g}" if isinstance(rule.epsilon, float) else repr(rule.epsilon))
    defaults = {f.name: f.default for f in dataclasses.fields(rule)}
    parts += [f"{f}={getattr(rule, f)!r}" for f in fields
              if f != "epsilon" and getattr(rule, f) is not None
              and not (isinstance(getattr(rule, f), bool) and getattr(rule, f) == defaults[f])]
    return f"{type(rule).__name__}({', '.join(parts)})"
