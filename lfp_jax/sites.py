"""Finding the sites of a model: where reward crosses a layer, an activation or a normalisation.

A jaxpr is primitives, not layers. This module reads a :class:`~lfp_jax._graph.Graph` and decides, for
every primitive through which reward can flow, what it is part of:

* **taint**: a value is *input-dependent* if it depends on a floating-point input of the model
  (parameters and integer inputs such as labels or PRNG keys are constants for the reward flow);
  ``stop_gradient`` ends dependence. Only values that reach a rewarded output are considered.
* **categories** of single primitives: *structural* (reshape, transpose, slice, concat, ...: reward
  moves unchanged), *mixing* (``dot_general``, convolutions, ``reduce_sum``, sum pooling, the sum of
  two input-dependent values), *elementwise affine* (adding, multiplying or dividing by a constant:
  a bias, a BatchNorm scale in eval mode, the ``1/n`` of a mean), *routing* (max pooling), and
  *nonlinear* (everything else).
* **regions**: every nonlinear primitive is grown into the smallest single-input, single-output
  sub-graph around it, using the dominator tree of the data flow (the region's input dominates it, its
  output post-dominates it). A region that is elementwise in its input is an **activation** (ReLU,
  ``x·σ(x)``, inlined GELU, ``(x > 0).astype(f)``, ...); one that normalises by a reduced standard
  deviation is a **normalization** (BatchNorm with batch statistics, LayerNorm, ...); ``exp/Σexp`` is
  a **softmax**. A product of two independent input-dependent values is a **bilinear** site.
* **blocks**: a mixing primitive starts a block that extends through following affine and structural
  primitives (``x @ W`` then ``+ b``); the ε stabiliser of its rule is applied where the block output
  enters another block.

Every input-dependent primitive ends up in a site, in a block, or in an error that names it and the
user's source line. Unknown primitives can be declared with :func:`register_primitive`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

from lfp_jax import _compat
from lfp_jax._graph import Graph, Lit, Node, is_float
from lfp_jax.errors import NoRuleError, UnsupportedControlFlowError

STRUCTURAL = {
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "gather", "concatenate", "pad", "rev", "copy", "copy_p", "reduce_precision", "dynamic_update_slice",
    "scatter", "optimization_barrier", "device_put", "sharding_constraint", "mesh_cast", "reshard",
    "split", "pvary", "argmax", "argmin", "iota",
}
ROUTING = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax", "cummin"}
MIXING = {"dot_general", "conv_general_dilated", "reduce_sum", "reduce_window_sum", "cumsum",
          "scatter_add", "scatter-add"}
ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "select_n", "convert_element_type",
    "copy", "copy_p", "reduce_precision", "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt",
    "rsqrt", "cbrt", "abs", "sign", "floor", "ceil", "round", "erf", "erfc", "erf_inv", "lgamma",
    "digamma", "integer_pow", "square", "pow", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and",
    "or", "not", "xor", "rem", "atan2", "nextafter", "is_finite", "reciprocal",
}
NO_REWARD = {"stop_gradient", "random_bits", "random_seed", "random_wrap", "random_unwrap",
             "random_fold_in", "random_split", "threefry2x32", "iota", "rng_bit_generator"}
CONTROL_FLOW = _compat.SCAN | _compat.COND | _compat.WHILE | _compat.REMAT

def register_primitive(name: str, category: str) -> None:
    """Declare how reward crosses a primitive the engine does not know.

    Args:
      name: the primitive's name as printed in a jaxpr.
      category: ``"structural"`` (moves values unchanged: reward moves with them),
        ``"elementwise"`` (may be part of an activation region), ``"mixing"`` (linear in its one
        input-dependent operand: gets the ε rule), or ``"routing"`` (selects one input per output).
    """
    table = {"structural": STRUCTURAL, "elementwise": ELEMENTWISE, "mixing": MIXING, "routing": ROUTING}
    if category not in table:
        raise ValueError(f"category must be one of {sorted(table)}, got {category!r}")
    table[category].add(name)


@dataclasses.dataclass(eq=False)
class Site:
    """A place where one rule decides how reward crosses.

    Attributes:
      kind: ``linear``, ``sum``, ``pool``, ``max_pool``, ``activation``, ``normalization``,
        ``softmax``, ``dropout``, ``bilinear`` or ``nonlinear``.
      label: what it computes (``dense``, ``conv``, ``relu``, ``silu``, ``batch_norm``, ...).
      nodes: indices of its primitives in the graph, in order.
      operands: its external inputs (graph values or constants), reward-carrying ones first.
      output: the value it hands on; ``extras`` are inner values used elsewhere without reward.
      name_stack: Flax module path / named scope ('' for none); source_line: the user's code.
      rule: the rule chosen by the composite.
    """

    kind: str
    label: str
    nodes: tuple[int, ...]
    operands: tuple[Any, ...]
    output: int
    extras: tuple[int, ...]
    name_stack: str
    source_line: str
    primitives: tuple[str, ...]
    rule: Any = None
    input_epsilon: float = 0.0
    carries_reward: tuple[bool, ...] = ()


@dataclasses.dataclass(eq=False)
class Plan:
    """The analysis of one graph: what the interpreter needs to evaluate it with rules."""

    graph: Graph
    tainted: set
    sites: list
    site_of_node: dict  # node index -> Site (the site is evaluated at its last node)
    stabilize: dict  # value id -> ε of the block whose output it is, where a block boundary wraps it
    wrapped_edges: set  # (node index, operand position) reading the stabilised value
    wrapped_outputs: set  # graph output positions reading the stabilised value
    subplans: dict  # node index -> {param key: Plan | tuple[Plan, ...]}
    output_epsilon: dict  # output position -> ε of the block producing it (for the seed)
    schedule: list = dataclasses.field(default_factory=list)  # node indices and Sites, in order


VROOT, VSINK = -1, -2


def analyse(graph: Graph, in_taint: list[bool], out_relevant: list[bool], composite: Any, *,
            in_eps: list | None = None, wrap_out: list | None = None) -> Plan:
    """Find the sites of ``graph`` and resolve their rules.

    Args:
      graph: the flattened model.
      in_taint: per input, whether it is input-dependent (carries reward).
      out_relevant: per output, whether it receives reward.
      composite: chooses the rule of each site.
      in_eps: per input, the ε of the block whose not-yet-stabilised output it is (sub-graphs).
      wrap_out: per output, stabilise a pending block output inside this graph (default: no, its ε
        is reported in ``Plan.output_epsilon`` for the caller: the seed, or the enclosing graph).
    """
    n_in, n_out = len(graph.inputs), len(graph.outputs)
    return _Analysis(graph, in_taint, out_relevant, composite,
                     list(in_eps) if in_eps is not None else [None] * n_in,
                     list(wrap_out) if wrap_out is not None else [False] * n_out).run()


def output_taint(graph: Graph, in_taint: list[bool]) -> list[bool]:
    tainted = _taint(graph, in_taint)[0]
    return [isinstance(o, int) and o in tainted for o in graph.outputs]


def _taint(graph: Graph, in_taint: list[bool]) -> tuple[set, dict]:
    """Input-dependent values of ``graph``, and the input taint of each control-flow sub-graph."""
    tainted = {v for v, t in zip(graph.inputs, in_taint) if t}
    sub_in: dict[int, dict] = {}
    for i, node in enumerate(graph.nodes):
        tin = [isinstance(a, int) and a in tainted for a in node.inputs]
        if not any(tin) or node.name in NO_REWARD:
            continue
        if node.subgraphs:
            out_t, sub_in[i] = _control_flow_taint(node, tin)
        else:
            out_t = [True] * len(node.outputs)
        tainted.update(o for o, t in zip(node.outputs, out_t) if t and o is not None)
    return tainted, sub_in


def _control_flow_taint(node: Node, tin: list[bool]) -> tuple[list[bool], dict]:
    name = node.name
    if name in _compat.SCAN:
        n_consts, n_carry = _compat.scan_layout(node.params)
        body = node.subgraphs["jaxpr"]
        carry = tin[n_consts:n_consts + n_carry]
        while True:
            body_in = tin[:n_consts] + carry + tin[n_consts + n_carry:]
            out = output_taint(body, body_in)
            new = [a or b for a, b in zip(carry, out[:n_carry])]
            if new == carry:
                return out, {"jaxpr": body_in}
            carry = new
    if name in _compat.COND:
        branches = node.subgraphs["branches"]
        outs = [output_taint(b, tin[1:]) for b in branches]
        return [any(col) for col in zip(*outs)], {"branches": tin[1:]}
    if name in _compat.WHILE:
        nc, nb = _compat.while_layout(node.params)
        carry = tin[nc + nb:]
        while True:
            out = output_taint(node.subgraphs["body_jaxpr"], tin[nc:nc + nb] + carry)
            new = [a or b for a, b in zip(carry, out)]
            if new == carry:
                return carry, {}
            carry = new
    if name in _compat.REMAT:
        return output_taint(node.subgraphs["jaxpr"], tin), {"jaxpr": tin}
    raise NoRuleError(
        f"the higher-order primitive `{name}` at {node.where} receives "
        f"input-dependent values, and lfp_jax cannot look inside it (supported: jit, custom_jvp, "
        f"custom_vjp, scan, cond, while without input-dependent carries, remat). Move it out of the "
        f"model or apply it outside the function given to lfp_jax."
    )


class _Analysis:
    def __init__(self, graph: Graph, in_taint, out_relevant, composite, in_eps, wrap_out):
        self.g = graph
        self.in_eps, self.wrap_out = in_eps, wrap_out
        self.composite = composite
        self.tainted, self.sub_in = _taint(graph, in_taint)
        self.producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o is not None}
        self.uses: dict[int, set[int]] = {}
        for i, n in enumerate(graph.nodes):
            for a in n.inputs:
                if isinstance(a, int):
                    self.uses.setdefault(a, set()).add(i)
        self.graph_outputs = {o for o in graph.outputs if isinstance(o, int)}
        self._relevance(out_relevant)

    # -- reachability ---------------------------------------------------------------------------

    def _relevance(self, out_relevant):
        g = self.g
        self.relevant = {o for o, r in zip(g.outputs, out_relevant)
                         if r and isinstance(o, int) and o in self.tainted}
        self.rel_nodes: set[int] = set()
        for i in reversed(range(len(g.nodes))):
            node = g.nodes[i]
            if any(o in self.relevant for o in node.outputs if o is not None):
                self.rel_nodes.add(i)
                self.relevant.update(a for a in node.inputs if self._t(a))
        self.consumers: dict[int, list[int]] = {}
        for i in sorted(self.rel_nodes):
            for a in g.nodes[i].inputs:
                if self._t(a):
                    self.consumers.setdefault(a, []).append(i)
        self.out_vars = {o for o in g.outputs if isinstance(o, int) and o in self.relevant}

    def _t(self, a) -> bool:
        return isinstance(a, int) and a in self.tainted

    def _tin(self, i) -> list[int]:
        return [a for a in self.g.nodes[i].inputs if self._t(a)]

    def _tout(self, i) -> list[int]:
        return [o for o in self.g.nodes[i].outputs if o is not None and o in self.relevant]

    # -- categories -----------------------------------------------------------------------------

    def category(self, i: int) -> str:
        node = self.g.nodes[i]
        name = node.name
        tf = [self._t(a) and is_float(self.g.aval(a)) for a in node.inputs]
        if node.subgraphs:
            return "control"
        if name == "select_n":
            return "nonlinear" if self._t(node.inputs[0]) else "structural"
        if name == "convert_element_type":
            ok = is_float(self.g.aval(node.inputs[0])) and is_float(self.g.avals[node.outputs[0]])
            return "structural" if ok else "nonlinear"
        if name in STRUCTURAL:
            return "structural"
        if name in ROUTING:
            return "routing"
        if name in ("dot_general", "conv_general_dilated"):
            return "mixing" if sum(tf) == 1 else "bilinear"
        if name in ("add", "sub", "add_any"):
            return "mixing" if sum(tf) == 2 else "affine"
        if name == "mul":
            return "affine" if sum(tf) == 1 and not any(self._t(a) and not f for a, f in
                                                        zip(node.inputs, tf)) else "nonlinear"
        if name == "div":
            return "affine" if tf[0] and not self._t(node.inputs[1]) else "nonlinear"
        if name == "neg":
            return "affine"
        if name in MIXING:
            return "mixing"
        if name in ELEMENTWISE:
            return "nonlinear"
        return "unknown"

    # -- dominators -----------------------------------------------------------------------------

    def _dominators(self):
        self.idom, self.depth = {}, {VROOT: 0}
        for v in self.g.inputs:
            if v in self.relevant:
                self.idom[v], self.depth[v] = VROOT, 1
        for i in sorted(self.rel_nodes):
            preds = self._tin(i)
            d = functools.reduce(self._lca_dom, preds) if preds else VROOT
            for o in self.g.nodes[i].outputs:
                if o is not None and o in self.tainted:
                    self.idom[o], self.depth[o] = d, self.depth[d] + 1
        self.ipdom, self.pdepth = {}, {VSINK: 0}
        order = [o for i in sorted(self.rel_nodes, reverse=True) for o in self._tout(i)]
        order += [v for v in self.g.inputs if v in self.relevant]
        for v in order:
            succs = [o for c in self.consumers.get(v, []) for o in self._tout(c)]
            if v in self.out_vars:
                succs.append(VSINK)
            d = functools.reduce(self._lca_pdom, succs) if succs else VSINK
            self.ipdom[v], self.pdepth[v] = d, self.pdepth[d] + 1

    def _lca_dom(self, a, b):
        return _lca(a, b, self.idom, self.depth)

    def _lca_pdom(self, a, b):
        return _lca(a, b, self.ipdom, self.pdepth)

    # -- regions --------------------------------------------------------------------------------

    def _between(self, x: int, v: int) -> set[int]:
        """Nodes on the paths from ``x`` to ``v`` (``x`` dominates ``v``)."""
        found, stack, seen = set(), [v], {v}
        while stack:
            u = stack.pop()
            if u == x:
                continue
            p = self.producer.get(u)
            if p is None:
                raise AssertionError("region input does not dominate its body")  # pragma: no cover
            found.add(p)
            for a in self._tin(p):
                if a not in seen:
                    seen.add(a)
                    stack.append(a)
        return found

    def _float_dominator(self, v: int) -> int:
        while v != VROOT and not is_float(self.g.avals[v]):
            v = self.idom[v]
        return v

    def _grow(self, region: set[int]) -> tuple[int, set[int], int] | None:
        """The smallest single-input, single-output region containing ``region`` (None if none)."""
        region = set(region)
        while True:
            ext = [u for r in region for u in self._tin(r) if self.producer.get(u) not in region]
            x = self._float_dominator(functools.reduce(self._lca_dom, ext))
            if x == VROOT:
                return None
            new = set(region)
            for u in ext:
                if u != x:
                    new |= self._between(x, u)
            esc = self._escaping(new)
            if len(esc) != 1:
                y = functools.reduce(self._lca_pdom, esc)
                if y == VSINK:
                    return None
                x = self._float_dominator(self._lca_dom(x, y))
                if x == VROOT:
                    return None
                new |= self._between(x, y)
            elif new == region:
                return x, region, esc[0]
            region = new

    def _escaping(self, region: set[int]) -> list[int]:
        esc = []
        for r in sorted(region):
            for o in self._tout(r):
                if o in self.out_vars or any(c not in region for c in self.consumers.get(o, [])):
                    esc.append(o)
        return esc

    def _classify_region(self, x: int, region: set[int], y: int) -> tuple[str, str]:
        g = self.g
        names = [g.nodes[r].name for r in sorted(region)]
        shape = g.avals[x].shape
        elementwise = all(
            g.nodes[r].name in ELEMENTWISE
            and all(g.aval(a).shape == shape for a in self._tin(r))
            and all(g.avals[o].shape == shape for o in g.nodes[r].outputs if o is not None)
            for r in region
        )
        if elementwise and g.avals[y].shape == shape:
            return "activation", _activation_label(g, sorted(region), self.scope_sizes)
        if "dot_general" in names or "conv_general_dilated" in names:
            return "nonlinear", "+".join(sorted(set(names)))
        if "reduce_sum" in names and ({"rsqrt", "sqrt"} & set(names)):
            return "normalization", _norm_label(g, sorted(region), x)
        if {"exp", "reduce_sum", "div"} <= set(names):
            return "softmax", "softmax"
        return "nonlinear", "+".join(sorted(set(names)))

    # -- the whole analysis ---------------------------------------------------------------------

    def run(self) -> Plan:
        g = self.g
        self._dominators()
        cats = {i: self.category(i) for i in self.rel_nodes if self._tin(i)}
        self.scope_sizes: dict = {}
        for i in cats:
            for entry in g.nodes[i].scope:
                self.scope_sizes[entry] = self.scope_sizes.get(entry, 0) + 1
        region_of: dict[int, tuple] = {}  # node -> (x, region set, y, kind, label)
        singles: dict[int, tuple[str, str]] = {}
        for i in sorted(cats, reverse=True):
            cat = cats[i]
            if i in region_of or cat not in ("nonlinear", "unknown", "bilinear"):
                continue
            if cat == "unknown":
                raise NoRuleError(_unknown_message(g.nodes[i]))
            grown = None if cat == "bilinear" else self._grow({i})
            kind = None
            for _ in range(3):  # e.g. exp(x)/Σexp(x): the division alone is no known block
                if grown is None:
                    break
                x, region, y = grown
                for r in list(region):  # absorb regions found earlier that this one overlaps
                    if r in region_of:
                        region |= region_of[r][1]
                kind, label = self._classify_region(x, region, y)
                if kind != "nonlinear" or x not in self.producer:
                    break
                wider = self._grow(region | {self.producer[x]})
                if wider is None:
                    break
                grown = wider
            if kind in ("activation", "normalization", "softmax"):
                info = (x, region, y, kind, label)
                for r in region:
                    region_of[r] = info
            elif g.nodes[i].name in ("mul", "div", "dot_general", "conv_general_dilated"):
                singles[i] = ("bilinear", g.nodes[i].name)
            elif grown is not None:
                info = (x, region, y, kind, label)
                for r in region:
                    region_of[r] = info
            else:
                raise NoRuleError(_unknown_message(g.nodes[i], combined=True))
        return self._build_plan(cats, region_of, singles)

    def _build_plan(self, cats, region_of, singles) -> Plan:
        g = self.g
        sites: list[Site] = []
        site_of_node: dict[int, Site] = {}
        seen_regions = set()
        for i in sorted(cats):
            if i in region_of:
                x, region, y, kind, label = region_of[i]
                if id(region) in seen_regions:
                    continue
                seen_regions.add(id(region))
                site = self._make_site(kind, label, sorted(region), [x], y)
            elif i in singles:
                site = self._make_site(*singles[i], [i], None, None)
            else:
                site = self._single_site(i, cats)
                if site is None:
                    continue
            sites.append(site)
            for r in site.nodes:
                site_of_node[r] = site
        plan = Plan(g, self.tainted, sites, site_of_node, {}, set(), set(), {}, {})
        plan.schedule = self._schedule(site_of_node)
        self._resolve_rules(plan, cats)
        return plan

    def _schedule(self, site_of_node: dict) -> list:
        """A topological order of nodes in which each site is one step.

        A site is evaluated as a whole, so values computed inside it (e.g. batch statistics that a
        BatchNorm also stores) are available only after it; consumers outside wait for it.
        """
        g = self.g
        unit = [site_of_node.get(i, i) for i in range(len(g.nodes))]
        done, order = set(), []
        for start in range(len(g.nodes)):
            stack = [(unit[start], False)]
            while stack:
                u, expanded = stack.pop()
                key = id(u) if isinstance(u, Site) else u
                if key in done:
                    continue
                if expanded:
                    done.add(key)
                    order.append(u)
                    continue
                stack.append((u, True))
                members = u.nodes if isinstance(u, Site) else (u,)
                for r in members:
                    for a in g.nodes[r].inputs:
                        p = self.producer.get(a) if isinstance(a, int) else None
                        if p is not None and unit[p] is not u:
                            pu = unit[p]
                            if (id(pu) if isinstance(pu, Site) else pu) not in done:
                                stack.append((pu, False))
        return order

    def _single_site(self, i: int, cats) -> Site | None:
        node, cat = self.g.nodes[i], cats[i]
        name = node.name
        if cat == "mixing":
            kind, label = {
                "dot_general": ("linear", "dense"),
                "conv_general_dilated": ("linear", "conv"),
                "reduce_window_sum": ("pool", "avg_pool"),
                "reduce_sum": ("pool", "reduce_sum"),
                "cumsum": ("pool", "cumsum"),
            }.get(name, ("sum", "sum") if name in ("add", "sub", "add_any") else ("pool", name))
            return self._make_site(kind, label, [i], None, None)
        if cat == "routing":
            return self._make_site("max_pool", name.replace("reduce_window_", "") + "_pool"
                                   if "window" in name else name, [i], None, None)
        if cat == "structural" and name == "select_n":
            return self._dropout_site(i)
        return None

    def _dropout_site(self, i: int) -> Site | None:
        """``select_n(mask, 0, x / keep)`` with a mask that does not depend on the input."""
        node = self.g.nodes[i]
        cases = [a for a in node.inputs[1:] if self._t(a)]
        if len(cases) != 1:
            return None
        p = self.producer.get(cases[0])
        if p is None or len(self.consumers.get(cases[0], [])) != 1:
            return None
        scale = self.g.nodes[p]
        if scale.name not in ("mul", "div") or len(self._tin(p)) != 1:
            return None
        const = [a for a in scale.inputs if not self._t(a)]
        if not const or self.g.aval(const[0]).shape != ():
            return None
        return self._make_site("dropout", "dropout", [p, i], None, None)

    def _make_site(self, kind, label, nodes, sources, output) -> Site:
        g = self.g
        nodes = sorted(nodes)
        inside = {o for r in nodes for o in g.nodes[r].outputs if o is not None}
        operands, seen = [], set()
        for r in nodes:
            for a in g.nodes[r].inputs:
                key = a if isinstance(a, int) else id(a)
                if (isinstance(a, int) and a in inside) or key in seen:
                    continue
                seen.add(key)
                operands.append(a)
        carries = [self._t(a) and is_float(g.aval(a)) for a in operands]
        order = sorted(range(len(operands)), key=lambda k: not carries[k])
        operands = [operands[k] for k in order]
        if output is None:
            output = [o for o in g.nodes[nodes[-1]].outputs if o is not None][0]
        extras = tuple(
            o for r in nodes for o in g.nodes[r].outputs
            if o is not None and o != output and self._used_outside(o, set(nodes))
        )
        first = g.nodes[nodes[0]]
        return Site(
            kind=kind, label=label, nodes=tuple(nodes), operands=tuple(operands), output=output,
            extras=extras, name_stack=first.path, source_line=first.where,
            primitives=tuple(g.nodes[r].name for r in nodes),
            carries_reward=tuple(carries[k] for k in order),
        )

    def _used_outside(self, v: int, nodes: set[int]) -> bool:
        return v in self.graph_outputs or bool(self.uses.get(v, set()) - nodes)

    # -- rules and block boundaries -------------------------------------------------------------

    def _resolve_rules(self, plan: Plan, cats) -> None:
        """Choose each site's rule, then walk the graph placing block-output stabilisers.

        ``eps[v]`` is the ε of the block whose output ``v`` is, while that output has not entered
        another block yet. An edge from such a value into a block (a linear, sum, pool, normalisation
        ... site) passes it through the stabiliser; an activation takes the ε into its own
        ``φ(x)/stab(x)``; affine, structural and routing primitives extend the block.
        """
        g = self.g
        for site in plan.sites:
            site.rule = self.composite.resolve(site)
        eps: dict[int, float] = {
            v: e for v, e in zip(g.inputs, self.in_eps) if e is not None and v in self.tainted}

        def pending(a):
            return eps.get(a) if isinstance(a, int) and is_float(g.aval(a)) else None

        def wrap(i, pos, a):
            e = pending(a)
            if e is not None:
                plan.stabilize[a] = e
                plan.wrapped_edges.add((i, pos))

        for step in plan.schedule:
            if isinstance(step, Site):
                site = step
                if site.kind == "activation":
                    e = pending(site.operands[0])
                    site.input_epsilon = self.composite.epsilon if e is None else e
                elif site.kind in _BLOCK_KINDS:
                    inside = {o for r in site.nodes for o in g.nodes[r].outputs}
                    for r in site.nodes:
                        for pos, a in enumerate(g.nodes[r].inputs):
                            if not (isinstance(a, int) and a in inside):
                                wrap(r, pos, a)
                e = site.rule.output_epsilon if site.kind in _BLOCK_KINDS else pending(site.operands[0])
                if e is not None and site.kind in _BLOCK_KINDS + ("max_pool", "dropout"):
                    eps[site.output] = e
                continue
            i = step
            cat = cats.get(i)
            if cat in ("affine", "structural", "routing"):
                tin = [a for a in self._tin(i) if is_float(g.aval(a))]
                if len(tin) == 1 and pending(tin[0]) is not None:
                    for o in g.nodes[i].outputs:
                        if o is not None:
                            eps[o] = eps[tin[0]]
            elif cat == "control":
                self._control_flow(plan, i, pending, wrap, eps)
        for pos, o in enumerate(g.outputs):
            e = pending(o)
            if e is None:
                continue
            if self.wrap_out[pos]:
                plan.stabilize[o] = e
                plan.wrapped_outputs.add(pos)
            else:
                plan.output_epsilon[pos] = e

    def _control_flow(self, plan: Plan, i: int, pending, wrap, eps) -> None:
        """Analyse the sub-graphs of a control-flow node; block state flows into and out of them."""
        node = self.g.nodes[i]
        sub_in = self.sub_in.get(i)
        if sub_in is None:
            return
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
            body = _subplan(node.subgraphs["jaxpr"], sub_in["jaxpr"], self.composite, in_eps,
                            [k < n_carry for k in range(n_out)])
            plan.subplans[i] = {"jaxpr": body}
            outs = [body.output_epsilon.get(k) for k in range(n_out)]
        elif node.name in _compat.COND:
            branches = node.subgraphs["branches"]
            plans = [_subplan(b, sub_in["branches"], self.composite, in_eps[1:], [False] * n_out)
                     for b in branches]
            agree = [len({p.output_epsilon.get(k) for p in plans}) == 1 for k in range(n_out)]
            if not all(agree):
                plans = [_subplan(b, sub_in["branches"], self.composite, in_eps[1:],
                                  [not a for a in agree]) for b in branches]
            plan.subplans[i] = {"branches": tuple(plans)}
            outs = [plans[0].output_epsilon.get(k) for k in range(n_out)]
        else:  # remat
            body = _subplan(node.subgraphs["jaxpr"], sub_in["jaxpr"], self.composite, in_eps,
                            [False] * n_out)
            plan.subplans[i] = {"jaxpr": body}
            outs = [body.output_epsilon.get(k) for k in range(n_out)]
        for o, e in zip(node.outputs, outs):
            if o is not None and e is not None:
                eps[o] = e


_BLOCK_KINDS = ("linear", "sum", "pool", "normalization", "softmax", "bilinear", "nonlinear")


def _subplan(graph: Graph, taint: list[bool], composite: Any, in_eps: list, wrap_out: list) -> Plan:
    return analyse(graph, taint, output_taint(graph, taint), composite, in_eps=in_eps,
                   wrap_out=wrap_out)


def _lca(a: int, b: int, parent: dict, depth: dict) -> int:
    while a != b:
        if depth[a] < depth[b]:
            a, b = b, a
        a = parent[a]
    return a


# Checked in order; the first signature contained in a region's primitives names it.
_ACTIVATION_SIGNATURES = [
    ({"erf"}, "gelu"), ({"erfc"}, "gelu"), ({"integer_pow", "tanh"}, "gelu"), ({"logistic", "mul"}, "silu"),
    ({"expm1"}, "elu"), ({"log1p", "exp"}, "softplus"), ({"ge", "select_n", "mul"}, "leaky_relu"),
    ({"gt", "select_n", "mul"}, "leaky_relu"), ({"convert_element_type"}, "step"),
    ({"select_n"}, "step"), ({"sign"}, "step"), ({"tanh"}, "tanh"), ({"logistic"}, "sigmoid"),
    ({"max"}, "relu"),
]
_GENERIC_CALLS = _compat.INLINE_CALLS


def _activation_label(g: Graph, nodes: list[int], scope_sizes: dict) -> str:
    """The name of a jit/custom_jvp call holding exactly this region (``relu``, ``silu``, ...), else a
    guess from the primitives it contains."""
    common = set.intersection(*(set(g.nodes[r].scope) for r in nodes))
    for entry in g.nodes[nodes[0]].scope:
        name = entry[0]
        if (entry in common and scope_sizes[entry] == len(nodes) and not name.startswith("_")
                and name not in _GENERIC_CALLS):
            return name
    names = {g.nodes[r].name for r in nodes}
    for signature, label in _ACTIVATION_SIGNATURES:
        if signature <= names:
            return label
    return "elementwise"


def _norm_label(g: Graph, nodes: list[int], x: int) -> str:
    stacks = " ".join(g.nodes[r].path for r in nodes)
    for word, label in (("BatchNorm", "batch_norm"), ("LayerNorm", "layer_norm"),
                        ("GroupNorm", "group_norm"), ("RMSNorm", "rms_norm")):
        if word in stacks:
            return label
    for r in nodes:
        node = g.nodes[r]
        if node.name == "reduce_sum" and x in node.inputs:
            return "batch_norm" if 0 in node.params.get("axes", ()) else "layer_norm"
    return "normalization"


def _unknown_message(node: Node, combined: bool = False) -> str:
    where, path = node.where, node.path
    at = f"{where}" + (f" (in {path})" if path else "")
    if combined:
        return (
            f"the input-dependent primitive `{node.name}` at {at} combines values in a way no "
            f"feedback rule covers (it is neither an activation of one value, a normalisation, nor a "
            f"product of two values). LFP never falls back to the plain gradient silently."
        )
    return (
        f"lfp_jax has no feedback rule for the input-dependent primitive `{node.name}` at {at}. LFP "
        f"never falls back to the plain gradient silently. If `{node.name}` acts elementwise, moves "
        f"values, or is linear in its input, declare it with "
        f"lfp_jax.sites.register_primitive({node.name!r}, 'elementwise' | 'structural' | 'mixing')."
    )


def iter_sites(plan: Plan, depth: int = 0) -> Iterable[tuple[int, Site]]:
    """All sites of a plan and its sub-plans, with their nesting depth."""
    for step in plan.schedule:
        if isinstance(step, Site):
            yield depth, step
            continue
        for sub in plan.subplans.get(step, {}).values():
            for s in sub if isinstance(sub, tuple) else (sub,):
                yield from iter_sites(s, depth + 1)


__all__ = ["Site", "Plan", "analyse", "register_primitive", "iter_sites", "Lit"]
