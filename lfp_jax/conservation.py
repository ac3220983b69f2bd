r"""Where relevance goes: a site-by-site balance of an LRP (or LFP) backward pass.

For every site of the model (top-level graph; sites inside ``scan``/``cond`` bodies are counted but
not tapped) the report gives

* ``relevance_in``: :math:`\sum R` handed to the site's output by everything that uses it (and by the
  output relevance, for a model output), *before* the site's own stabiliser;
* ``relevance_out``: :math:`\sum R` the site's rule hands to its reward-carrying inputs;
* ``gap = relevance_in − relevance_out`` and ``relative_gap = gap / |relevance_in|``;
* ``absorbed``: what in the site can take relevance: its bias (``b``, or the merged ``d`` of an
  eval-mode BatchNorm), its ε, the ε of the block below that an activation applies.

Sums run over every element (the whole batch). A conservative rule (``Rule.conservative``) with zero
biases and ε = 0 has ``gap = 0`` at every site; ``strict=True`` raises
:class:`~lfp_jax.errors.ConservationError` where such a rule loses more than ``tolerance``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lfp_jax import _arguments, _record
from lfp_jax import sites as _sites
from lfp_jax._primitives import MOVES as _MOVES
from lfp_jax._report import rule_name, short_source, table
from lfp_jax._trace import Traced
from lfp_jax.composites import attn_lrp, check_composite
from lfp_jax.errors import ConservationError

_AFFINE = frozenset({"add", "sub", "mul", "div", "neg"})  # with one input-dependent operand


@dataclasses.dataclass(frozen=True)
class SiteBalance:
    """One row of a :class:`ConservationReport`."""

    index: int
    kind: str
    label: str
    rule: str
    module: str
    source: str
    relevance_in: float
    relevance_out: float
    gap: float
    relative_gap: float
    absorbed: str
    conservative: bool


@dataclasses.dataclass(frozen=True)
class ConservationReport:
    """The balance of every site; ``str(report)`` is a table, :meth:`to_dict` the data.

    Attributes:
      composite: the composite's name.
      sites: one :class:`SiteBalance` per top-level site, in evaluation order.
      output_relevance: ``Σ`` of the output relevance (``target``).
      input_relevance: ``Σ`` of the input relevance returned for the explained arguments.
      untapped: sites inside ``scan``/``cond``/``remat`` bodies (not in the table).
    """

    composite: str
    sites: tuple[SiteBalance, ...]
    output_relevance: float
    input_relevance: float
    untapped: int = 0

    def to_dict(self) -> dict:
        return {"composite": self.composite, "output_relevance": self.output_relevance,
                "input_relevance": self.input_relevance, "untapped": self.untapped,
                "sites": [dataclasses.asdict(s) for s in self.sites]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def worst(self, conservative_only: bool = True) -> SiteBalance | None:
        """The site with the largest ``|relative_gap|`` (among conservative rules by default)."""
        rows = [s for s in self.sites if s.conservative or not conservative_only]
        return max(rows, key=lambda s: abs(s.relative_gap), default=None)

    def check(self, tolerance: float = 1e-3) -> None:
        """Raise :class:`~lfp_jax.errors.ConservationError` where a conservative rule's
        ``|relative_gap|`` exceeds ``tolerance``."""
        bad = [s for s in self.sites if s.conservative and abs(s.relative_gap) > tolerance]
        if bad:
            lines = [f"  site {s.index} ({s.kind} {s.label}, {s.rule}, {s.module or '-'}): "
                     f"in {s.relevance_in:.6g}, out {s.relevance_out:.6g}, lost {s.relative_gap:.3%}; "
                     f"absorbed by {s.absorbed}" for s in bad]
            raise ConservationError(
                f"{len(bad)} site(s) of {self.composite} lose more than {tolerance:g} of their relevance:\n"
                + "\n".join(lines)
                + "\nBiases and ε absorb relevance by design: leave biases out of the rules "
                "(zero_bias=True in the presets and classic rules), lower ε, or raise the tolerance.")

    def __str__(self) -> str:
        rows = [("", "kind", "label", "rule", "module", "R in", "R out", "gap", "gap %", "absorbed")]
        for s in self.sites:
            rows.append((str(s.index), s.kind, s.label, s.rule, s.module or "-", f"{s.relevance_in:.6g}",
                         f"{s.relevance_out:.6g}", f"{s.gap:.3g}", f"{100 * s.relative_gap:.3g}",
                         s.absorbed))
        lines = [f"composite: {self.composite}"]
        lines += table(rows, (4, 12, 10, 26, 18, None, None, None, None, 24))   # numbers never wrap
        lines.append(f"output relevance {self.output_relevance:.6g}, input relevance "
                     f"{self.input_relevance:.6g} ({_percent(self.input_relevance, self.output_relevance)} "
                     f"of it)")
        if self.untapped:
            lines.append(f"{self.untapped} sites inside scan/cond/remat bodies are not in the table")
        return "\n".join(lines)


def _percent(a: float, b: float) -> str:
    return f"{100 * a / b:.4g} %" if b else "n/a"


def conservation(fun: Callable, *args: Any, target: Any, composite: Any = None,
                 argnums: int | Sequence[int] = 1, strict: bool = False,
                 tolerance: float = 1e-3) -> ConservationReport:
    """The site-by-site relevance balance of ``lrp(fun, composite, argnums=argnums)(*args, target=...)``.

    Args:
      fun, args, target, argnums: as for :func:`lfp_jax.lrp` (``target``: class labels or the output
        relevance).
      composite: default :func:`~lfp_jax.composites.attn_lrp`.
      strict: raise :class:`~lfp_jax.errors.ConservationError` where a conservative rule loses more than
        ``tolerance`` (relative to the relevance reaching the site).

    Returns:
      A :class:`ConservationReport`. Runs eagerly (a diagnostic, not for a training loop).
    """
    composite = attn_lrp() if composite is None else check_composite(composite)
    nums = _arguments.as_argnums(argnums, "argnums")
    inputs = _arguments.input_argnums(nums, len(args), ())
    t = Traced(fun, args, composite, (), False, inputs, None)
    plan = t.plan
    sites = [s for s in plan.schedule if isinstance(s, _sites.Site)]
    g = plan.graph

    def zeros(atom):
        aval = g.aval(atom)
        return jnp.zeros(aval.shape, aval.dtype)

    # a site's output and what its block does to it alone (moves, a bias, a scale): the relevance
    # reaching any of these values from other computations reached the site; the block's own reads are
    # not counted
    closure, skip = {}, set()
    producer = {o: i for i, n in enumerate(g.nodes) for o in n.outputs if o is not None}
    uses: dict[int, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for a in n.inputs:
            if isinstance(a, int):
                uses.setdefault(a, []).append(i)
    for s in sites:
        values, stack = [s.output], [s.output]
        while stack:
            v = stack.pop()
            for i in uses.get(v, ()):
                node = g.nodes[i]
                floats = [a for a in node.inputs if isinstance(a, int) and a in plan.tainted]
                if (i not in plan.site_of_node and node.name in _MOVES | _AFFINE and floats == [v]
                        and len(node.outputs) == 1 and node.outputs[0] is not None):
                    skip.add(i)
                    values.append(node.outputs[0])
                    stack.append(node.outputs[0])
        closure[id(s)] = values
    del producer
    taps = {"out": {v: (zeros(v),) * 3 for s in sites for v in closure[id(s)]},
            "in": {(k, j): zeros(a) for k, s in enumerate(sites)
                   for j, (a, c) in enumerate(zip(s.operands, s.carries_reward)) if c},
            "skip": frozenset(skip), "values": {}}

    outs, vjp, extra = t.vjp(taps)
    values, moved = extra["values"], extra["moved"]
    outputs = jax.tree_util.tree_unflatten(t.full_out_tree, outs)
    reward = _arguments.check_reward(_arguments.output_relevance(outputs, target), outputs, t.out_tree)
    seeds, given = t.seeds(outs, reward)
    ct_leaves, ct_carriers, ct_taps = vjp(seeds)
    input_total = sum(float(jnp.sum(ct)) for ct in ct_carriers)  # token ids: their relevance
    for k, ct in zip(t.diff, ct_leaves):
        if not t.is_param[k]:
            input_total += float(jnp.sum(ct if k in plan.relevance_inputs else t.leaves[k] * ct))

    rows = []
    for k, site in enumerate(sites):
        ops, out = values[k]
        r_in = sum(float(jnp.sum(_record.relevance(plan, site, v, moved[v], ct_taps["out"][v], given)))
                   for v in closure[id(site)])
        r_out = 0.0
        handed_r = site.rule.returns_relevance or (site.kind == "max_pool" and site.relevance_output)
        for j, (op, c) in enumerate(zip(ops, site.carries_reward)):
            if c:
                ct = ct_taps["in"][(k, j)]
                r_out += float(jnp.sum(ct if handed_r else op * ct))
        if site.kind == "embedding":   # no input carries reward: the lookup hands its relevance to the
            r_out = r_in               # token ids whole (each token's relevance sums its features)
        gap = r_in - r_out
        rows.append(SiteBalance(
            index=k, kind=site.kind, label=site.label, rule=rule_name(site.rule), module=site.path,
            source=short_source(site.source_line), relevance_in=r_in, relevance_out=r_out, gap=gap,
            relative_gap=gap / abs(r_in) if r_in else (0.0 if gap == 0 else float(np.sign(gap))),
            absorbed=_absorbers(site, plan), conservative=bool(getattr(site.rule, "conservative", False))))
    untapped = sum(1 for depth, _ in _sites.iter_sites(plan) if depth > 0)
    total_out = float(sum(jnp.sum(r) for r in given.values()))
    report = ConservationReport(composite.name, tuple(rows), total_out, input_total, untapped)
    if strict:
        report.check(tolerance)
    return report


def _absorbers(site: Any, plan: Any) -> str:
    """What in the site can take relevance: its bias, its ε, the ε of the block below."""
    rule, parts = site.rule, []
    adds = any(p in ("add", "sub") for p in site.primitives[getattr(site, "head", 1):])
    if site.kind == "linear" and adds and not getattr(rule, "zero_bias", False) \
            and type(rule).__name__ not in ("Flat", "ZBox"):
        parts.append("bias")
    eps = getattr(rule, "epsilon", None)
    if isinstance(eps, (int, float)) and eps > 0:
        parts.append(f"ε={eps:g}")
    elif eps == 0:
        parts.append("denominators that are 0")
    elif site.input_epsilon:
        parts.append(f"ε={site.input_epsilon:g} of the block below")
    boundary = plan.stabilize.get(site.output)
    if isinstance(boundary, float) and boundary > 0 and not (isinstance(eps, float) and eps > 0):
        parts.append(f"ε={boundary:g} of its block")
    return ", ".join(parts) or "-"
