r"""Token ids: where reward enters a model that takes integer inputs.

A language model takes integer token ids, and its first parametrised operation is a lookup of rows of a
parameter table, ``e = E[ids]``. Integers carry no reward, so this lookup is where reward enters: the
lookup is an **embedding site** whose output is a reward source, like a floating-point input.

Three kinds of values matter here, decided by :func:`role`:

* **id values** (:data:`IDS`): the integer inputs of the model, and what moves or elementwise
  operations make of them alone: ``ids.astype(int32)``, the wrap of negative indices
  ``where(ids < 0, ids + V, ids)``, ``ids[:, :-1]``, ``ids[..., None]``, the comparison with an ``iota``
  and its float cast that ``jax.nn.one_hot`` computes. A position computed by a cumulative sum, an
  arg-max or a count is no id value: it says where a token is, not which token it is.
* **parameter values** (:data:`PARAM`): parameters, and values computed from parameters and scalar
  literals only (``E.astype(bf16)``, ``Eᵀ``, ``1 + scale``, ``P[arange(T)]``): effective weights (see
  :mod:`lfp_jax._params`). A contraction of two of them (``A @ B``, a learned state times a kernel)
  is a layer whose factors are each a weight; what it computes is **derived** (:data:`DERIVED`):
  parameter-only, a table ids can look up, no effective weight.
* **constants of the formula** (:data:`CONST`): scalar literals and what is computed from them alone
  (``iota``, a broadcast ``1.0``).

An embedding site is a ``gather`` or ``dynamic_slice`` of a parameter value by id values
(``E[ids]``, ``jnp.take``, ``take_along_axis``, ``nn.Embed``, ``nnx.Embed``, ``eqx.nn.Embedding`` under
``vmap``), or a ``dot_general`` of an id-valued float with a parameter value (``one_hot(ids) @ E``). A
lookup of anything that is not a parameter value (a constant table, a hidden state) by ids is no
embedding site: the ids select as constants would. Float values computed from ids otherwise (a padding
mask ``(ids != 0).astype(f)``, positions from its cumulative sum) carry no reward.

**Per-token relevance.** The relevance of a token is the relevance at its lookup's output summed over
the features, :math:`R_t = \sum_d e_{t,d}\, c_{t,d}`. To return it shaped like the ids whatever the
model did to them before the lookup (a reshape, a slice, a wrap of negative indices, a ``vmap``), every
id input gets a *carrier*: a float array of zeros of its shape that follows the ids through the same
moves and elementwise operations (:func:`carry`). At the lookup the carrier enters the site's rule,
whose backward pass hands it the per-token relevance (:func:`spread` and its transpose); JAX's own
reverse pass brings it back to the carrier of the id input, whose cotangent is the relevance of the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lfp_jax._graph import Graph, Lit, Node, is_float
from lfp_jax._primitives import ELEMENTWISE, MOVES, NO_REWARD, RANDOM

IDS = "ids"
PARAM = "param"
DERIVED = "derived"
CONST = "const"

_ID_MOVES = MOVES - {"argmax", "argmin", "iota", "sort", "top_k"}
# operand positions of a move that hold data (the others hold indices, sizes or a padding value)
_DATA = {"dynamic_slice": (0,), "gather": (0,), "pad": (0,), "dynamic_update_slice": (0, 1),
         "scatter": (0, 2)}
_INDEX = {"dynamic_slice": None, "gather": (1,)}  # None: every position after the data
_CONTRACTIONS = {"dot_general", "conv_general_dilated"}


def is_integer(aval: Any) -> bool:
    """Whether values of ``aval`` can be token ids (signed or unsigned integers)."""
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, np.integer)


def atom_role(roles: dict, atom: Any) -> str | None:
    """The role of an operand: a value's entry in ``roles``, :data:`CONST` for a scalar literal."""
    if isinstance(atom, Lit):
        value = atom.value
        if np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
            return CONST
        return None  # a closed-over array: a constant of the program, not of the formula
    return roles.get(atom)


def role(node: Node, roles: dict, tainted: set) -> str | None:
    """The role of ``node``'s outputs (see the module docstring), ``None`` for neither."""
    if node.name in RANDOM or node.subgraphs:
        return None
    if not node.inputs:
        return CONST  # iota, a constant array
    if node.name in NO_REWARD:
        return None
    if any(isinstance(a, int) and a in tainted for a in node.inputs):
        return None
    found = [atom_role(roles, a) for a in node.inputs]
    if IDS in found:
        if node.name in ELEMENTWISE:
            return IDS if all(r in (IDS, CONST) for r in found) else None
        if node.name in _ID_MOVES:
            data = _DATA.get(node.name, range(len(found)))
            if any(found[p] == IDS for p in data if p < len(found)):
                return IDS  # the ids moved: reshaped, sliced, concatenated with constants
            if node.name in _INDEX and all(found[p] in (IDS, CONST) for p in data):
                return IDS  # a constant table looked up by ids (jnp.eye(V)[ids]): one row per token
        return None
    if not all(r in (PARAM, DERIVED, CONST) for r in found):
        return None
    if DERIVED in found or (node.name in _CONTRACTIONS and found.count(PARAM) >= 2):
        return DERIVED   # a layer applied to a learned tensor (h0 @ W, A @ B): each factor is a weight
    return PARAM if PARAM in found else CONST


def lookup(graph: Graph, node: Node, roles: dict) -> tuple[str, tuple[int, ...]] | None:
    """``(label, positions of the id operands)`` if ``node`` is an embedding lookup, else ``None``."""
    ins = node.inputs
    name = node.name
    floats = [is_float(graph.aval(a)) for a in ins]
    if name in ("gather", "dynamic_slice") and len(ins) >= 2:
        if not (floats[0] and atom_role(roles, ins[0]) in (PARAM, DERIVED)):
            return None
        index = (1,) if name == "gather" else tuple(range(1, len(ins)))
        ids = tuple(p for p in index if atom_role(roles, ins[p]) == IDS)
        others = all(atom_role(roles, ins[p]) in (IDS, CONST) for p in index)
        return ("embed", ids) if ids and others else None
    if name == "dot_general" and len(ins) == 2:
        for p in (0, 1):
            q = 1 - p
            if (floats[p] and floats[q] and atom_role(roles, ins[p]) == IDS
                    and atom_role(roles, ins[q]) in (PARAM, DERIVED)):
                return "one_hot", (p,)
    return None


def index_weights(graph: Graph, producer: dict, node: Node, roles: dict) -> tuple[float, ...]:
    """For a ``gather``: the share of a lookup's relevance that goes to each component of its index
    vector (the last axis of the indices). Components that are no id values (the ``0`` column that
    ``eqx.nn.Embedding`` under ``vmap`` concatenates to the row index, a segment index passed as a
    constant) get none; the id components share it equally."""
    indices = node.inputs[1]
    k = graph.aval(indices).shape[-1]
    if k == 1:
        return (1.0,)
    p = producer.get(indices) if isinstance(indices, int) else None
    if p is not None and graph.nodes[p].name == "concatenate" \
            and graph.nodes[p].params["dimension"] == len(graph.aval(indices).shape) - 1:
        marks = []
        for a in graph.nodes[p].inputs:
            marks += [atom_role(roles, a) == IDS] * graph.aval(a).shape[-1]
        n = sum(marks)
        if n:
            return tuple(float(m) / n for m in marks)
    return (1.0 / k,) * k


# -- sites and the way back to the ids ---------------------------------------------------------------


def embedding_site(flow, i: int):
    """An embedding lookup (see :mod:`lfp_jax._embedding`): its table and its id operands."""
    node = flow.g.nodes[i]
    label, positions = flow.embeddings[i]
    site = flow._make_site("embedding", label, [i], None, None)
    ids = [node.inputs[p] for p in positions]
    site.ids_operands = tuple(k for k, a in enumerate(site.operands)
                              if any(a is b or (isinstance(a, int) and a == b) for b in ids))
    site.carries_reward = (False,) * len(site.operands)
    if node.name == "gather":
        site.index_weights = index_weights(flow.g, flow.producer, node, flow.roles)
    return site


def trace_ids(flow, plan) -> None:
    """The way of the per-token relevance from every embedding site back to the id inputs: the
    nodes that the ids' carriers follow (``Plan.id_nodes``, with the index-vector weights of the
    gathers among them that look a constant table up by ids) and the id inputs they start from
    (``Plan.id_inputs``); ``Plan.body_ids``: id inputs looked up inside a ``scan``/``cond``/``remat``
    body (an embedding site there, at any depth), which carriers do not reach. Runs after the bodies
    are analysed."""
    g = flow.g
    inputs = {v: k for k, v in enumerate(g.inputs)}
    starts = [site.operands[k] for site in plan.sites if site.kind == "embedding"
              for k in site.ids_operands]
    for i, subs in plan.subplans.items():  # control flow whose body looks token ids up
        node = g.nodes[i]
        shift = 1 if any(isinstance(v, tuple) for v in subs.values()) else 0   # cond: the predicate
        looked_up = set()
        for body in subs.values():
            for b in body if isinstance(body, tuple) else (body,):
                looked_up |= {k + shift for k in b.id_inputs | b.body_ids}
        body_ids = [node.inputs[p] for p in sorted(looked_up)
                    if p < len(node.inputs) and isinstance(node.inputs[p], int)]
        plan.body_ids |= {inputs[v] for v in _id_sources(flow, body_ids, set()) if v in inputs}
    plan.id_inputs = {inputs[v] for v in _id_sources(flow, starts, plan.id_nodes) if v in inputs}
    for r in plan.id_nodes:
        node = g.nodes[r]
        if node.name == "gather" and atom_role(flow.roles, node.inputs[0]) != IDS:
            plan.gather_weights[r] = index_weights(g, flow.producer, node, flow.roles)


def _id_sources(flow, values: list, nodes: set) -> set:
    """The graph inputs that ``values`` (id values) are computed from; ``nodes`` gathers the id
    nodes on the way."""
    found, stack, seen = set(), [a for a in values if isinstance(a, int)], set()
    while stack:
        v = stack.pop()
        if v in seen or flow.roles.get(v) != IDS:
            continue
        seen.add(v)
        p = flow.producer.get(v)
        if p is None:
            found.add(v)
            continue
        nodes.add(p)
        stack.extend(a for a in flow.g.nodes[p].inputs if isinstance(a, int))
    return found


# -- carriers: the per-token relevance's way back to the ids ---------------------------------------


def spread(name: str, params: dict, carriers: Sequence[Any], out_shape: tuple[int, ...],
           weights: tuple[float, ...] | None) -> Any:
    """The carriers of a lookup's index operands (primitive ``name`` with ``params``) spread over its
    output: every output element gets its token's carrier (``weights`` combine the components of a
    ``gather``'s index vector). The transpose of this map sums a lookup's output relevance over the
    features, per token."""
    if name == "gather":
        (carrier,) = carriers
        per_index = jnp.tensordot(carrier, jnp.asarray(weights, carrier.dtype), axes=1)
        offset = params["dimension_numbers"].offset_dims
        return jnp.broadcast_to(jnp.expand_dims(per_index, tuple(offset)), out_shape)
    total = sum(carriers) / len(carriers)  # dynamic_slice: scalar start indices
    return jnp.broadcast_to(total, out_shape)


def carry(node: Node, ins: list[Any], carriers: list[Any], out_avals: list[Any], dtype: Any,
          weights: tuple[float, ...] | None = None) -> list[Any]:
    """The carriers of ``node``'s outputs (an id-valued node) from its inputs' (``None`` where an input
    has none): the same move applied to the carriers, or, for an elementwise operation, the sum of its
    id operands' carriers (a ``select_n`` selects among its cases' carriers)."""
    def zeros(a):
        return jnp.zeros(jnp.shape(a), dtype)

    name = node.name
    out_shape = out_avals[0].shape
    if name == "convert_element_type" or name in ("copy", "copy_p", "reduce_precision"):
        return [carriers[0]]
    if name == "select_n":
        if any(c is not None for c in carriers[1:]):
            cases = [c if c is not None else zeros(a) for a, c in zip(ins[1:], carriers[1:])]
            return [jax.lax.select_n(ins[0], *cases)]
        return [carriers[0]]
    if name in ELEMENTWISE:
        found = [jnp.broadcast_to(c, out_shape) for c in carriers if c is not None]
        return [sum(found[1:], found[0])]
    data = _DATA.get(name, tuple(range(len(ins))))
    if name == "pad":
        data = (0, 1)   # the padding value is data of the carrier's dtype (0: a pad token carries nothing)
    if name in _INDEX and all(carriers[p] is None for p in data):
        index = _INDEX[name] or tuple(range(1, len(ins)))
        found = [carriers[p] for p in index if carriers[p] is not None]
        return [spread(name, node.params, found, out_shape, weights)]
    args = [(c if c is not None else zeros(a)) if p in data else a
            for p, (a, c) in enumerate(zip(ins, carriers))]
    params = dict(node.params)
    if "fill_value" in params and params["fill_value"] is not None:
        params["fill_value"] = 0  # an out-of-range id's row carries nothing
    out = node.prim.bind(*args, **params)
    return list(out) if node.prim.multiple_results else [out]


__all__ = ["IDS", "PARAM", "DERIVED", "CONST", "is_integer", "role", "lookup", "index_weights",
           "embedding_site", "trace_ids", "spread", "carry"]
