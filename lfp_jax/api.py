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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lfp_jax import _graph, sites
from lfp_jax.composites import Composite, lfp_epsilon
from lfp_jax.errors import FrozenParameterError, FrozenParameterWarning, LFPError, RewardError
from lfp_jax.interpreter import evaluate
from lfp_jax.rules import ABSOLUTE, safe_divide, stabilize

Array = jax.Array


def _argnums_tuple(argnums: int | Sequence[int], n: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums:
        raise ValueError("argnums must name at least one argument holding parameters")
    for k in nums:
        if not isinstance(k, int) or not -n <= k < n:
            raise ValueError(f"argnums={argnums!r} does not fit a call with {n} positional arguments")
    return tuple(sorted(k % n for k in nums))


class _Traced:
    """``fun`` traced once for given primals: graph, plan, and where every leaf goes."""

    def __init__(self, fun, primals, composite, argnums, has_aux):
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        self.argnums = _argnums_tuple(argnums, len(primals))
        self.leaves, self.in_tree = jtu.tree_flatten(primals)
        self.owner = []  # primal index of each leaf
        for k, p in enumerate(primals):
            self.owner += [k] * len(jtu.tree_leaves(p))
        self.is_param = [k in self.argnums for k in self.owner]
        avals = [jax.typeof(x) for x in self.leaves]
        for leaf_aval, param, path in zip(avals, self.is_param, _leaf_paths(primals)):
            if param and not _graph.is_float(leaf_aval):
                raise LFPError(
                    f"parameter leaf {path} has dtype {leaf_aval.dtype}: LFP feedback is defined for "
                    f"floating-point parameters only. Pass integer or key state through an argument "
                    f"that is not in argnums={self.argnums}."
                )

        def flat_fun(*leaves):
            return fun(*jtu.tree_unflatten(self.in_tree, leaves))

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
        self.in_taint = [not p and _graph.is_float(a) for p, a in zip(self.is_param, avals)]
        out_avals = [self.graph.aval(o) for o in self.graph.outputs]
        self.primary = [k < n_primary for k in range(len(out_avals))]
        self.float_out = [_graph.is_float(a) for a in out_avals]
        self.plan = sites.analyse(self.graph, self.in_taint, self.primary, composite)
        reached = [k for k, o in enumerate(self.graph.outputs)
                   if self.primary[k] and self.float_out[k] and isinstance(o, int)
                   and o in self.plan.tainted]
        if not reached:
            kinds = sorted({str(a.dtype) for a, p in zip(avals, self.is_param) if not p})
            raise LFPError(
                "no floating-point input of fun reaches its (floating-point) outputs, so there is "
                f"nothing reward could flow back through (non-parameter input dtypes: {kinds}). LFP "
                "propagates reward to float inputs: pass images/features as floats; for integer "
                "inputs such as token ids, embed them first and pass the embeddings."
            )
        self.diff = [k for k in range(len(self.leaves)) if self.is_param[k] or self.in_taint[k]]


def _leaf_paths(primals) -> list[str]:
    return [jtu.keystr(path) for path, _ in jtu.tree_flatten_with_path(primals)[0]]


def lfp_vjp(
    fun: Callable,
    *primals: Any,
    composite: Composite | None = None,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    allow_frozen: bool = False,
):
    r"""Evaluate ``fun(*primals)`` and return a function that propagates a reward back through it.

    Like ``jax.vjp``, but the backward pass follows the feedback rules of ``composite`` (default:
    :func:`~lfp_jax.lfp_epsilon`, the reference LFP-ε rules).

    Args:
      fun: any JAX callable, e.g. a linen ``model.apply``, an nnx model call, or plain jnp code.
      *primals: its arguments. Floating-point leaves of arguments not in ``argnums`` are the inputs
        reward flows back to; integer leaves (labels, PRNG keys) are constants.
      composite: which rule at which site; see :mod:`lfp_jax.composites`.
      argnums: position(s) of the argument(s) holding the parameters.
      has_aux: ``fun`` returns ``(outputs, aux)``; only ``outputs`` receive reward.
      allow_frozen: do not warn (:class:`~lfp_jax.errors.FrozenParameterWarning`) about parameter
        arrays that are entirely zero and so can never move (checked only when the parameters are
        concrete, i.e. outside ``jit``; :func:`check_params` raises instead).

    Returns:
      ``(outputs, feedback_fn)`` or ``(outputs, feedback_fn, aux)``. ``feedback_fn(reward)``, with
      ``reward`` shaped like ``outputs``, returns one entry per primal: for parameter arguments the
      feedback ``|θ| ⊙ J_θᵀ s`` (same pytree, summed over the batch); for the other arguments the input
      relevance ``x ⊙ c_x`` (``None`` for integer leaves).
    """
    composite = lfp_epsilon() if composite is None else composite
    t = _Traced(fun, primals, composite, argnums, has_aux)
    if not allow_frozen:
        frozen = frozen_parameters(tuple(primals[k] for k in t.argnums))
        if frozen:
            warnings.warn(_frozen_message(frozen), FrozenParameterWarning, stacklevel=2)

    def f(*diff_leaves):
        full = list(t.leaves)
        for k, v in zip(t.diff, diff_leaves):
            full[k] = v
        outs = evaluate(t.plan, full)
        return [o for o, fl in zip(outs, t.float_out) if fl], outs

    float_outs, vjp_fn, outs = jax.vjp(f, *[t.leaves[k] for k in t.diff], has_aux=True)
    result = jtu.tree_unflatten(t.full_out_tree, outs)
    outputs, aux = result if has_aux else (result, None)

    def feedback_fn(reward: Any) -> tuple:
        r_leaves = _check_reward(reward, outputs, t.out_tree)
        seeds, r_iter = [], iter(r_leaves)
        for k, (out, fl) in enumerate(zip(outs, t.float_out)):
            r = next(r_iter) if t.primary[k] else None
            if not fl:
                continue
            if r is None:
                seeds.append(jnp.zeros_like(out))
                continue
            eps = t.plan.output_epsilon.get(k)  # the ε rule of the block producing the output
            r = jax.lax.stop_gradient(jnp.asarray(r, out.dtype))
            if eps is ABSOLUTE:  # spikes: the reward itself (see rules.ABSOLUTE)
                seeds.append(r)
            else:
                seeds.append(safe_divide(r, out) if eps is None else r / stabilize(out, eps))
        cts = vjp_fn(seeds)
        result_leaves: list[Any] = [None] * len(t.leaves)
        for k, ct in zip(t.diff, cts):
            x = t.leaves[k]
            result_leaves[k] = jnp.abs(x) * ct if t.is_param[k] else x * ct
        return tuple(jtu.tree_unflatten(t.in_tree, result_leaves))

    if has_aux:
        return outputs, feedback_fn, aux
    return outputs, feedback_fn


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
    frozen = []
    for path, leaf in jtu.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.core.Tracer) or not _graph.is_float(getattr(leaf, "aval", leaf)):
            continue
        # numpy, not jnp: under jit a jnp comparison of a captured constant would be traced
        if leaf.size and not np.any(np.asarray(leaf) != 0):
            frozen.append(jtu.keystr(path))
    return frozen


def _frozen_message(frozen: list[str]) -> str:
    return (
        f"parameters {', '.join(frozen)} are all exactly zero. LFP feedback is proportional to |θ|, so "
        f"they never change. Flax initialises biases to zero: use params = lfp_jax.nn.torch_init(key, "
        f"params) (PyTorch's init, as in the reference; it keeps normalisation offsets at 0, frozen as "
        f"in the reference). Pass allow_frozen=True where freezing is intended."
    )


def check_params(params: Any) -> None:
    """Raise :class:`~lfp_jax.errors.FrozenParameterError` if a parameter array is entirely zero.

    LFP feedback is ``|θ| ⊙ (...)``, so such arrays never move (Flax initialises biases to zero; use
    :func:`lfp_jax.nn.torch_init`). Traced values are skipped (call this once outside ``jit``).
    """
    frozen = frozen_parameters(params)
    if frozen:
        raise FrozenParameterError(_frozen_message(frozen))


def _split_args(args, argnums, reward_argnums):
    reward_set = set(reward_argnums)
    fun_args = [a for i, a in enumerate(args) if i not in reward_set]
    reward_args = [args[i] for i in reward_argnums]
    mapping = [i for i in range(len(args)) if i not in reward_set]
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    try:
        fun_nums = tuple(mapping.index(k % len(args)) for k in nums)
    except ValueError:
        raise ValueError(f"argnums {argnums} and reward_argnums {reward_argnums} overlap") from None
    return fun_args, reward_args, (fun_nums[0] if isinstance(argnums, int) else fun_nums)


def lfp_value_and_feedback(
    fun: Callable,
    reward_fn: Callable,
    *,
    composite: Composite | None = None,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    reward_argnums: Sequence[int] = (),
    allow_frozen: bool = False,
) -> Callable:
    r"""LFP's ``jax.value_and_grad``: ``g(*args) -> (outputs, feedback)``.

    ``reward = reward_fn(outputs, *reward_args)`` is computed from the outputs (and treated as a
    constant); a reward needing labels can be a closure, or the labels can be passed through
    ``reward_argnums``::

        g = lfp_value_and_feedback(model.apply, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))
        logits, feedback = g(params, images, labels)   # fun(params, images); reward_fn(logits, labels)
        params = jax.tree.map(lambda p, f: p + lr * f, params, feedback)

    Args:
      fun: the model; ``fun(*args)`` with the reward arguments removed.
      reward_fn: ``reward_fn(outputs, *reward_args) -> reward`` with the structure of ``outputs``.
      composite, argnums, has_aux, allow_frozen: as in :func:`lfp_vjp` (``argnums`` counts positions
        of ``g``'s arguments).
      reward_argnums: positions of ``g``'s arguments passed to ``reward_fn`` instead of ``fun``.

    Returns:
      ``g`` with ``g(*args) = (outputs, feedback)``, or ``((outputs, aux), feedback)`` with
      ``has_aux``. ``feedback`` has the structure of ``args[argnums]`` (a tuple for several argnums),
      positive = strengthen, summed over the batch.
    """
    reward_argnums = tuple(reward_argnums) if not isinstance(reward_argnums, int) else (reward_argnums,)

    def g(*args):
        fun_args, reward_args, nums = _split_args(args, argnums, reward_argnums)
        res = lfp_vjp(fun, *fun_args, composite=composite, argnums=nums, has_aux=has_aux,
                      allow_frozen=allow_frozen)
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


def find_sites(fun: Callable, *args: Any, composite: Composite | None = None,
               argnums: int | Sequence[int] = 0, has_aux: bool = False) -> list[sites.Site]:
    """The sites of ``fun`` at ``args`` (including those inside scan/cond/remat bodies), in order.

    Each :class:`~lfp_jax.sites.Site` has its ``kind``, ``label``, resolved ``rule``, ``name_stack``
    and ``source_line``; :func:`describe` prints them as a table.
    """
    composite = lfp_epsilon() if composite is None else composite
    t = _Traced(fun, args, composite, argnums, has_aux)
    return [site for _, site in sites.iter_sites(t.plan)]


def describe(fun: Callable, *args: Any, composite: Composite | None = None,
             argnums: int | Sequence[int] = 0, has_aux: bool = False) -> str:
    """A table of the sites of ``fun`` at ``args``: kind, what it computes, rule, module, source line.

    Example output for a linen MLP::

        composite: lfp_epsilon(epsilon=1e-06)
           kind        label  rule                    module       primitives   source
        0  linear      dense  Epsilon(epsilon=1e-06)  MLP/Dense_0  dot_general  model.py:12 (MLP.__call__)
        1  activation  relu   Identity(epsilon=None)  MLP          max          model.py:13 (MLP.__call__)
        2  linear      dense  Epsilon(epsilon=1e-06)  MLP/Dense_1  dot_general  model.py:14 (MLP.__call__)
    """
    composite = lfp_epsilon() if composite is None else composite
    t = _Traced(fun, args, composite, argnums, has_aux)
    rows = [("", "kind", "label", "rule", "module", "primitives", "source")]
    for n, (depth, site) in enumerate(sites.iter_sites(t.plan)):
        prims = "+".join(dict.fromkeys(site.primitives))
        prims = prims if len(prims) <= 32 else prims[:29] + "..."
        rows.append((str(n), "  " * depth + site.kind, site.label, _rule_name(site.rule),
                     site.name_stack or "-", prims, site.source_line))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    lines = [f"composite: {composite.name}"]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in range(6)) + "  " + r[6])
    lines.append(f"{len(rows) - 1} sites")
    return "\n".join(lines)


def _rule_name(rule: Any) -> str:
    return repr(rule).replace("lfp_jax.rules.", "")
