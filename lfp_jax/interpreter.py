"""Evaluating a model's graph with feedback rules inserted at its sites.

:func:`evaluate` runs a :class:`~lfp_jax.sites.Plan` eagerly or under any JAX transformation: every
primitive is re-bound as it was, except that sites are evaluated through their rule (often a
``jax.custom_vjp``) and block outputs entering another block pass through an ε stabiliser. The
reverse pass of the result, taken by ``jax.vjp``, is then LFP's backward pass. Control-flow
primitives are re-bound with their sub-jaxprs rewritten the same way, so ``scan``, ``cond`` and
``remat`` survive into the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from lfp_jax import _compat, _embedding, _remat
from lfp_jax._graph import Lit, Node
from lfp_jax.rules import ABSOLUTE, SiteCall
from lfp_jax.rules._base import output_share, stabilizer_factor
from lfp_jax.sites import Plan, Site


def evaluate(plan: Plan, args: Sequence[Any], taps: dict | None = None,
             carriers: dict | None = None) -> list[Any]:
    """Evaluate ``plan.graph`` on ``args`` with the plan's rules; returns the graph outputs.

    ``carriers`` maps the position of a token-id input to its carrier, a float array of the ids'
    shape whose cotangent becomes the tokens' relevance (:mod:`lfp_jax._embedding`): it follows the ids
    through ``plan.id_nodes`` into the embedding sites.

    ``taps`` adds zeros whose cotangents are the reward crossing each top-level site. For
    ``lrp(..., record=...)``, ``taps["record"][v]`` is added to the output ``v`` of a site where the site
    produces it (its cotangent: everything its uses hand back). For :func:`lfp_jax.conservation`:
    ``taps["out"][v] = (plain, wrapped, relevance)`` are added to the reads of value ``v`` by its
    consumers (a plain read, one through a block boundary, one through a relevance boundary: on the
    consumer's side of it), ``taps["in"][(k, j)]`` to operand ``j`` of the ``k``-th site of the schedule
    as its rule reads it.
    """
    g = plan.graph
    env: dict[int, Any] = dict(zip(g.inputs, args))
    carried: dict[int, Any] = {g.inputs[k]: c for k, c in (carriers or {}).items()}
    out_taps = taps.get("out", {}) if taps else {}
    record = taps.get("record", {}) if taps else {}
    in_taps = taps.get("in", {}) if taps else {}
    skip = taps.get("skip", ()) if taps else ()
    by_node = _edges_by_node(plan)

    def reader(env: dict, stabilized: dict, weights: dict):
        def read(atom, wrapped: Any = False, tap: bool = True, use: bool = False):
            if isinstance(atom, Lit):
                return atom.value
            if use:  # an effective weight: F_W = |W| ⊙ c_W (lfp_jax._params)
                if atom not in weights:
                    weights[atom] = _weight(env[atom])
                return weights[atom]
            t = out_taps.get(atom) if tap else None
            if wrapped is False:
                return env[atom] if t is None else env[atom] + t[0]
            if wrapped is True:
                if atom not in stabilized:
                    stabilized[atom] = _boundary(env[atom], plan.stabilize[atom])
                return stabilized[atom] if t is None else stabilized[atom] + t[1]
            key = (atom, "R", wrapped[1])  # ("R", ε): the consumer hands R, the producer takes c
            if key not in stabilized:
                stabilized[key] = _relevance_boundary(env[atom], wrapped[1])
            return stabilized[key] if t is None else stabilized[key] + t[2]

        return read

    def mode(i, p):
        if (i, p) in plan.wrapped_edges:
            return True
        if (i, p) in plan.relevance_edges:
            return ("R", plan.relevance_edges[(i, p)])
        return False

    def run_site(site: Site, k: int, env: dict, read, given: Any = None) -> None:
        wrapped = _wrapped_operands(plan, site, by_node)
        ops = [read(a, w, use=isinstance(a, int) and a in plan.param_uses)
               for a, w in zip(site.operands, wrapped)]
        ops = [op + in_taps[(k, j)] if (k, j) in in_taps else op for j, op in enumerate(ops)]
        call = _site_call(plan, site)
        if given is not None:  # outputs kept from the forward pass (a recomputed region's softmax)
            call = call._replace(fn=lambda *_: tuple(given))
        if site.ids_operands and carried:
            call = call._replace(carriers=tuple(
                carried.get(a) if isinstance(a, int) and k in site.ids_operands else None
                for k, a in enumerate(site.operands)))
        outs = site.rule(call, *ops)
        for var, val in zip((site.output,) + site.extras, outs):
            env[var] = val + record[var] if var in record else val
        if taps is not None and "values" in taps:
            taps["values"][k] = (ops, outs[0])

    def run_node(i: int, env: dict, read) -> None:
        node = g.nodes[i]
        tapped = i not in skip
        ins = [read(a, mode(i, p), tapped, (i, p) in plan.param_use_edges) for p, a in enumerate(node.inputs)]
        if i in plan.relevance_pass:
            outs = _pass_relevance(node, ins, [p for p, a in enumerate(node.inputs)
                                               if isinstance(a, int) and a in plan.tainted])
        else:
            outs = _bind(node, ins, plan.subplans.get(i))
        for var, val in zip(node.outputs, outs):
            if var is not None:
                env[var] = val
        if i in plan.id_nodes and carried:
            _carry(plan, i, ins, carried)

    def run_region(region: _remat.Region) -> None:
        last = region.steps[-1]

        def fn(*values, given=None):
            local = dict(zip(region.inputs, values))
            read = reader(local, {}, {})
            for step in region.steps:
                if isinstance(step, Site):
                    run_site(step, -1, local, read, given if step is last else None)
                else:
                    run_node(step, local, read)
            return [local[v] for v in (last.output,) + last.extras]

        outs = _recomputed(fn, [env[a] for a in region.inputs], region.keeps_output)
        env.update(zip((last.output,) + last.extras, outs))

    # attention scores recomputed in the backward pass (lfp_jax._remat); not where taps read the
    # values inside a region
    regions = _remat.score_regions(plan) if taps is None else {}
    later_sites = {id(s) for r in regions.values() for s in r.steps[:-1] if isinstance(s, Site)}
    later_nodes = {s for r in regions.values() for s in r.steps[:-1] if not isinstance(s, Site)}
    read = reader(env, {}, {})
    k = -1
    for step in plan.schedule:
        if isinstance(step, Site):
            k += 1
            if id(step) in later_sites:
                continue
            if id(step) in regions:
                run_region(regions[id(step)])
            else:
                run_site(step, k, env, read)
        elif step not in later_nodes:
            run_node(step, env, read)
    if taps is not None:
        taps["moved"] = {v: env[v] for v in list(out_taps) + list(record) if v in env}
    return [read(o, p in plan.wrapped_outputs, tap=False, use=isinstance(o, int) and o in plan.param_uses)
            for p, o in enumerate(g.outputs)]


def _carry(plan: Plan, i: int, ins: list[Any], carried: dict) -> None:
    """The token-id carriers of node ``i``'s outputs (an id-valued move or elementwise operation)."""
    node = plan.graph.nodes[i]
    cs = [carried.get(a) if isinstance(a, int) else None for a in node.inputs]
    if all(c is None for c in cs):
        return
    dtype = next(c for c in cs if c is not None).dtype
    outs = _embedding.carry(node, ins, cs, [plan.graph.avals[o] for o in node.outputs if o is not None],
                            dtype, plan.gather_weights.get(i))
    for var, c in zip([o for o in node.outputs if o is not None], outs):
        carried[var] = c


def _wrapped_operands(plan: Plan, site: Site, by_node: tuple[dict, dict]) -> list[Any]:
    """Per operand: ``True`` (read through its block boundary), ``("R", ε)`` (the rule hands ``R``
    and the producer takes ``c``: :func:`_relevance_boundary`) or ``False``. ``by_node`` is
    :func:`_edges_by_node` of the plan."""
    g = plan.graph
    wrapped, relevant = by_node
    edges = {g.nodes[r].inputs[p] for r in site.nodes for p in wrapped.get(r, ())}
    relevance = {g.nodes[r].inputs[p]: e for r in site.nodes for p, e in relevant.get(r, ())}
    out: list[Any] = []
    for a in site.operands:
        if isinstance(a, int) and a in relevance:
            out.append(("R", relevance[a]))
        else:
            out.append(isinstance(a, int) and a in edges)
    return out


def _edges_by_node(plan: Plan) -> tuple[dict, dict]:
    """``plan.wrapped_edges`` and ``plan.relevance_edges`` grouped by node, built once per evaluation of
    the finished plan: every site then looks up only its own nodes' edges (scanning all edges per site
    is quadratic in depth)."""
    wrapped: dict[int, list[int]] = {}
    for r, p in plan.wrapped_edges:
        wrapped.setdefault(r, []).append(p)
    relevant: dict[int, list[tuple[int, Any]]] = {}
    for (r, p), e in plan.relevance_edges.items():
        relevant.setdefault(r, []).append((p, e))
    return wrapped, relevant


def _site_call(plan: Plan, site: Site) -> SiteCall:
    g = plan.graph

    def run(operands, nodes, names=frozenset(), given=None):
        env = dict(given or {})
        for atom, value in zip(site.operands, operands):
            env[atom if isinstance(atom, int) else id(atom)] = value
        for r in nodes:
            node = g.nodes[r]
            ins = [env[a] if isinstance(a, int) else env.get(id(a), a.value) for a in node.inputs]
            outs = _bind(node, ins, None)
            if node.name in names:
                outs = [jax.lax.stop_gradient(o) for o in outs]
            for var, val in zip(node.outputs, outs):
                if var is not None:
                    env[var] = val
        return env

    def detached(names: frozenset = frozenset()):
        def fn(*operands):
            env = run(operands, site.nodes, names)
            return tuple(env[v] for v in (site.output,) + site.extras)

        return fn

    def stages(k: int):
        cut = [o for o in g.nodes[site.nodes[k - 1]].outputs if o is not None][0]

        def head(*operands):
            return run(operands, site.nodes[:k])[cut]

        def tail(value, *operands):
            return run(operands, site.nodes[k:], given={cut: value})[site.output]

        return head, tail

    return SiteCall(site, detached(), site.carries_reward, site.input_epsilon, detached, stages,
                    site.relevance_output)


def _recomputed(fn, values: list, keep_outputs: bool = False) -> list:
    """``fn(*values)`` whose backward pass evaluates ``fn`` again (from ``values``, the only arrays kept)
    and takes its VJP. With ``keep_outputs`` the outputs are kept too and handed to the recomputation
    as ``fn(*values, given=outputs)``, which uses them instead of computing them again (a softmax whose
    rule needs only its output and input: the exponentials are not evaluated twice).

    Unlike ``jax.checkpoint``, the recomputation waits for the cotangents: each kept float value gets
    a zero that XLA cannot fold away, made from one element of a cotangent (``x + 0·e`` for a finite
    ``e``). Without that data dependence XLA's CPU scheduler may run the recomputation in the forward
    pass (optimisation barriers are removed before scheduling) and keep its result until the backward
    pass, which is what recomputing was to avoid."""

    @jax.custom_vjp
    def run(*vals):
        return fn(*vals)

    def fwd(*vals):
        outs = fn(*vals)
        return outs, (vals, outs if keep_outputs else None)

    def bwd(res, cts):
        vals, outs = res
        e = next(c for c in jax.tree_util.tree_leaves(cts)).reshape(-1)[0]
        zero = jnp.where(jnp.isfinite(e), e, 0) * 0
        vals = tuple(v + zero.astype(v.dtype) if jnp.issubdtype(jnp.result_type(v), jnp.inexact) else v
                     for v in vals)
        _, vjp = jax.vjp(functools.partial(fn, given=outs) if keep_outputs else fn, *vals)
        grads = vjp(cts)
        return tuple(g if jnp.issubdtype(jnp.result_type(v), jnp.inexact) else None
                     for g, v in zip(grads, vals))

    run.defvjp(fwd, bwd)
    return run(*values)


@jax.custom_vjp
def _weight(value: Any) -> Any:
    """Identity; its backward multiplies the cotangent by ``|value|``: an effective weight's feedback
    ``|W| ⊙ c_W``, which JAX's reverse pass carries back to the parameters (see :mod:`lfp_jax._params`)."""
    return value


_weight.defvjp(lambda value: (value, value), lambda value, ct: (jnp.abs(value) * ct,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _boundary(value: Any, epsilon: float) -> Any:
    """Identity; its backward multiplies the cotangent by ``y / (y + ε·sign(y))`` (block output ε)."""
    return value


def _boundary_fwd(value, epsilon):
    return value, value


def _boundary_bwd(epsilon, value, ct):
    if epsilon is ABSOLUTE:  # a spiking output: its producer takes the reward itself, R = y ⊙ c
        return (ct * value,)
    # a NaN stays NaN, as in jax.grad (masked -inf attention scores get 0 from the softmax rule)
    return (stabilizer_factor(ct, value, epsilon),)


_boundary.defvjp(_boundary_fwd, _boundary_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _relevance_boundary(value: Any, epsilon: float | None) -> Any:
    """Identity; its backward turns the relevance ``R`` a rule hands to ``value`` into the producer's
    ``c``: ``R / (y + ε·sign(y))`` at a block output with ε, else ``R / y`` (0 where ``y = 0``)."""
    return value


def _relevance_boundary_fwd(value, epsilon):
    return value, value


def _relevance_boundary_bwd(epsilon, value, ct):
    if epsilon is ABSOLUTE:
        return (ct,)
    return (output_share(ct, value, epsilon),)


_relevance_boundary.defvjp(_relevance_boundary_fwd, _relevance_boundary_bwd)


def _pass_relevance(node: Node, ins: list[Any], tainted: list[int]) -> list[Any]:
    """An elementwise affine node (``(x − μ)/σ``) between a model input and a rule that hands ``R``:
    its value as usual, the relevance passed back unchanged (``R_x = R_y``)."""
    (k,) = tainted

    @jax.custom_vjp
    def node_fn(x):
        args = list(ins)
        args[k] = x
        return _bind(node, args, None)[0]

    node_fn.defvjp(lambda x: (node_fn(x), None), lambda _, ct: (ct,))
    return [node_fn(ins[k])]


def _bind(node: Node, ins: list[Any], subplans: dict | None) -> list[Any]:
    params = node.params
    if subplans:
        params = dict(params)
        for key, sub in subplans.items():
            original = node.params[key]
            if isinstance(sub, tuple):
                params[key] = tuple(_rewrite(s, o) for s, o in zip(sub, original))
            else:
                params[key] = _rewrite(sub, original)
    out = node.prim.bind(*ins, **params)
    return list(out) if node.prim.multiple_results else [out]


def _rewrite(plan: Plan, original: Any) -> Any:
    """A jaxpr of the same signature as ``original`` that evaluates ``plan`` with its rules."""
    g = plan.graph
    specs = [jax.ShapeDtypeStruct(g.avals[v].shape, g.avals[v].dtype,
                                  weak_type=getattr(g.avals[v], "weak_type", False))
             for v in g.inputs]
    closed = jax.make_jaxpr(lambda *a: evaluate(plan, a))(*specs)
    if isinstance(original, _compat.ClosedJaxpr) and not closed.consts:
        return closed
    jaxpr = _inline_consts(closed)
    if isinstance(original, _compat.ClosedJaxpr):
        return jex.ClosedJaxpr(jaxpr, ())
    return jaxpr


def _inline_consts(closed: Any) -> Any:
    """``closed.jaxpr`` with its constants turned into literals (for params that must be open)."""
    jaxpr = closed.jaxpr
    if not closed.consts:
        return jaxpr
    lits = {v: jex.Literal(c, v.aval) for v, c in zip(jaxpr.constvars, closed.consts)}
    eqns = [e.replace(invars=[lits.get(a, a) if isinstance(a, jex.Var) else a for a in e.invars])
            for e in jaxpr.eqns]
    outvars = [lits.get(v, v) if isinstance(v, jex.Var) else v for v in jaxpr.outvars]
    return jaxpr.replace(constvars=[], eqns=eqns, outvars=outvars)
