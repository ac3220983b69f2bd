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

A parameter used through a computation of parameters only, ``W = h(θ)`` (an offset ``1 + scale``,
weight normalisation, a ``softplus``/``exp`` reparameterisation, a tied ``Wᵀ``), receives the feedback of
its *effective weight* ``W``, the value that meets the computation on the inputs, pulled back by the
chain rule:

.. math::  F_\theta = \sum_{\text{uses}} (\partial h / \partial \theta)^\top \big(|W| \odot c_W\big),

with ``c_W = J_Wᵀ s`` the normalised reward at the use. For a parameter used as it is, moved or cast
this is ``|θ| ⊙ J_θᵀ s``; a zero ``scale`` used as ``1 + scale`` moves (``|W| = 1``). Theorem 1 becomes
``F_θ = −J_hᵀ (|W| ⊙ ∇_W Σ_batch CE)``. :func:`describe` lists such parameters (see
``lfp_jax._params``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util as jtu

from lfp_jax import _arguments, _frozen, _report, sites
from lfp_jax._frozen import check_params
from lfp_jax._trace import Traced
from lfp_jax.composites import Composite, check_composite, lfp_epsilon

Array = jax.Array

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
        the inputs reward flows back to. Integer leaves are token ids where ``fun`` looks a parameter
        table up by them (reward enters at the lookup: an embedding site), else constants (labels,
        masks, PRNG keys). Leaves that are not arrays (Python numbers, an equinox module's activation
        function) are static parts of ``fun`` and get ``None``.
      composite: which rule at which site; see :mod:`lfp_jax.composites`.
      argnums: position(s) of the argument(s) holding the parameters.
      input_argnums: position(s) of the argument(s) holding the model inputs, which carry reward.
        Every other non-parameter argument is a constant: running statistics passed to a BatchNorm
        in eval mode (``batch_stats``), a padding or attention mask, a dropout mask, an nnx state.
        Default: every argument not in ``argnums`` is an input.
      has_aux: ``fun`` returns ``(outputs, aux)``; only ``outputs`` receive reward.
      allow_frozen: do not look for parameter arrays that are entirely zero and so can never move
        (:class:`~lfp_jax.errors.FrozenParameterWarning`): on the host when the parameters are concrete,
        inside the compiled step under ``jit``/``pmap``/``vmap``, where the check costs a few per cent
        of a CPU step (``benchmarks/frozen_check.py``); :func:`check_params` raises instead.

    Returns:
      ``(outputs, feedback_fn)`` or ``(outputs, feedback_fn, aux)``. ``feedback_fn(reward)``, with
      ``reward`` shaped like ``outputs``, returns one entry per primal: for parameter arguments the
      feedback ``|θ| ⊙ J_θᵀ s`` (same pytree, summed over the batch; through a computation
      ``W = h(θ)``, the effective weight's ``(∂W/∂θ)ᵀ (|W| ⊙ c_W)``); for input arguments the input
      relevance ``x ⊙ c_x``, or ``R`` itself where the input's layer hands it whole (classic rules:
      flat, w², z^B keep relevance at inputs that are 0); for token ids the relevance of each token,
      ``Σ_d e ⊙ c_e`` at its lookup's output (a float array shaped like the ids); ``None`` for other
      integer leaves, for ids looked up only inside ``scan``/``cond``/``remat`` bodies, and for static
      leaves; ``None`` for constant arguments.

    Raises:
      NoRuleError: sites that no rule of ``composite`` covers, all of them in one table.
    """
    return _lfp_vjp(fun, primals, composite, argnums, input_argnums, has_aux, allow_frozen, None)


def _lfp_vjp(fun, primals, composite, argnums, input_argnums, has_aux, allow_frozen, positions):
    composite = lfp_epsilon() if composite is None else check_composite(composite)
    t = Traced(fun, primals, composite, argnums, has_aux, input_argnums, positions)
    receipt = None if allow_frozen else _frozen.report(t)
    outs, vjp_fn, _ = t.vjp()
    result = jtu.tree_unflatten(t.full_out_tree, outs)
    outputs, aux = result if has_aux else (result, None)
    constant = [k not in t.argnums and t.input_argnums is not None and k not in t.input_argnums
                for k in range(len(primals))]

    def feedback_fn(reward: Any) -> tuple:
        seeds, _ = t.seeds(outs, _arguments.check_reward(reward, outputs, t.out_tree))
        cts, carrier_cts, _ = vjp_fn(seeds)
        results = t.results(cts, carrier_cts)
        if receipt is not None:   # the in-program zero-parameter check's int32 zero (see _frozen.report),
            # added to the smallest parameter leaf's feedback: a pass over a handful of numbers
            k = min((k for k in range(len(results)) if t.is_param[k]), key=lambda k: t.leaves[k].size)
            results[k] = results[k] + receipt.astype(results[k].dtype)
        per_arg = t.unflatten(results)
        return tuple(None if c else a for a, c in zip(per_arg, constant))

    if has_aux:
        return outputs, feedback_fn, aux
    return outputs, feedback_fn


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
    reward_argnums = _arguments.as_argnums(reward_argnums, "reward_argnums")
    _arguments.as_argnums(argnums, "argnums")
    if input_argnums is not None:
        _arguments.as_argnums(input_argnums, "input_argnums")

    def g(*args):
        fun_args, reward_args, nums, inputs, mapping = _arguments.split_args(args, argnums, reward_argnums,
                                                                             input_argnums)
        _arguments.check_call(fun, len(fun_args), reward_argnums, len(args), reward_fn)
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
        argnums: int | Sequence[int] = 1, record: Any = None) -> Callable:
    r"""LRP explanations: ``g(*args, target=...) -> (outputs, relevance)``, one backward pass.

    The relevance of the inputs ``args[argnums]`` for the output relevance ``target`` under the rules
    of ``composite`` (default :func:`~lfp_jax.composites.attn_lrp`): ``R_x = x ⊙ c_x``, with ``c``
    carried back from ``c_z = target / (z + ε·sign(z))`` at the outputs ``z``, or the relevance itself
    where the input's layer hands it whole (classic rules such as flat, w², z^B: inputs that are exactly
    0 keep their relevance). For integer token ids (a language model), the relevance of each token is
    the relevance at its embedding lookup's output summed over the features,
    ``R_t = Σ_d e_{t,d} c_{t,d}``, shaped like the ids. Zennit's presets are in
    :mod:`lfp_jax.composites` (``epsilon_plus``, ...); :func:`lfp_jax.conservation` shows where
    relevance goes, site by site. Every other argument is a constant (parameters included: no feedback
    is computed); ``fun`` may close over its parameters (not over an embedding table: token ids need
    the table as an argument). Works under ``jit`` and ``vmap``.

    Args:
      fun: the model.
      composite: which rule at which site.
      argnums: position(s) of the argument(s) to explain (default 1: ``fun(params, x)``).
      record: a :class:`~lfp_jax.Match` (or a predicate ``site -> bool``, or a sequence of them)
        picking sites whose output relevance ``R_y = y ⊙ c_y`` to return as well (``c_y`` as the
        site's rule receives it, after the ε of its block: see :mod:`lfp_jax._record`), e.g.
        ``Match(kind="sum")`` for the residual stream after every block of a transformer, or
        ``Match(path="*/layer_3/*")`` for one block's layers (:func:`describe` lists the sites).

    Returns:
      ``g``; ``g(*args, target=t)`` returns ``(outputs, relevance)`` with ``relevance`` of the structure
      of ``args[argnums]`` (a tuple for several), and with ``record`` ``(outputs, relevance,
      recorded)``: a dict from ``"<n> <kind> <module path>"`` (``n`` the site's row in
      :func:`describe`) to the relevance at that site's output. ``target`` is either integer class labels,
      one per output row (output relevance ``one_hot(label) ⊙ outputs``, so that under a conservative
      composite ``Σ relevance ≈`` the class logit), or the output relevance itself, shaped like the
      outputs: :mod:`lfp_jax.targets` builds it for a token at a position, a span of generated tokens,
      or a contrast between two tokens.

    Example::

        explain = lfp_jax.lrp(lambda p, x: model.apply({"params": p}, x))
        logits, heatmap = jax.jit(explain)(params, images, target=labels)

        explain_lm = lfp_jax.lrp(lambda p, ids: lm.apply({"params": p}, ids), record=Match(kind="sum"))
        logits = lm.apply({"params": lm_params}, ids)                     # (batch, tokens, vocabulary)
        target = lfp_jax.targets.token(logits, next_token, position=-1)
        logits, per_token, stream = jax.jit(explain_lm)(lm_params, ids, target=target)
    """
    from lfp_jax import _record
    from lfp_jax.composites import attn_lrp

    composite = attn_lrp() if composite is None else check_composite(composite)
    single = not isinstance(argnums, (tuple, list))
    nums = _arguments.as_argnums(argnums, "argnums")

    def g(*args, target):
        inputs = _arguments.input_argnums(nums, len(args), ())
        t = Traced(fun, args, composite, (), False, inputs, None)
        t.check_ids_explained(inputs)
        chosen = _record.select(t.plan, record) if record is not None else []
        outs, vjp_fn, extra = t.vjp(_record.taps(t.plan, chosen) if chosen else None)
        outputs = jtu.tree_unflatten(t.full_out_tree, outs)
        reward = _arguments.check_reward(_arguments.output_relevance(outputs, target), outputs, t.out_tree)
        seeds, given = t.seeds(outs, reward)
        cts, carrier_cts, tap_cts = vjp_fn(seeds)
        per_arg = t.unflatten(t.results(cts, carrier_cts))
        relevance = tuple(per_arg[k] for k in inputs)
        relevance = relevance[0] if single else relevance
        if record is None:
            return outputs, relevance
        keys = _record.keys(chosen, len(list(sites.iter_sites(t.plan))))
        recorded = {key: _record.recorded(site, extra["moved"][site.output], tap_cts["record"][site.output])
                    for key, (_, site) in zip(keys, chosen)}
        return outputs, relevance, recorded

    return g


def find_sites(fun: Callable, *args: Any, composite: Composite | None = None,
               argnums: int | Sequence[int] = 0, input_argnums: int | Sequence[int] | None = None,
               has_aux: bool = False) -> list[sites.Site]:
    """The sites of ``fun`` at ``args`` (including those inside scan/cond/remat bodies), in order.

    Each :class:`~lfp_jax.sites.Site` has its ``kind``, ``label``, resolved ``rule`` (``None`` where
    the composite has none, with the reason in ``problem``), module ``path``, ``param_paths`` and
    ``source_line``; :func:`describe` prints them as a table.
    """
    composite = lfp_epsilon() if composite is None else check_composite(composite)
    t = Traced(fun, args, composite, argnums, has_aux, input_argnums, strict=False)
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
    t = Traced(fun, args, composite, argnums, has_aux, input_argnums, strict=False)
    return _report.site_table(composite.name, list(sites.iter_sites(t.plan)))


__all__ = ["check_params", "describe", "find_sites", "lfp_grad", "lfp_value_and_feedback",
           "lfp_value_and_grad", "lfp_vjp", "lrp"]
