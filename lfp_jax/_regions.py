"""Regions: the smallest single-input, single-output sub-graph around a nonlinear primitive.

A region's input ``x`` dominates it and its output ``y`` post-dominates it; every input-dependent value
inside comes from ``x`` and only ``y`` leaves it (towards a rewarded output). A region that is
elementwise in ``x`` is an *activation*; one that divides by a reduced standard deviation a
*normalization*; ``exp / Σexp`` a *softmax*.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from lfp_jax import _compat
from lfp_jax._dataflow import VROOT, VSINK
from lfp_jax._graph import Graph, Lit
from lfp_jax._primitives import ELEMENTWISE


def find_regions(flow, cats: dict[int, str]) -> tuple[dict, dict]:
    """Grow every nonlinear node into a region site (or a single-node site).

    Returns ``region_of`` (node -> (x, region, y, kind, label)) and ``singles`` (node -> (kind, label)).
    Nodes are visited from the outputs backwards, so a region is found from its last primitive. Nodes
    no rule can cover become single sites of kind ``unknown`` (a primitive the engine does not know),
    ``bilinear`` (a product of two input-dependent values) or ``nonlinear``; the composite has no rule
    for them, and the engine reports them all at once.
    """
    g = flow.g
    flow.scope_sizes = {}
    for i in cats:
        for entry in g.nodes[i].scope:
            flow.scope_sizes[entry] = flow.scope_sizes.get(entry, 0) + 1
    region_of: dict[int, tuple] = {}  # node -> (x, region set, y, kind, label)
    singles: dict[int, tuple[str, str]] = {}
    for i in sorted(cats, reverse=True):
        cat = cats[i]
        if i in region_of or cat not in ("nonlinear", "unknown", "bilinear"):
            continue
        if cat == "unknown":
            singles[i] = ("unknown", g.nodes[i].name)
            continue
        grown = None if cat == "bilinear" else grow(flow, {i})
        kind = None
        for _ in range(6):  # exp(x)/Σexp(x), log Σexp(x): the last step alone is no known block
            if grown is None:
                break
            x, region, y = grown
            for r in list(region):  # absorb regions found earlier that this one overlaps
                if r in region_of:
                    region |= region_of[r][1]
            kind, label = classify_region(flow, x, region, y)
            if (x not in flow.producer or flow.producer[x] in flow.embeddings
                    or not (kind == "nonlinear" or _log_of_sum(flow, region, x))):
                break  # a model input or an embedding lookup's output: nothing to widen into
            wider = grow(flow, region | {flow.producer[x]})
            if wider is None:
                break
            grown = wider
        if kind == "softmax":
            x = _include_max_shift(flow, region, x)
        if kind in ("activation", "normalization", "softmax"):
            info = (x, region, y, kind, label)
            for r in region:
                region_of[r] = info
        elif g.nodes[i].name in ("mul", "dot_general", "conv_general_dilated"):
            singles[i] = ("bilinear", g.nodes[i].name)
        elif g.nodes[i].name == "div":
            singles[i] = ("quotient", "div")
        elif grown is not None:
            info = (x, region, y, kind, label)
            for r in region:
                region_of[r] = info
        else:
            singles[i] = ("nonlinear", g.nodes[i].name)
    return region_of, singles


def _include_max_shift(flow, region: set[int], x: int) -> int:
    """``jax.nn.softmax`` computes ``exp(x − stop_gradient(max x))``: take the subtraction into the
    site, so that its input (where the ε of the block producing the scores is applied) is the raw
    scores. A softmax written with the maximum not stopped (``exp(x − x.max(-1, keepdims=True))``,
    and jax ≥ 0.12.1's ``max(-inf, reduce_max x)``, also with the scores and the maximum transposed
    before the subtraction) gets the maximum into the site too: the same function of ``x``, whose
    derivative through the maximum is zero. Returns the new region input."""
    g = flow.g
    p = flow.producer.get(x)
    if p is None or g.nodes[p].name != "sub":
        return x
    scores, shift = g.nodes[p].inputs
    q = flow.producer.get(shift) if isinstance(shift, int) else None
    chain, value = [], shift  # (value, the node that consumes it) from the shift up to the maximum
    consumer = p
    while q is not None and _shift_input(g.nodes[q]) is not None:
        chain.append((value, consumer))
        consumer, value = q, _shift_input(g.nodes[q])
        q = flow.producer.get(value) if isinstance(value, int) else None
    chain.append((value, consumer))
    if q is None:
        return x
    if g.nodes[q].name == "stop_gradient" and flow._tin(p) == [scores]:
        region.add(p)
        return scores
    if g.nodes[q].name != "reduce_max" or not all(
            flow.consumers.get(v) == [c] and v not in flow.out_vars for v, c in chain):
        return x
    # the maximum is taken of the scores themselves or of the array they are a transpose of (jax ≥ 0.12
    # writes softmax over a non-last axis as a transpose of the input and of its maximum)
    base, perm, extra = scores, None, []
    t = flow.producer.get(scores) if isinstance(scores, int) else None
    if (g.nodes[q].inputs[0] != scores and t is not None and g.nodes[t].name == "transpose"
            and g.nodes[t].inputs[0] == g.nodes[q].inputs[0]
            and flow.consumers.get(scores) == [p] and scores not in flow.out_vars):
        base, perm, extra = g.nodes[t].inputs[0], tuple(g.nodes[t].params["permutation"]), [t]
    if g.nodes[q].inputs[0] == base and _constant_along_sum(flow, region, q, [c for _, c in chain[1:]][::-1],
                                                           perm):
        region.update([p, q] + [c for _, c in chain[1:]] + extra)
        return base
    return x


def _is_minus_inf(atom) -> bool:
    return isinstance(atom, Lit) and np.ndim(atom.value) == 0 and float(atom.value) == -np.inf


def _shift_input(node) -> int | None:
    """The operand that ``node`` passes on unchanged between the maximum and the subtraction of a
    softmax's max shift: a keepdims-style move, or ``max(-inf, m)`` (jax ≥ 0.12.1 writes the maximum as
    ``jnp.max(x, initial=-inf)``, which is ``m`` itself); None for anything else."""
    if node.name in ("broadcast_in_dim", "reshape", "transpose", "expand_dims"):
        return node.inputs[0]
    if node.name == "max" and len(node.inputs) == 2:
        a, b = node.inputs
        if _is_minus_inf(a) and isinstance(b, int):
            return b
        if _is_minus_inf(b) and isinstance(a, int):
            return a
    return None


def _constant_along_sum(flow, region: set[int], q: int, moves: list[int],
                        perm: tuple[int, ...] | None = None) -> bool:
    """Whether the maximum ``q`` (a ``reduce_max`` of the softmax input) is taken over exactly the axes
    the softmax sums over and put back along them by ``moves`` (keepdims-style ``broadcast_in_dim``s,
    transposes, ``max(-inf, ·)``), so that subtracting it leaves the softmax unchanged (and its
    derivative through the maximum 0). ``perm``: the scores are ``transpose(input, perm)``."""
    g = flow.g
    n = len(g.aval(g.nodes[q].inputs[0]).shape)
    perm = tuple(range(n)) if perm is None else perm   # scores dimension j is input dimension perm[j]
    sums = [g.nodes[r].params["axes"] for r in region if g.nodes[r].name == "reduce_sum"]
    axes = tuple(sorted(g.nodes[q].params["axes"]))
    if len(sums) != 1 or tuple(sorted(perm[a] for a in sums[0])) != axes:
        return False
    dims: list = [d for d in range(n) if d not in axes]  # input dimension of each dimension
    value = g.nodes[q].outputs[0]
    for r in moves:
        node = g.nodes[r]
        if node.name == "max" and _shift_input(node) == value:   # max(-inf, m) = m
            value = node.outputs[0]
            continue
        if node.name == "transpose" and node.inputs[0] == value:
            dims, value = [dims[i] for i in node.params["permutation"]], node.outputs[0]
            continue
        if node.name != "broadcast_in_dim" or node.inputs[0] != value:
            return False
        shape, src = node.params["shape"], g.aval(value).shape
        new: list = [None] * len(shape)
        for i, j in enumerate(node.params["broadcast_dimensions"]):
            new[j] = dims[i] if src[i] == shape[j] else None
        dims, value = new, node.outputs[0]
    return dims == [None if perm[j] in axes else perm[j] for j in range(n)]


def product_chains(flow, singles: dict) -> dict:
    """Elementwise products of products (``a * b * c``) as one site: node -> the chain it ends or
    belongs to. A product whose result only feeds the next product of the chain is part of it."""
    chain_of: dict[int, list[int]] = {}
    for i in sorted(singles):
        if singles[i] != ("bilinear", "mul"):
            continue
        chain = [i]
        for a in flow._tin(i):
            p = flow.producer.get(a)
            if (p in chain_of and singles.get(p) == ("bilinear", "mul") and a not in flow.out_vars
                    and flow.consumers.get(a) == [i] and len(flow.uses.get(a, ())) == 1):
                chain = chain_of[p] + chain
        for r in chain:
            chain_of[r] = chain
    return {r: tuple(sorted(c)) for r, c in chain_of.items() if len(c) > 1}


def grow(flow, region: set[int]) -> tuple[int, set[int], int] | None:
    """The smallest single-input, single-output region containing ``region`` (None if none)."""
    region = set(region)
    while True:
        ext = [u for r in region for u in flow._tin(r) if flow.producer.get(u) not in region]
        if not ext:
            return None
        x = flow._float_dominator(functools.reduce(flow._lca_dom, ext))
        if x == VROOT:
            return None
        new = set(region)
        for u in ext:
            if u != x:
                new |= flow._between(x, u)
        esc = _escaping(flow, new)
        if len(esc) != 1:
            y = functools.reduce(flow._lca_pdom, esc)
            if y == VSINK:
                return None
            x = flow._float_dominator(flow._lca_dom(x, y))
            if x == VROOT:
                return None
            new |= flow._between(x, y)
        elif new == region:
            return x, region, esc[0]
        region = new

def _escaping(flow, region: set[int]) -> list[int]:
    esc = []
    for r in sorted(region):
        for o in flow._tout(r):
            if o in flow.out_vars or any(c not in region for c in flow.consumers.get(o, [])):
                esc.append(o)
    return esc

def classify_region(flow, x: int, region: set[int], y: int) -> tuple[str, str]:
    g = flow.g
    names = [g.nodes[r].name for r in sorted(region)]
    shape = g.avals[x].shape
    elementwise = all(
        g.nodes[r].name in ELEMENTWISE
        and all(g.aval(a).shape == shape for a in flow._tin(r))
        and all(g.avals[o].shape == shape for o in g.nodes[r].outputs if o is not None)
        for r in region
    )
    if elementwise and g.avals[y].shape == shape:
        return "activation", _activation_label(g, sorted(region), flow.scope_sizes)
    if "dot_general" in names or "conv_general_dilated" in names:
        return "nonlinear", "+".join(sorted(set(names)))
    if "reduce_sum" in names and ({"rsqrt", "sqrt"} & set(names)):
        return "normalization", _norm_label(g, sorted(region), x)
    if {"exp", "reduce_sum", "div"} <= set(names):
        return "softmax", "softmax"
    if {"exp", "reduce_sum", "log"} <= set(names):
        return "softmax", "logsumexp"
    return "nonlinear", "+".join(sorted(set(names)))


def _log_of_sum(flow, region: set[int], x: int) -> bool:
    """A ``log`` applied to a sum (the end of log-sum-exp, as in ``log_softmax``)."""
    g = flow.g
    if "log" not in {g.nodes[r].name for r in region}:
        return False
    p = flow.producer.get(x)
    while p is not None and g.nodes[p].name in ("reshape", "broadcast_in_dim", "expand_dims", "squeeze"):
        p = flow.producer.get(g.nodes[p].inputs[0])
    return p is not None and g.nodes[p].name == "reduce_sum"


# Checked in order; the first signature contained in a region's primitives names it.
_ACTIVATION_SIGNATURES = [
    ({"erf"}, "gelu"), ({"erfc"}, "gelu"), ({"integer_pow", "tanh"}, "gelu"), ({"logistic", "mul"}, "silu"),
    ({"expm1"}, "elu"), ({"log1p", "tanh", "mul"}, "mish"), ({"log1p", "exp"}, "softplus"),
    ({"ge", "select_n", "mul"}, "leaky_relu"),
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


_NORM_NAMES = (
    (re.compile(r"BatchNorm|(^|/|_)(bn|batch_?norm)(\d*)($|/|_)", re.I), "batch_norm"),
    (re.compile(r"LayerNorm|(^|/|_)(ln|layer_?norm)(\d*)($|/|_)", re.I), "layer_norm"),
    (re.compile(r"GroupNorm|(^|/|_)group_?norm", re.I), "group_norm"),
    (re.compile(r"RMSNorm|(^|/|_)rms_?norm", re.I), "rms_norm"),
)


def _norm_label(g: Graph, nodes: list[int], x: int) -> str:
    """What a normalisation is: by its module's name (``BatchNorm_0``, ``bn_init``, ``ln_1``,
    ``RMSNorm``), else by the axes its statistics reduce: the batch axis and every other axis but one
    (the channels) for a batch norm; otherwise a layer norm (which subtracts the mean) or an RMS norm
    (which does not)."""
    stacks = [g.nodes[r].path for r in nodes]
    for pattern, label in _NORM_NAMES:
        if any(pattern.search(path) for path in stacks):
            return label
    moved, shape = {x}, g.aval(x).shape
    for r in nodes:   # x, cast, reshaped or squared elementwise (x², the statistics in float32)
        node = g.nodes[r]
        ins = [a for a in node.inputs if isinstance(a, int)]
        if ins and all(a in moved for a in ins) and (
                node.name in ("convert_element_type", "reshape", "copy")
                or (node.name in ELEMENTWISE and all(g.aval(a).shape == shape for a in ins))):
            moved.update(o for o in node.outputs if o is not None)
    for r in nodes:
        node = g.nodes[r]
        if node.name == "reduce_sum" and node.inputs[0] in moved:
            ndim, axes = len(g.aval(node.inputs[0]).shape), tuple(node.params.get("axes", ()))
            if ndim >= 2 and 0 in axes and len(axes) == ndim - 1:   # all axes but the channels
                return "batch_norm"
            centred = any(g.nodes[q].name == "sub" for q in nodes)
            return "layer_norm" if centred else "rms_norm"
    return "normalization"
