"""Data flow of a graph: which values depend on the inputs, along which edges reward can flow, which
values reach a rewarded output, and the dominator trees (a value's immediate dominator is the last
value every path from the inputs to it passes; its immediate post-dominator the first value every path
from it to the outputs passes).

Reward is carried by floating-point values only. A value computed from the inputs that is an integer or
a boolean (an arg-max index, a sequence length, a comparison mask, a ``cond`` predicate) is
*input-dependent* but carries no reward: where it selects, indexes or masks other values it acts as a
constant selector, as in ``x[argmax(h)]`` or ``where(t < length, new, old)``. A floating-point value
computed only from such values (``one_hot(argmax(h))``) is a constant for the reward flow, except where
it is an elementwise function of one floating-point value of the same shape: ``(x > 0).astype(f)``,
``where(x > 0, 1., 0.)`` and ``where(x > 0, x, a·x)`` are activations of ``x`` (a Heaviside step, a
leaky ReLU), and their comparisons are part of the activation's site.
"""

from __future__ import annotations

import dataclasses
import functools

from lfp_jax import _compat, _embedding
from lfp_jax._graph import Graph, Node, is_float
from lfp_jax._primitives import ELEMENTWISE, MOVES, NO_REWARD
from lfp_jax.errors import NoRuleError

VROOT, VSINK = -1, -2


@dataclasses.dataclass
class Taint:
    """The result of :func:`taint`.

    Attributes:
      tainted: input-dependent values (any dtype); floats detached from the inputs by integer or
        boolean steps are not among them.
      edges: per node, the positions of its inputs along which reward flows into it.
      selectors: nodes whose input-dependent integer/boolean inputs act as constant selectors.
      unclassified: nodes that make a float from input-dependent integers/booleans in a way that is
        neither an activation nor a selection (a comparison moved or stacked before its cast): refused.
      sub_in: per control-flow node, the input taint of each of its sub-graphs.
      sources: per input-dependent value, a bit mask of the graph inputs' ``in_src`` masks it comes from.
      classes: per input-dependent integer/boolean value, its :class:`IndexClass`.
      compare_selects: ``where(a > b, a, b)`` and the like: a max or min of two values.
      roles: per value, its :mod:`~lfp_jax._embedding` role (id value, parameter value, constant).
      embeddings: per embedding lookup node, ``(label, positions of its id operands)``; its outputs
        are reward sources.
      sub_roles: per control-flow node, the roles of each of its sub-graphs' inputs.
    """

    tainted: set
    edges: dict
    selectors: set
    unclassified: set
    sub_in: dict
    sources: dict
    classes: dict
    compare_selects: set = dataclasses.field(default_factory=set)
    roles: dict = dataclasses.field(default_factory=dict)
    embeddings: dict = dataclasses.field(default_factory=dict)
    sub_roles: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class IndexClass:
    """How an input-dependent integer or boolean value was computed from floating-point values.

    Attributes:
      sources: the floating-point values (or opaque integer inputs of a sub-graph) it comes from.
      pure: every path from them is elementwise with one shape (a comparison, its negation, ...):
        converted back to float it is an activation (a Heaviside) of those values.
      step: some path avoids index-making primitives (arg-max, counts, sort indices) but is not pure
        (the comparison is reshaped, broadcast or stacked by a loop before it is used).
    """

    sources: frozenset
    pure: bool
    step: bool

    def join(self, other: IndexClass) -> IndexClass:
        return IndexClass(self.sources | other.sources, self.pure and other.pure, self.step or other.step)


_NO_CLASS = IndexClass(frozenset(), True, False)


def output_taint(graph: Graph, in_taint: list[bool], in_roles: list | None = None) -> list[bool]:
    """Per output of ``graph``: whether it is a floating-point value that depends on the inputs."""
    tainted = taint(graph, in_taint, in_roles=in_roles).tainted
    return [isinstance(o, int) and o in tainted and is_float(graph.aval(o)) for o in graph.outputs]


def taint(graph: Graph, in_taint: list[bool], in_src: list[int] | None = None,
          in_class: list | None = None, in_roles: list | None = None) -> Taint:
    """Input-dependent values of ``graph`` and the edges reward flows along (see the module docstring).

    ``in_class`` gives the :class:`IndexClass` of input-dependent integer/boolean inputs (sub-graphs);
    without it they count as indices. ``in_roles`` gives each input's role (token ids, a parameter;
    see :mod:`lfp_jax._embedding`): the outputs of embedding lookups are input-dependent.
    """
    tainted = {v for v, t in zip(graph.inputs, in_taint) if t}
    src = {v: (in_src[k] if in_src else 0) for k, v in enumerate(graph.inputs)
           if in_taint[k] or (in_roles and in_roles[k] == _embedding.IDS)}
    roles = {v: r for v, r in zip(graph.inputs, in_roles or ()) if r is not None and v not in tainted}
    classes = {}
    for k, v in enumerate(graph.inputs):
        if in_taint[k] and not is_float(graph.avals[v]):
            given = in_class[k] if in_class else None
            classes[v] = given if given is not None else IndexClass(frozenset({v}), False, False)
    result = Taint(tainted, {}, set(), set(), {}, src, classes, roles=roles)
    frontier = _Frontier(graph, tainted)
    for i, node in enumerate(graph.nodes):
        tin = [p for p, a in enumerate(node.inputs) if isinstance(a, int) and a in tainted]
        if not tin and roles:
            found = _embedding.lookup(graph, node, roles)
            if found is not None:  # an embedding lookup: a reward source
                result.embeddings[i] = found
                result.edges[i] = ()
                mask = functools.reduce(lambda m, p: m | src.get(node.inputs[p], 0), found[1], 0)
                for o in node.outputs:
                    if o is not None:
                        tainted.add(o)
                        src[o] = mask
                continue
            r = _embedding.role(node, roles, tainted)
            if r is not None:
                for o in node.outputs:
                    if o is not None:
                        roles[o] = r
                        if r == _embedding.IDS:
                            src[o] = functools.reduce(
                                lambda m, a: m | src.get(a, 0) if isinstance(a, int) else m, node.inputs, 0)
            elif node.subgraphs and any(isinstance(a, int) and roles.get(a) == _embedding.IDS
                                        for a in node.inputs):
                flags = [False] * len(node.inputs)
                out_t, result.sub_in[i], result.sub_roles[i] = _control_flow_taint(
                    node, flags, [roles.get(a) if isinstance(a, int) else None for a in node.inputs])
                if any(out_t):
                    result.edges[i] = ()
                    for o, t in zip(node.outputs, out_t):
                        if t and o is not None and is_float(graph.avals[o]):
                            tainted.add(o)
                            src[o] = functools.reduce(
                                lambda m, a: m | src.get(a, 0) if isinstance(a, int) else m, node.inputs, 0)
            continue
        if not tin or node.name in NO_REWARD:
            continue
        floats = [p for p in tin if is_float(graph.aval(node.inputs[p]))]
        index = [p for p in tin if p not in floats]
        mask = functools.reduce(lambda m, p: m | src.get(node.inputs[p], 0), tin, 0)
        if node.subgraphs:
            flags = [p in tin for p in range(len(node.inputs))]
            out_t, result.sub_in[i], result.sub_roles[i] = _control_flow_taint(
                node, flags, [roles.get(a) if isinstance(a, int) else None for a in node.inputs])
            result.edges[i] = tuple(floats)
            out_cls = _control_flow_classes(node, result.sub_in[i], flags,
                                            [classes.get(a) if isinstance(a, int) else None
                                             for a in node.inputs], result.sub_roles[i])
        else:
            out_cls = None
            decision = _decide(graph, node, floats, index, classes, frontier) if index else "reward"
            if decision == "reward":
                result.edges[i] = tuple(tin)
                out_t = [True] * len(node.outputs)
            else:
                # integer/boolean inputs select, index or mask: constants for the reward flow
                (result.unclassified if decision == "unclassified" else result.selectors).add(i)
                if decision == "compare":
                    result.compare_selects.add(i)
                result.edges[i] = tuple(floats)
                out_t = [bool(floats) or not is_float(graph.avals[o]) if o is not None else False
                         for o in node.outputs]
        for k, (o, t) in enumerate(zip(node.outputs, out_t)):
            if t and o is not None:
                tainted.add(o)
                src[o] = mask
                if not is_float(graph.avals[o]):
                    classes[o] = (out_cls[k] if out_cls is not None and out_cls[k] is not None else
                                  _index_class(graph, node, o, floats, index, classes))
    return result


def _shape_kept(graph: Graph, node: Node, positions: list[int], o: int) -> bool:
    shape = graph.avals[o].shape
    return all(graph.aval(node.inputs[p]).shape == shape for p in positions)


_POSITIONAL_MOVES = MOVES - {"argmax", "argmin", "iota", "sort", "top_k", "convert_element_type"}


def _index_class(graph: Graph, node: Node, o: int, floats: list, index: list, classes: dict) -> IndexClass:
    """The :class:`IndexClass` of the integer/boolean output ``o`` of ``node``."""
    elementwise = node.name in ELEMENTWISE and _shape_kept(graph, node, floats + index, o)
    move = node.name in _POSITIONAL_MOVES
    own = IndexClass(frozenset(node.inputs[p] for p in floats), elementwise, elementwise or move)
    cls = own if floats else _NO_CLASS
    for p in index:
        c = classes.get(node.inputs[p], _NO_CLASS)
        cls = cls.join(IndexClass(c.sources, c.pure and elementwise, c.step and (elementwise or move)))
    if not floats and not index:  # pragma: no cover - tainted outputs have tainted inputs
        return _NO_CLASS
    return cls


def _decide(graph: Graph, node: Node, floats: list[int], index: list[int], classes: dict,
            frontier: _Frontier) -> str:
    """What a node whose integer/boolean inputs are input-dependent does with them.

    ``"compare"``: ``where(a > b, a, b)`` (or ``<``, ``>=``, ...), the max or min of two values;
    ``"reward"``: it is part of an activation (an elementwise function of the values its comparisons
    are taken of: ``(x > 0).astype(f)``, ``where(x > 0, x, a·x)``, and the comparisons themselves);
    ``"selector"``: the integers/booleans select, index or mask as constants would (an arg-max, a
    length, a mask computed from other values); ``"unclassified"``: a float made from a comparison
    that was moved, stacked or combined with an index first, which lfp_jax refuses.
    """
    outs = [o for o in node.outputs if o is not None]
    cls = functools.reduce(IndexClass.join, (classes.get(node.inputs[p], _NO_CLASS) for p in index))
    makes_float = any(is_float(graph.avals[o]) for o in outs)
    elementwise = node.name in ELEMENTWISE and _shape_kept(graph, node, floats + index, outs[0])
    if not makes_float:  # integer/boolean from integer/boolean: part of a chain, decided at its end
        return "reward" if elementwise and cls.pure else "selector"
    if node.name not in ELEMENTWISE:  # gather, dynamic_slice, scatter, sort of floats by an index
        return "selector"
    if floats and _compares_its_cases(node, floats, index, frontier):
        return "compare"  # where(a > b, a, b): the max of two values
    if floats:  # where(mask, a, b) of input-dependent a, b
        same = _frontier_of(frontier, cls.sources) == _frontier_of(frontier, [node.inputs[p] for p in floats])
        if not same:
            return "selector"  # a mask computed from other values
        return "reward" if elementwise else "unclassified"  # selecting by a comparison of the values
    if cls.pure and elementwise:
        return "reward"  # a Heaviside written as a comparison cast back to float
    return "unclassified" if cls.step else "selector"


def _compares_its_cases(node: Node, floats: list[int], index: list[int], frontier: _Frontier) -> bool:
    if node.name != "select_n" or index != [0] or len(floats) != 2:
        return False
    cmp = frontier.producer.get(node.inputs[0])
    if cmp is None or cmp.name not in ("gt", "ge", "lt", "le"):
        return False
    cases = {node.inputs[p] for p in floats}
    return all(isinstance(a, int) for a in cmp.inputs) and set(cmp.inputs) == cases and len(cases) == 2


def _frontier_of(frontier: _Frontier, values) -> frozenset:
    return frozenset().union(*(frontier.of(v) if v in frontier.tainted else frozenset({v})
                               for v in values))


class _Frontier:
    """``of(v)``: the values an input-dependent ``v`` is an elementwise, same-shape function of.

    Walking back from ``v`` through elementwise primitives whose inputs and outputs all have ``v``'s
    shape, the frontier is where the walk stops (a layer's output, a reduction, a graph input).
    """

    def __init__(self, graph: Graph, tainted: set):
        self.g, self.tainted, self.memo = graph, tainted, {}
        self.producer = {o: n for n in graph.nodes for o in n.outputs if o is not None}

    def of(self, v: int) -> frozenset:
        stack = [v]
        while stack:  # iterative, so long chains of residual additions do not recurse deeply
            u = stack[-1]
            if u in self.memo:
                stack.pop()
                continue
            node = self.producer.get(u)
            ins = self._elementwise_inputs(node, u)
            if ins is None:
                self.memo[u] = frozenset({u})
                stack.pop()
                continue
            todo = [a for a in ins if a not in self.memo]
            if todo:
                stack.extend(todo)
                continue
            self.memo[u] = frozenset().union(*(self.memo[a] for a in ins)) if ins else frozenset({u})
            stack.pop()
        return self.memo[v]

    def _elementwise_inputs(self, node: Node | None, v: int) -> list[int] | None:
        if node is None or node.name not in ELEMENTWISE:
            return None
        shape = self.g.avals[v].shape
        ins = [a for a in node.inputs if isinstance(a, int) and a in self.tainted]
        if any(self.g.aval(a).shape != shape for a in ins):
            return None
        if any(o is not None and self.g.avals[o].shape != shape for o in node.outputs):
            return None
        return ins


def _control_flow_taint(node: Node, tin: list[bool], roles: list | None = None
                        ) -> tuple[list[bool], dict, dict]:
    """Per output of a control-flow node: input-dependent; and per sub-graph the taint and the roles
    (:mod:`~lfp_jax._embedding`) of its inputs. Carries have no role: a value carried from step to step
    is neither the model's ids nor a parameter."""
    name = node.name
    roles = list(roles) if roles is not None else [None] * len(tin)
    if name in _compat.SCAN:
        n_consts, n_carry = _compat.scan_layout(node.params)
        body = node.subgraphs["jaxpr"]
        carry = tin[n_consts:n_consts + n_carry]
        body_roles = roles[:n_consts] + [None] * n_carry + roles[n_consts + n_carry:]
        while True:
            body_in = tin[:n_consts] + carry + tin[n_consts + n_carry:]
            out = _all_output_taint(body, body_in, body_roles)
            new = [a or b for a, b in zip(carry, out[:n_carry])]
            if new == carry:
                return out, {"jaxpr": body_in}, {"jaxpr": body_roles}
            carry = new
    if name in _compat.COND:
        branches = node.subgraphs["branches"]
        outs = [_all_output_taint(b, tin[1:], roles[1:]) for b in branches]
        return [any(col) for col in zip(*outs)], {"branches": tin[1:]}, {"branches": roles[1:]}
    if name in _compat.WHILE:
        nc, nb = _compat.while_layout(node.params)
        carry = tin[nc + nb:]
        while True:
            out = _all_output_taint(node.subgraphs["body_jaxpr"], tin[nc:nc + nb] + carry)
            new = [a or b for a, b in zip(carry, out)]
            if new == carry:
                return carry, {}, {}
            carry = new
    if name in _compat.REMAT:
        return _all_output_taint(node.subgraphs["jaxpr"], tin, roles), {"jaxpr": tin}, {"jaxpr": roles}
    raise NoRuleError(
        f"the higher-order primitive `{name}` at {node.where} receives "
        f"input-dependent values, and lfp_jax cannot look inside it (supported: jit, custom_jvp, "
        f"custom_vjp, scan, cond, while without input-dependent carries, remat). Move it out of the "
        f"model or apply it outside the function given to lfp_jax."
    )


def _control_flow_classes(node: Node, sub_in: dict, tin: list[bool], in_classes: list,
                          sub_roles: dict | None = None) -> list:
    """Per output of a control-flow node: the :class:`IndexClass` of an integer/boolean output (a
    comparison crossing the boundary is no longer *pure*: a site cannot reach into the body), else
    ``None``."""
    name = node.name
    sub_roles = sub_roles or {}
    if name in _compat.SCAN or name in _compat.REMAT:
        pairs = [(node.subgraphs["jaxpr"], sub_in["jaxpr"], in_classes, sub_roles.get("jaxpr"))]
    elif name in _compat.COND:
        pairs = [(b, sub_in["branches"], in_classes[1:], sub_roles.get("branches"))
                 for b in node.subgraphs["branches"]]
    elif name in _compat.WHILE:
        nc = _compat.while_layout(node.params)[0]
        pairs = [(node.subgraphs["body_jaxpr"], tin[nc:], in_classes[nc:], None)]
    else:  # pragma: no cover - other higher-order primitives are refused by _control_flow_taint
        return [None] * len(node.outputs)
    found: list = [None] * len(node.outputs)
    for graph, flags, given, roles in pairs:
        t = taint(graph, flags, in_class=given, in_roles=roles)
        outs = graph.outputs[-len(node.outputs):] if name in _compat.WHILE else graph.outputs
        for k, o in enumerate(outs[:len(node.outputs)]):
            c = t.classes.get(o) if isinstance(o, int) else None
            if c is not None:
                c = IndexClass(c.sources, False, c.step or c.pure)
                found[k] = c if found[k] is None else found[k].join(c)
    return found


def _all_output_taint(graph: Graph, in_taint: list[bool], in_roles: list | None = None) -> list[bool]:
    """Per output: input-dependent (integer and boolean values too: a loop counter may be one)."""
    tainted = taint(graph, in_taint, in_roles=in_roles).tainted
    return [isinstance(o, int) and o in tainted for o in graph.outputs]


def param_origins(graph: Graph, in_origin: list, tainted: set, roles: dict | None = None) -> dict:
    """For values computed from parameters only: ``(leaves, primitives)``, the parameter leaves they
    come from and the primitives applied on the way to the effective weight (see
    :mod:`lfp_jax._params`), other than moves (reshape, slice, casts, ...); scalings by values that are
    not parameters (the ``scale · rsqrt(var)`` of a BatchNorm in eval mode) are part of the layer.

    ``in_origin`` holds, per graph input, ``(leaves, primitives)`` or ``None`` (not a parameter).
    Control-flow outputs are attributed to all of the node's parameter inputs. Values that depend on
    the model inputs (``tainted``) have no origin.
    """
    origin = {v: o for v, o in zip(graph.inputs, in_origin) if o is not None}
    for node in graph.nodes:
        if any(isinstance(a, int) and a in tainted for a in node.inputs + node.outputs):
            continue  # input-dependent (an embedding lookup's output depends on the ids)
        found = [origin[a] for a in node.inputs if isinstance(a, int) and a in origin]
        if not found:
            continue
        leaves = frozenset().union(*(f[0] for f in found))
        prims = frozenset().union(*(f[1] for f in found))
        weight = any((roles or {}).get(o) == _embedding.PARAM for o in node.outputs if o is not None)
        if node.name not in MOVES and not node.subgraphs and weight:
            prims = prims | {node.name}  # a computation of the effective weight
        for o in node.outputs:
            if o is not None:
                origin[o] = (leaves, prims)
    return origin


class DataFlow:
    """Facts about one graph that the site finder needs."""

    def __init__(self, graph: Graph, in_taint: list[bool], out_relevant: list[bool],
                 in_src: list[int] | None = None, in_class: list | None = None,
                 in_roles: list | None = None):
        self.g = graph
        t = taint(graph, in_taint, in_src, in_class, in_roles)
        self.roles, self.embeddings, self.sub_roles = t.roles, t.embeddings, t.sub_roles
        self.tainted, self.edges, self.selectors = t.tainted, t.edges, t.selectors
        self.sub_in, self.sources, self.classes = t.sub_in, t.sources, t.classes
        self.unclassified, self.compare_selects = t.unclassified, t.compare_selects
        self.producer = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o is not None}
        self.uses: dict[int, set[int]] = {}
        for i, n in enumerate(graph.nodes):
            for a in n.inputs:
                if isinstance(a, int):
                    self.uses.setdefault(a, set()).add(i)
        self.graph_outputs = {o for o in graph.outputs if isinstance(o, int)}
        self._relevance(out_relevant)
        self._dominators()

    # -- reachability ---------------------------------------------------------------------------

    def _relevance(self, out_relevant):
        g = self.g
        self.relevant = {o for o, r in zip(g.outputs, out_relevant)
                         if r and isinstance(o, int) and o in self.tainted and is_float(g.aval(o))}
        self.rel_nodes: set[int] = set()
        for i in reversed(range(len(g.nodes))):
            node = g.nodes[i]
            if any(o in self.relevant for o in node.outputs if o is not None):
                self.rel_nodes.add(i)
                self.relevant.update(self._tin(i))
        self.consumers: dict[int, list[int]] = {}
        for i in sorted(self.rel_nodes):
            for a in self._tin(i):
                self.consumers.setdefault(a, []).append(i)
        self.out_vars = {o for o in g.outputs if isinstance(o, int) and o in self.relevant}

    def _t(self, a) -> bool:
        return isinstance(a, int) and a in self.tainted

    def _tin(self, i) -> list[int]:
        """The inputs of node ``i`` that reward flows into (without repeats)."""
        inputs = self.g.nodes[i].inputs
        return list(dict.fromkeys(inputs[p] for p in self.edges.get(i, ())))

    def _tout(self, i) -> list[int]:
        return [o for o in self.g.nodes[i].outputs if o is not None and o in self.relevant]

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


def _lca(a: int, b: int, parent: dict, depth: dict) -> int:
    while a != b:
        if depth[a] < depth[b]:
            a, b = b, a
        a = parent[a]
    return a
