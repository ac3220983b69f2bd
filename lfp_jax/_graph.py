"""A flat, analysable copy of a jaxpr.

``build_graph`` turns a ``ClosedJaxpr`` into a :class:`Graph` whose values are small integers.
Call-like primitives whose inner jaxpr only *describes* a computation (``jit``, ``custom_jvp_call``,
``custom_vjp_call``) are inlined, so a ReLU written as ``custom_jvp_call{max(x, 0)}`` or a SiLU written
as ``jit[name=silu]{logistic, mul}`` become ordinary primitives the site finder can see. Their custom
derivative rules are dropped on purpose: LFP propagates reward through the forward computation, not
through a user's gradient rule. Control flow (``scan``, ``cond``, ``while``, ``remat``) stays one node
holding sub-graphs, so the rewritten program keeps its loops and checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np

from lfp_jax import _compat


@dataclasses.dataclass(frozen=True)
class Lit:
    """A constant operand: a jaxpr literal or a closed-over constant."""

    value: Any
    aval: Any


Atom = int | Lit


@dataclasses.dataclass(eq=False)
class Node:
    """One primitive application. ``subgraphs`` maps a param name to the graph(s) it holds."""

    prim: Any
    inputs: tuple[Atom, ...]
    outputs: tuple[int | None, ...]  # None: the output is dropped
    params: dict
    source_info: Any
    subgraphs: dict[str, Any] = dataclasses.field(default_factory=dict)
    scope: tuple = ()  # (name, uid) of each inlined jit / custom_jvp call around it, outermost first
    call_sources: tuple = ()  # source infos of those calls, innermost first
    prefix: str = ""  # module path of the equations holding this one (inlined calls, control flow)

    @property
    def name(self) -> str:
        return self.prim.name

    @property
    def where(self) -> str:
        """The user's source line that created this primitive (or the call it was inlined from)."""
        for info in (self.source_info,) + self.call_sources:
            line = _compat.user_line(info)
            if line is not None:
                return line
        return "<unknown location>"

    @property
    def path(self) -> str:
        """Flax module path / ``jax.named_scope`` of this primitive ('' when there is none).

        Name stacks inside ``jit`` calls and control-flow bodies are relative to the equation that
        holds them, so the enclosing paths are prefixed.
        """
        return _join(self.prefix, _compat.name_stack(self.source_info))


def _join(prefix: str, name: str) -> str:
    return "/".join(part for part in (prefix, name) if part)


@dataclasses.dataclass(eq=False)
class Graph:
    inputs: list[int]
    outputs: list[Atom]
    nodes: list[Node]
    avals: dict[int, Any]

    def aval(self, atom: Atom) -> Any:
        return atom.aval if isinstance(atom, Lit) else self.avals[atom]


_ids = itertools.count()


def is_float(aval: Any) -> bool:
    """Whether values of ``aval`` can carry reward (real or complex floating point, bf16 included)."""
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, np.inexact)


def build_graph(closed: Any, prefix: str = "", call_sources: tuple = ()) -> Graph:
    """Flatten ``closed`` (a ``ClosedJaxpr``) into a :class:`Graph`.

    ``prefix``: the enclosing module path; ``call_sources``: source infos of the equations holding this
    jaxpr (a scan body's primitives created inside a library, e.g. a Flax ``nn.RNN`` cell, point at the
    user's line that called the library).
    """
    closed = _compat.as_closed(closed)
    jaxpr = closed.jaxpr
    graph = Graph(inputs=[], outputs=[], nodes=[], avals={})
    env: dict[Any, Atom] = {}
    for var, const in zip(jaxpr.constvars, closed.consts):
        env[var] = Lit(const, var.aval)
    for var in jaxpr.invars:
        env[var] = _fresh(graph, var.aval)
        graph.inputs.append(env[var])
    _emit(jaxpr.eqns, env, graph, (), tuple(call_sources), prefix)
    graph.outputs = [_read(env, v) for v in jaxpr.outvars]
    return graph


def _fresh(graph: Graph, aval: Any) -> int:
    i = next(_ids)
    graph.avals[i] = aval
    return i


def _read(env: dict, atom: Any) -> Atom:
    if isinstance(atom, _compat.Literal):
        return Lit(atom.val, atom.aval)
    return env[atom]


def _emit(eqns: Any, env: dict, graph: Graph, scope: tuple, call_sources: tuple, prefix: str) -> None:
    for eqn in eqns:
        inputs = tuple(_read(env, a) for a in eqn.invars)
        if eqn.primitive.name in _compat.INLINE_CALLS:
            inner = _compat.inline_jaxpr(eqn.params)
            sub_env: dict[Any, Atom] = {}
            for var, const in zip(inner.jaxpr.constvars, inner.consts):
                sub_env[var] = Lit(const, var.aval)
            for var, atom in zip(inner.jaxpr.invars, inputs):
                sub_env[var] = atom
            name = str(eqn.params.get("name", eqn.primitive.name))
            _emit(inner.jaxpr.eqns, sub_env, graph, scope + ((name, next(_ids)),),
                  (eqn.source_info,) + call_sources, _join(prefix, _compat.name_stack(eqn.source_info)))
            for out, inner_out in zip(eqn.outvars, inner.jaxpr.outvars):
                env[out] = _read(sub_env, inner_out)
            continue
        subgraphs = {}
        inner_prefix = _join(prefix, _compat.name_stack(eqn.source_info))
        inner_sources = (eqn.source_info,) + call_sources
        for key, value in eqn.params.items():
            if _compat.is_jaxpr(value):
                subgraphs[key] = build_graph(value, inner_prefix, inner_sources)
            elif isinstance(value, tuple) and value and all(_compat.is_jaxpr(v) for v in value):
                subgraphs[key] = tuple(build_graph(v, inner_prefix, inner_sources) for v in value)
        outputs = []
        for out in eqn.outvars:
            if _compat.DropVar and isinstance(out, _compat.DropVar):
                outputs.append(None)
            else:
                env[out] = _fresh(graph, out.aval)
                outputs.append(env[out])
        graph.nodes.append(
            Node(eqn.primitive, inputs, tuple(outputs), dict(eqn.params), eqn.source_info, subgraphs,
                 scope, call_sources, prefix)
        )
