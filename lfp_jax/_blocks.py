"""Blocks: where the ε stabiliser of a block's rule is applied.

A linear site (or a normalisation, a residual sum, a pooling) starts a block that extends through
following affine, structural and routing primitives (``x @ W`` then ``+ b``). Its output is
stabilised, ``c ← c · y / (y + ε·sign(y))`` in the backward pass, where it enters the next block; an
activation applies the same ε in its own ``φ(x)/stab(x)``, a LIF neuron replaces it with its own
normaliser. Spikes (a LIF site's output, ``rules.ABSOLUTE``) take reward as is: where they enter any
other computation than a move (reshape, stack, ...) the engine applies ``c ← c · y`` instead. This
state flows into and out of ``scan``/``cond``/``remat`` bodies, whose sub-graphs are analysed here.
"""

from __future__ import annotations

from lfp_jax import _compat
from lfp_jax._graph import is_float
from lfp_jax._primitives import category
from lfp_jax.errors import UnsupportedControlFlowError
from lfp_jax.rules import ABSOLUTE, SpikingEpsilon


def place_stabilizers(flow, plan, cats: dict, context, in_eps: list, wrap_out: list) -> None:
    """Walk the graph placing block-output stabilisers (each site's rule is chosen already).

    ``eps[v]`` is the ε of the block whose output ``v`` is, while that output has not entered
    another block yet. An edge from such a value into a block (a linear, sum, pool, normalisation
    ... site) passes it through the stabiliser; an activation takes the ε into its own
    ``φ(x)/stab(x)``; affine, structural and routing primitives extend the block.
    """
    g = flow.g
    eps: dict[int, float] = {
        v: e for v, e in zip(g.inputs, in_eps) if e is not None and v in flow.tainted}

    def pending(a):
        return eps.get(a) if isinstance(a, int) and is_float(g.aval(a)) else None

    def wrap(i, pos, a):
        e = pending(a)
        if e is not None:
            plan.stabilize[a] = e
            plan.wrapped_edges.add((i, pos))

    for step in plan.schedule:
        if not isinstance(step, int):  # a Site
            site = step
            absolute_in = any(pending(a) is ABSOLUTE for a in site.operands)
            if site.kind == "activation" and not absolute_in:
                site.input_epsilon = pending(site.operands[0])
            elif site.kind == "max":
                # max/min of two values: reward to the winner; a common pending ε passes on (the
                # winner's stabiliser), different ones are applied at the operands
                floats = [a for a, c in zip(site.operands, site.carries_reward) if c]
                if len({_key(pending(a)) for a in floats}) != 1:
                    for pos, a in enumerate(g.nodes[site.nodes[0]].inputs):
                        wrap(site.nodes[0], pos, a)
            elif site.kind == "spiking":
                # SpikingEpsilon replaces the ε of the layer producing the current by its own
                # normaliser; any other rule gets the stabilised current, like any other site
                own = site.rule is not None and site.rule.output_epsilon is ABSOLUTE
                node = g.nodes[site.nodes[0]]
                for pos, a in enumerate(node.inputs):
                    if pos != 0 or pending(a) is ABSOLUTE or not own:
                        wrap(site.nodes[0], pos, a)
            elif (site.rule is not None and site.rule.absorbs_input_epsilon and not absolute_in
                  and not site.extras and pending(site.operands[0]) is not None):
                # the rule applies the scores' ε itself (softmax); any other pending operand is
                # stabilised on its edge as usual (a site with side outputs, e.g. shifted scores used
                # elsewhere, keeps its plain VJP and the stabiliser on the edge)
                site.input_epsilon = pending(site.operands[0])
                inside = {o for r in site.nodes for o in g.nodes[r].outputs}
                for r in site.nodes:
                    for pos, a in enumerate(g.nodes[r].inputs):
                        if isinstance(a, int) and a not in inside and a != site.operands[0]:
                            wrap(r, pos, a)
            elif site.kind in _BLOCK_KINDS or absolute_in:
                # absolute reward (spikes) enters any other site in the normalised form
                inside = {o for r in site.nodes for o in g.nodes[r].outputs}
                for r in site.nodes:
                    for pos, a in enumerate(g.nodes[r].inputs):
                        if not (isinstance(a, int) and a in inside):
                            wrap(r, pos, a)
            if site.rule is None:
                e = None
            elif site.kind in _BLOCK_KINDS:
                e = site.rule.output_epsilon
            elif site.kind == "spiking":
                e = site.rule.output_epsilon if site.output_positions[0] == 0 else None
            elif site.kind in ("max_pool", "dropout") and not absolute_in:
                e = pending(site.operands[0])
            elif site.kind == "max":
                floats = [a for a, c in zip(site.operands, site.carries_reward) if c]
                e = pending(floats[0]) if len({_key(pending(a)) for a in floats}) == 1 else None
            else:
                e = None
            if e is not None:
                eps[site.output] = e
            continue
        i = step
        cat = cats.get(i)
        if cat in ("affine", "structural", "routing"):
            tin = [a for a in flow._tin(i) if is_float(g.aval(a))]
            if cat == "structural" and tin and all(pending(a) is ABSOLUTE for a in tin):
                for o in g.nodes[i].outputs:  # moving, stacking or selecting spikes keeps R as it is
                    if o is not None:
                        eps[o] = ABSOLUTE
            elif len(tin) == 1 and pending(tin[0]) is ABSOLUTE:
                wrap(i, list(g.nodes[i].inputs).index(tin[0]), tin[0])  # only moves keep it absolute
            elif len(tin) == 1 and pending(tin[0]) is not None:
                for o in g.nodes[i].outputs:
                    if o is not None:
                        eps[o] = eps[tin[0]]
            elif len(tin) > 1:  # concat, select, ...: stabilise each pending operand here
                for pos, a in enumerate(g.nodes[i].inputs):
                    if a in tin:
                        wrap(i, pos, a)
        elif cat == "control":
            _control_flow(flow, plan, i, pending, wrap, eps, context)
    for pos, o in enumerate(g.outputs):
        e = pending(o)
        if e is None:
            continue
        if wrap_out[pos]:
            plan.stabilize[o] = e
            plan.wrapped_outputs.add(pos)
        else:
            plan.output_epsilon[pos] = e


def normalize_spikes_in_rules(flow, plan) -> None:
    """Spikes whose every use converts them to the normalised form (``c ← c · y``) are converted by
    their spiking rule instead (``Site.normalized_output``): the same numbers without a stabiliser
    node that keeps its own copy of the spikes for the backward pass. Runs after the relevance edges
    are known (spikes handed ``R`` by a classic rule keep it as is)."""
    g = flow.g
    for site in plan.sites:
        v = site.output
        if not isinstance(site.rule, SpikingEpsilon) or plan.stabilize.get(v) is not ABSOLUTE:
            continue
        edges = {(i, p) for i in flow.consumers.get(v, ()) for p, a in enumerate(g.nodes[i].inputs)
                 if isinstance(a, int) and a == v}
        outs = {p for p, o in enumerate(g.outputs) if isinstance(o, int) and o == v and o in flow.out_vars}
        if edges <= plan.wrapped_edges and outs <= plan.wrapped_outputs:
            plan.wrapped_edges -= edges
            plan.wrapped_outputs -= outs
            del plan.stabilize[v]
            site.normalized_output = True


def _reaches_output(flow, v) -> bool:
    """Whether value ``v`` reaches a graph output through moves only (reshape, slice, stack, ...,
    and the elementwise max of two values, which routes reward as it is)."""
    stack, seen = [v], set()
    while stack:
        u = stack.pop()
        if u is None or u in seen:
            continue
        seen.add(u)
        if u in flow.graph_outputs:
            return True
        for i in flow.consumers.get(u, ()):
            cat = category(flow, i)
            if cat == "control":  # conservative: it may hand the spikes on to an output
                return True
            if cat in ("structural", "select"):  # moves, and max/min of two spike trains
                stack.extend(flow.g.nodes[i].outputs)
    return False

def _key(e):
    return id(e) if e is ABSOLUTE else e


def _control_flow(flow, plan, i: int, pending, wrap, eps, context) -> None:
    """Analyse the sub-graphs of a control-flow node; block state flows into and out of them."""
    node = flow.g.nodes[i]
    sub_in = flow.sub_in.get(i)
    if sub_in is None:
        return
    src = [flow.sources.get(a, 0) if isinstance(a, int) else 0 for a in node.inputs]
    origin = [flow.origin.get(a) if isinstance(a, int) else None for a in node.inputs]
    classes = [flow.classes.get(a) if isinstance(a, int) else None for a in node.inputs]
    sub_roles = flow.sub_roles.get(i, {})

    first = [isinstance(a, int) and flow.reads_model_input(a) for a in node.inputs]

    def _subplan(graph, taint, in_eps, wrap_out, skip=0, in_first=None, in_relevance=None):
        roles = sub_roles.get("branches" if skip else "jaxpr")
        return flow.subplan(graph, taint, in_eps=in_eps, wrap_out=wrap_out, in_src=src[skip:],
                            in_origin=origin[skip:], in_class=classes[skip:], in_first=in_first,
                            in_relevance=in_relevance, in_roles=roles)

    if node.name in _compat.WHILE:
        raise UnsupportedControlFlowError(
            f"a while_loop at {node.where} carries input-dependent values. Reward cannot be "
            f"propagated back through a loop whose trip count is only known at run time (JAX "
            f"cannot reverse it either). Use lax.fori_loop with static bounds, or lax.scan."
        )
    in_eps = [pending(a) for a in node.inputs]
    n_out = len(node.outputs)
    outs: list[float | None]
    if node.name in _compat.SCAN:
        n_consts, n_carry = _compat.scan_layout(node.params)
        for pos in range(n_consts, n_consts + n_carry):  # carries: stabilise on both sides
            wrap(i, pos, node.inputs[pos])
            in_eps[pos] = None
        wrap_out = [k < n_carry for k in range(n_out)]
        scan_first = [f and not n_consts <= k < n_consts + n_carry for k, f in enumerate(first)]
        body = _subplan(node.subgraphs["jaxpr"], sub_in["jaxpr"], in_eps, wrap_out, in_first=scan_first)
        # Spikes stacked as outputs (ABSOLUTE) that only feed other layers are converted to the
        # normalised form inside the body, step by step, by the spiking rule itself (see below).
        inside = [k for k in range(n_carry, n_out) if body.output_epsilon.get(k) is ABSOLUTE
                  and not _reaches_output(flow, node.outputs[k])]
        if inside:
            wrap_out = [w or k in inside for k, w in enumerate(wrap_out)]
            body = _subplan(node.subgraphs["jaxpr"], sub_in["jaxpr"], in_eps, wrap_out,
                            in_first=scan_first)
        plan.subplans[i] = {"jaxpr": body}
        outs = [body.output_epsilon.get(k) for k in range(n_out)]
    elif node.name in _compat.COND:
        branches = node.subgraphs["branches"]
        plans = [_subplan(b, sub_in["branches"], in_eps[1:], [False] * n_out, skip=1, in_first=first[1:])
                 for b in branches]
        agree = [len({p.output_epsilon.get(k) for p in plans}) == 1 for k in range(n_out)]
        if not all(agree):
            plans = [_subplan(b, sub_in["branches"], in_eps[1:], [not a for a in agree], skip=1,
                              in_first=first[1:]) for b in branches]
        plan.subplans[i] = {"branches": tuple(plans)}
        outs = [plans[0].output_epsilon.get(k) for k in range(n_out)]
    else:  # remat
        # remat: a rule inside that hands R to a body input hands it on to the operand outside
        body = _subplan(node.subgraphs["jaxpr"], sub_in["jaxpr"], in_eps, [False] * n_out,
                        in_first=first, in_relevance=[True] * len(node.inputs))
        plan.subplans[i] = {"jaxpr": body}
        outs = [body.output_epsilon.get(k) for k in range(n_out)]
    for o, e in zip(node.outputs, outs):
        if o is not None and e is not None:
            eps[o] = e


_BLOCK_KINDS = ("linear", "sum", "pool", "normalization", "softmax", "bilinear", "quotient",
                "nonlinear")
