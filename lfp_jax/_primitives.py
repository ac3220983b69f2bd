"""Primitive tables: how reward crosses each JAX primitive.

*structural* primitives move values unchanged (reward moves with them; sorting and ``top_k`` of floats
are permutations and selections, so they are moves too); *mixing* ones are linear in their one
input-dependent operand (``dot_general``, convolutions, sums, sum pooling); *affine* ones add, multiply
or divide by a constant (a bias, a scale, the ``1/n`` of a mean); *routing* ones select one input per
output (max pooling; ``max``/``min`` of two input-dependent values); *spiking* ones are a LIF neuron
step; everything *elementwise* and not affine is *nonlinear* and must become part of a site. Primitives
in no table are *unknown* and refused. Which inputs of a primitive carry reward is decided by the taint
pass (:mod:`lfp_jax._dataflow`): integer and boolean values never do, unless they are the comparisons
inside an activation.
"""

from __future__ import annotations

from lfp_jax._graph import is_float

STRUCTURAL = {
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
    "gather", "concatenate", "pad", "rev", "copy", "copy_p", "reduce_precision", "dynamic_update_slice",
    "scatter", "optimization_barrier", "device_put", "sharding_constraint", "mesh_cast", "reshard",
    "split", "pvary", "argmax", "argmin", "iota", "stack", "tile", "sort", "top_k",
}
# Moves of parameter values: a parameter reaching a site only through these is used as it is.
MOVES = STRUCTURAL | {"convert_element_type"}
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
SPIKING = {"lif_step"}  # lfp_jax.nn.spiking: one time step of a LIF neuron layer
RANDOM = {"random_bits", "threefry2x32", "rng_bit_generator", "rng_uniform"}
NO_REWARD = {"stop_gradient", "random_bits", "random_seed", "random_wrap", "random_unwrap",
             "random_fold_in", "random_split", "threefry2x32", "iota", "rng_bit_generator"}


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



def category(flow, i: int) -> str:
    """How reward crosses node ``i`` of ``flow.g`` (see the module docstring)."""
    node = flow.g.nodes[i]
    name = node.name
    rin = set(flow.edges.get(i, ()))
    tf = [p in rin and is_float(flow.g.aval(a)) for p, a in enumerate(node.inputs)]
    if node.subgraphs:
        return "control"
    if name == "select_n":
        if i in flow.compare_selects:
            return "select"  # where(a > b, a, b)
        return "nonlinear" if 0 in rin else "structural"
    if name == "convert_element_type":
        ok = is_float(flow.g.aval(node.inputs[0])) and is_float(flow.g.avals[node.outputs[0]])
        return "structural" if ok else "nonlinear"
    if name in STRUCTURAL:
        return "structural"
    if name in SPIKING:
        return "spiking"
    if name in ROUTING:
        return "routing"
    if name in ("max", "min") and sum(tf) == 2:
        return "select"  # max/min of two input-dependent values: reward to the winner
    if name in ("dot_general", "conv_general_dilated"):
        return "mixing" if sum(tf) == 1 else "bilinear"
    if name in ("add", "sub", "add_any"):
        return "mixing" if sum(tf) == 2 else "affine"
    if name == "mul":
        return "affine" if sum(tf) == 1 and len(rin) == 1 else "nonlinear"
    if name == "div":
        return "affine" if tf[0] and len(rin) == 1 else "nonlinear"
    if name == "neg":
        return "affine"
    if name in MIXING:
        return "mixing"
    if name in ELEMENTWISE:
        return "nonlinear"
    return "unknown"
