"""Data flow of a graph: which values depend on the inputs, which reach a rewarded output, and the
dominator trees (a value's immediate dominator is the last value every path from the inputs to it
passes; its immediate post-dominator the first value every path from it to the outputs passes).
"""

from __future__ import annotations

import functools

from lfp_jax import _compat
from lfp_jax._graph import Graph, Node, is_float
from lfp_jax._primitives import NO_REWARD
from lfp_jax.errors import NoRuleError

VROOT, VSINK = -1, -2


def output_taint(graph: Graph, in_taint: list[bool]) -> list[bool]:
    tainted = taint(graph, in_taint)[0]
    return [isinstance(o, int) and o in tainted for o in graph.outputs]


def taint(graph: Graph, in_taint: list[bool]) -> tuple[set, dict]:
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


class DataFlow:
    """Facts about one graph that the site finder needs."""

    def __init__(self, graph: Graph, in_taint: list[bool], out_relevant: list[bool]):
        self.g = graph
        self.tainted, self.sub_in = taint(graph, in_taint)
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
