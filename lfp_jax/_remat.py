"""Attention scores recomputed in the backward pass instead of kept.

AttnLRP's softmax rule applies the ε of the block that produced the scores, ``x = mask(q·kᵀ/√d)``,
in its own backward pass: ``c_x ← c_x ⊙ x / (x + ε·sign(x))``. That needs ``x`` itself, a
``(…, T, T)`` array per layer that a gradient step never keeps (the softmax's VJP needs only its
output). Keeping it made a transformer's LFP step need 1.1-1.3x the gradient step's memory.

A *score region* is the product site ``q·kᵀ``, the elementwise and structural operations between it
and the softmax (scaling, masking, transposes, a stopped row maximum), and the softmax site, when
nothing else reads the values inside it. The interpreter evaluates a region with a custom VJP whose
forward pass keeps only the region's inputs (``q`` and ``k``, which the product's own backward needs
anyway, and the mask) and the softmax output (kept anyway for the product with the values). Its
backward pass computes ``q·kᵀ`` and the masked scores again and applies the rules' backward
functions. The numbers are the same: the same operations on the same values. The cost is one
``(…, T, d)·(…, d, T)`` product per layer: about 1 % of a step in ``benchmarks.step_time``
(docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses

from lfp_jax.rules.attention import _PLAIN_SOFTMAX, SoftmaxTaylor, UniformProduct
from lfp_jax.sites import Plan, Site

# primitives recomputed freely: elementwise and structural, no matrix products or reductions
_CHEAP = {"mul", "div", "neg", "add", "sub", "select_n", "convert_element_type", "reshape",
          "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "copy", "copy_p", "max", "min",
          "reduce_precision", "pvary"}
_ALSO = {"reduce_max", "stop_gradient"}  # the softmax's row maximum, when it is no part of the site


@dataclasses.dataclass(frozen=True)
class Region:
    """Steps of a plan's schedule evaluated together, recomputed in the backward pass
    (``interpreter._recomputed``): ``steps`` in schedule order (the product site, the operations after
    it, the softmax site last); ``inputs`` the values read from outside."""

    steps: tuple
    inputs: tuple
    keeps_output: bool = False  # the softmax output is kept: its rule's backward needs only y and x


def score_regions(plan: Plan) -> dict[int, Region]:
    """The score regions of ``plan``, keyed by ``id`` of their softmax site (cached on the plan)."""
    cached = getattr(plan, "_score_regions", None)
    if cached is not None:
        return cached
    regions: dict[int, Region] = {}
    g = plan.graph
    producer: dict[int, object] = {}
    for step in plan.schedule:
        outs = (step.output,) + step.extras if isinstance(step, Site) else g.nodes[step].outputs
        for v in outs:
            if v is not None:
                producer[v] = step
    readers: dict[int, set[int]] = {}
    for i, node in enumerate(g.nodes):
        for a in node.inputs:
            if isinstance(a, int):
                readers.setdefault(a, set()).add(i)
    outputs = {o for o in g.outputs if isinstance(o, int)}
    for site in plan.sites:
        if (site.kind != "softmax" or site.input_epsilon is None or site.rule is None
                or not getattr(site.rule, "absorbs_input_epsilon", False)):
            continue
        region = _region(plan, site, producer, readers, outputs)
        if region is not None:
            regions[id(site)] = region
    plan._score_regions = regions  # type: ignore[attr-defined]
    return regions


def _region(plan: Plan, softmax: Site, producer, readers, outputs) -> Region | None:
    g = plan.graph
    tainted = plan.tainted
    chain: list[int] = []
    v = softmax.operands[0]
    while True:
        if not isinstance(v, int) or v in outputs or v in plan.stabilize:
            return None
        step = producer.get(v)
        if isinstance(step, Site):
            break
        if step is None or len(chain) > 16:
            return None
        node = g.nodes[step]
        if node.name not in _CHEAP or node.subgraphs or step in plan.relevance_pass or step in plan.id_nodes:
            return None
        flowing = [a for a in node.inputs if isinstance(a, int) and a in tainted]
        if len(flowing) != 1:
            return None
        chain.append(step)
        v = flowing[0]
    product = step
    if (product.kind != "bilinear" or product.extras or product.rule is None
            or not isinstance(product.rule, UniformProduct)):
        return None
    nodes = set(product.nodes) | set(chain) | set(softmax.nodes)
    inside = {product.output} | {o for i in chain for o in g.nodes[i].outputs if o is not None}
    # nodes outside the sites that read the scores and feed only the region (the row maximum of a
    # softmax whose shift is stopped) are recomputed with it
    members = set(chain)
    grown = True
    while grown:
        grown = False
        for u in list(inside):
            for r in readers.get(u, set()) - nodes:
                node = g.nodes[r]
                outs = [o for o in node.outputs if o is not None]
                if (node.name not in _CHEAP | _ALSO or node.subgraphs or r in plan.site_of_node
                        or any(o in outputs or o in plan.stabilize for o in outs)):
                    return None
                members.add(r)
                nodes.add(r)
                inside.update(outs)
                grown = True
    for u in inside:  # nothing outside the region reads a value made inside it
        if u in outputs or not readers.get(u, set()) <= nodes:
            return None
    # broadcasts feeding only the region (a mask, the -inf of masked scores) are made inside it: an
    # input of the region is a materialised array kept for the backward pass, a broadcast made
    # inside is fused into its consumers
    pulled = True
    while pulled:
        pulled = False
        for step in [product, softmax, *members]:
            atoms = step.operands if isinstance(step, Site) else g.nodes[step].inputs
            for a in atoms:
                r = producer.get(a) if isinstance(a, int) and a not in inside else None
                if (isinstance(r, int) and g.nodes[r].name == "broadcast_in_dim" and a not in tainted
                        and a not in outputs and readers.get(a, set()) <= nodes):
                    members.add(r)
                    nodes.add(r)
                    inside.add(a)
                    pulled = True
    order = {id(s) if isinstance(s, Site) else s: k for k, s in enumerate(plan.schedule)}
    steps = [product] + sorted(members, key=order.__getitem__) + [softmax]
    inputs: list[int] = []
    for step in steps:
        atoms = step.operands if isinstance(step, Site) else g.nodes[step].inputs
        for a in atoms:
            if isinstance(a, int) and a not in inside and a not in inputs:
                inputs.append(a)
    keeps = (type(softmax.rule) is SoftmaxTaylor and tuple(softmax.primitives) in _PLAIN_SOFTMAX
             and not any(softmax.carries_reward[1:]))
    return Region(tuple(steps), tuple(inputs), keeps)
