r"""Where parameters are used: the effective weights whose ``|W|`` scales the feedback, and which
parameters cannot move when they are zero.

A parameter ``θ`` may reach the computation on the inputs through a computation of parameters only,
``W = h(θ)``: a transpose (a tied head ``h @ Eᵀ``), an offset ``1 + scale`` (Gemma's RMSNorm), ``exp`` or
``softplus``, weight normalisation ``g · v/‖v‖``. ``W`` is the *effective weight*: the value that meets
the input-dependent computation, where the LFP rule applies. Its feedback is that of any weight,
``F_W = |W| ⊙ c_W`` (``c_W`` the normalised reward reaching it, ``J_Wᵀ s`` of its layer), and the
parameter receives it by the chain rule,

.. math::  F_\theta = \sum_{\text{uses } W} \Big(\frac{\partial W}{\partial \theta}\Big)^{\!\top}
           \big(|W| \odot c_W\big).

For a parameter used as it is, or moved (reshaped, transposed, sliced, cast), this is the paper's
``|θ| ⊙ J_θᵀ s``. A zero ``scale`` used as ``1 + scale`` is therefore not frozen (``|W| = 1``), while a
zero bias or a zero normalisation scale used directly is. Computations with values that are not
parameters (running statistics passed in: ``γ · rsqrt(var)``) are part of the layer, not of the
weight: there ``W = γ``, as in the reference.

The engine realises this by a *use boundary* at every effective weight (:func:`uses`): an identity
whose backward multiplies the cotangent by ``|W|``; JAX's reverse pass then carries ``|W| ⊙ c_W``
back to ``θ`` through ``h``. In Theorem 1's terms, LFP on a ReLU network is gradient descent with the
gradient of every effective weight scaled by ``|W|``: ``F_θ = −J_hᵀ (|W| ⊙ ∇_W Σ CE)``.
"""

from __future__ import annotations

from lfp_jax import _compat
from lfp_jax._embedding import PARAM
from lfp_jax._primitives import MOVES

# elementwise f with f(0) = 0 at every position: a zero parameter stays a zero weight through them
_ZERO_KEEPING = MOVES | {
    "neg", "mul", "dot_general", "conv_general_dilated", "reduce_sum", "cumsum", "sin", "tan", "tanh",
    "sinh", "asin", "asinh", "atan", "atanh", "erf", "expm1", "log1p", "abs", "sign", "square", "div",
    "sqrt", "cbrt", "integer_pow", "reduce_window_sum", "copy", "copy_p",
}


def param_nodes(flow) -> set[int]:
    """Nodes that compute parameter values (see :mod:`lfp_jax._embedding`)."""
    return {i for i, n in enumerate(flow.g.nodes)
            if any(o is not None and flow.roles.get(o) == PARAM for o in n.outputs)}


def uses(flow, plan) -> tuple[set, set]:
    """The effective weights: ``(values, edges)``. ``values``: parameter values read by a site (all of a
    site's primitives compute on the inputs) or returned by the graph; ``edges``: ``(node, position)``
    where a node that is not itself a parameter computation reads a parameter value (a layer outside a
    site, running statistics, an embedding lookup). A control-flow node with a sub-plan places the uses
    of its operands inside its bodies, except where a body input is no parameter value there (a scan's
    carry: a learned initial state), which is a use at the node."""
    g, inside = flow.g, plan.param_nodes
    values, edges = set(), set()
    for site in plan.sites:
        values.update(a for a in site.operands if isinstance(a, int) and flow.roles.get(a) == PARAM)
    for i, node in enumerate(g.nodes):
        if i in inside or i in plan.site_of_node:
            continue
        body_params = _body_params(flow, i) if i in plan.subplans else None
        for p, a in enumerate(node.inputs):
            inner = body_params is not None and p in body_params
            if isinstance(a, int) and flow.roles.get(a) == PARAM and not inner:
                edges.add((i, p))
    values.update(o for o in g.outputs if isinstance(o, int) and flow.roles.get(o) == PARAM)
    return values, edges


def _body_params(flow, i: int) -> set[int]:
    """The operand positions of control-flow node ``i`` whose body input is a parameter value."""
    node, subs = flow.g.nodes[i], flow.sub_roles.get(i, {})
    if node.name in _compat.COND:
        roles = subs.get("branches") or []
        return {p + 1 for p, r in enumerate(roles) if r == PARAM}
    roles = subs.get("jaxpr") or []
    return {p for p, r in enumerate(roles) if r == PARAM}


def zero_keeping(flow, plan) -> list[bool]:
    """Per graph input that is a parameter: whether every way it takes to an effective weight keeps
    zero a zero (``W = 0`` when ``θ = 0``: moves, scalings, products; not ``1 + θ``, ``exp θ``), so that
    a parameter that is entirely zero never moves. Inputs that are no parameter: ``False``."""
    g = flow.g
    result = []
    for v in g.inputs:
        if flow.roles.get(v) != PARAM:
            result.append(False)
            continue
        result.append(_keeps_zero(flow, plan, v))
    return result


def _keeps_zero(flow, plan, start: int) -> bool:
    g = flow.g
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for i in flow.uses.get(v, ()):
            node = g.nodes[i]
            positions = [p for p, a in enumerate(node.inputs) if isinstance(a, int) and a == v]
            if i in plan.subplans:
                inner = _body_params(flow, i)   # other positions are uses at the node: the way ends
                if not all(_body_keeps_zero(node, plan.subplans[i], p) for p in positions if p in inner):
                    return False
                continue
            if i not in plan.param_nodes:
                continue  # an effective weight: the way ends here
            if node.name not in _ZERO_KEEPING or (node.name == "div" and 0 not in positions) \
                    or (node.name == "integer_pow" and node.params.get("y", 1) <= 0):
                return False
            stack.extend(o for o in node.outputs if o is not None)
    return True


def _body_keeps_zero(node, subs: dict, position: int) -> bool:
    """Whether the body input fed by operand ``position`` of a control-flow node keeps zero."""
    if node.name in _compat.COND:
        if position == 0:
            return True
        return all(b.zero_keeping[position - 1] for b in subs["branches"])
    body = subs["jaxpr"]
    return body.zero_keeping[position] if position < len(body.zero_keeping) else True


__all__ = ["param_nodes", "uses", "zero_keeping"]
