"""The tables lfp_jax prints: :func:`~lfp_jax.describe`'s sites, the missing-rule report of
:class:`~lfp_jax.errors.NoRuleError` with a hint per kind of site, and the cell formatting both share.

Everything here reads a finished analysis (a :class:`~lfp_jax.sites.Plan` and the traced model's leaf
bookkeeping) and returns text; nothing calls back into the transformations.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

MIXED = "a product of a value computed from the input with one computed only from another argument"


_OPAQUE_ATTENTION = re.compile(r"cudnn|flash|fused|dot_product_attention|custom_call|mosaic|triton",
                               re.IGNORECASE)

_HINTS = {
    "opaque_attention": (
        "`{label}` is an attention implementation the engine cannot see into (a fused kernel), so "
        "its softmax and products cannot get their rules. Use the XLA implementation: "
        "jax.nn.dot_product_attention(..., implementation='xla'), or Flax's attention modules, which "
        "are written in jnp."),
    "unknown": (
        "lfp_jax has no feedback rule for the primitive `{label}`. If it acts elementwise, moves "
        "values, is linear in its input or selects one input per output, declare it with "
        "lfp_jax.sites.register_primitive({label!r}, 'elementwise' | 'structural' | 'mixing' | "
        "'routing')."),
    "softmax": (
        "a softmax of input-dependent values inside the model, and this composite has no rule for it. "
        "The presets give it AttnLRP's rule: composite.with_rules((Match(kind='softmax', "
        "label='softmax'), rules.SoftmaxTaylor()))."),
    "logsumexp": (
        "a log-softmax or log-sum-exp of input-dependent values inside the model: no LRP rule is "
        "defined for it (AttnLRP's is for the softmax). A log-softmax at the output belongs in the "
        "reward: return the logits; inside the model, use jax.nn.softmax. To accept the plain gradient "
        "here, say so: composite.with_rules((Match(label='logsumexp'), rules.Gradient()))."),
    "bilinear": (
        "a product of input-dependent values (attention scores q·kᵀ, attention weights · values, a "
        "gate such as an LSTM's σ(·) ⊙ tanh(·)), and this composite has no rule for it. The presets "
        "give products AttnLRP's uniform rule: composite.with_rules((Match(kind='bilinear'), "
        "rules.UniformProduct()))."),
    "quotient": (
        "a quotient of two input-dependent values (a normalisation written by hand, a ratio): no LRP "
        "rule splits reward between a numerator and a denominator. A normalisation by a reduced "
        "standard deviation or norm (sqrt/rsqrt of a sum) is recognised as one; otherwise hold the "
        "denominator constant with jax.lax.stop_gradient, or opt in to the plain gradient: "
        "composite.with_rules((Match(kind='quotient'), rules.Gradient()))."),
    "bool_to_float": (
        "a float made from a comparison (or another boolean or integer) of input-dependent values that "
        "was reshaped, broadcast, stacked by a loop or combined with an index before its conversion. "
        "A comparison converted to float is a step activation only where the conversion follows the "
        "comparison: convert where you compare ((h > 0).astype(h.dtype), inside a scan body before "
        "the values are stacked), apply boolean masks with jnp.where, or use lfp_jax.nn.lif_step for "
        "spiking neurons."),
    "nonlinear": (
        "input-dependent values combined in a way no rule covers: neither an activation of one value, "
        "a normalisation, a softmax, a product of values nor a max of two values. A Gradient rule "
        "(Match(kind='nonlinear')) would give the whole region the plain gradient, every layer among "
        "its primitives included; rewriting the computation is usually better."),
}



def problem_report(t: Any, missing: list) -> str:
    """One error for every site without a rule: a table like describe's, then one hint per kind."""
    rows = [(str(n), s.kind, s.label, s.path or "-", prims(s), short_source(s.source_line))
            for n, s in enumerate(missing)]
    lines = [f"lfp_jax has no feedback rule for {len(missing)} site{'s' * (len(missing) != 1)} of this "
             f"model (LFP never falls back to the plain gradient silently):"]
    lines += table([("", "kind", "label", "module", "primitives", "source")] + rows,
                    (4, 14, 14, 34, 22, 36))
    hints: dict[str, list[int]] = {}
    for n, site in enumerate(missing):
        if "only applies" in (site.problem or ""):  # a rule the composite chose for the wrong kind
            hint = site.problem
        elif site.problem == MIXED:
            hint = (MIXED + ". If that argument is an input too, say so with input_argnums (then the "
                    "product gets AttnLRP's rule).")
        elif site.kind == "unknown" and _OPAQUE_ATTENTION.search(site.label):
            hint = _HINTS["opaque_attention"].format(label=site.label)
        else:
            hint = _HINTS.get(site.label, _HINTS.get(site.kind, site.problem or "")).format(
                label=site.label)
        hint = hint + site.hint + argument_hint(t, site)
        hints.setdefault(hint, []).append(n)
    for hint, ns in hints.items():
        kind = missing[ns[0]].kind
        which = ("site " if len(ns) == 1 else "sites ") + ", ".join(map(str, ns))
        lines.append(f"{which} ({kind}): {hint}")
    return "\n".join(lines)



def argument_hint(t: Any, site) -> str:
    """When the model's arguments are all inputs by default and a refused site depends on an
    argument that may be a constant (running statistics, a mask), say how to declare the inputs."""
    if t.input_argnums is not None or not site.sources:
        return ""
    inputs = sorted({t.positions[k] for k, i in zip(t.owner, t.in_taint) if i})
    if len(inputs) < 2:
        return ""

    def args(mask):
        return [p for p in inputs if mask >> p & 1]

    per_operand = [args(m) for m in site.sources]
    first = inputs[0]
    suspects = sorted({p for ops in per_operand if first not in ops for p in ops})
    if not suspects:
        return ""
    keep = tuple(p for p in inputs if p not in suspects)
    what = "; ".join(t.argument(p) for p in suspects)
    return (f" One of its values depends only on {what}. If that argument is a constant (running "
            f"statistics, a mask), name the arguments that carry reward: input_argnums={keep!r}.")



def site_table(composite_name: str, found: list) -> str:
    """:func:`~lfp_jax.describe`'s table of ``found``, ``(depth, site)`` pairs in evaluation order."""
    rows = [("", "kind", "label", "rule", "module", "primitives", "source")]
    for n, (depth, site) in enumerate(found):
        rows.append((str(n), "  " * depth + site.kind, site.label, rule_name(site.rule),
                     site.path or "-", prims(site), short_source(site.source_line)))
    lines = [f"composite: {composite_name}"]
    lines += table(rows, (4, 14, 14, 24, 34, 22, 36))
    lines.append(f"{len(found)} sites")
    missing = [site for _, site in found if site.rule is None]
    if missing:
        lines.append(f"{len(missing)} without a rule (lfp_vjp refuses the model; its error says how "
                     f"to fix each):")
        index = {id(site): n for n, (_, site) in enumerate(found)}
        for site in missing:
            lines.append(f"  site {index[id(site)]} ({site.kind}): {site.problem}")
    lines += parameter_paths([site for _, site in found])
    return "\n".join(lines)


def parameter_paths(found: list) -> list[str]:
    lines = []
    reparam = [(n, s) for n, s in enumerate(found) if s.reparameterized]
    if reparam:
        lines.append("parameters reaching their site through a computation (the effective weight W's "
                     "feedback by the chain rule, F_θ = (∂W/∂θ)ᵀ (|W| ⊙ c_W)):")
        for n, site in reparam:
            for name, prims in site.reparameterized:
                lines.append(f"  site {n} ({site.label}): {name} via {'+'.join(prims)}")
    users: dict[str, list[int]] = {}
    for n, site in enumerate(found):
        for name in site.param_paths:
            users.setdefault(name, []).append(n)
    shared = {name: ns for name, ns in users.items() if len(ns) > 1}
    if shared:
        lines.append("parameters used by several sites (feedback summed over the uses):")
        for name, ns in shared.items():
            kinds = {found[n].kind for n in ns}
            tied = (" (an embedding table shared with another layer: a tied head)"
                    if "embedding" in kinds and kinds - {"embedding"} else "")
            lines.append(f"  {name}: sites {', '.join(map(str, ns))}{tied}")
    return lines


def prims(site, limit: int = 40) -> str:
    """The site's distinct primitives, ``+``-joined, cut after ``limit`` characters."""
    text = "+".join(dict.fromkeys(site.primitives))
    return text if len(text) <= limit else text[:text.rfind("+", 0, limit - 3) + 1] + "..."


def short_source(line: str) -> str:
    """``model.py:12 (Net.__call__)``: the file's base name."""
    path, sep, rest = line.partition(":")
    return os.path.basename(path) + sep + rest if sep else line


def _wrap(text: str, width: int | None) -> list[str]:
    """``text`` cut into pieces of at most ``width`` characters, preferably after ``/``, ``+``, ``,``
    or a space (a long module path, primitive list or rule stays readable); ``None``: never cut (numbers)."""
    if width is None:
        return [text]
    pieces = []
    while len(text) > width:
        cut = max(text.rfind(c, 0, width) for c in "/+, ")
        cut = cut + 1 if cut > 0 else width
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return pieces + [text]


def table(rows: list[tuple], widths: tuple[int | None, ...]) -> list[str]:
    """Rows as aligned columns; a cell longer than its column's width wraps onto further lines (a width of
    ``None``: the column is as wide as its longest cell)."""
    cells = [[_wrap(c, w) for c, w in zip(r, widths)] for r in rows]
    cols = [max(len(piece) for r in cells for piece in r[c]) for c in range(len(widths))]
    lines = []
    for r in cells:
        for k in range(max(len(c) for c in r)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(r, cols)]
            lines.append("  ".join(parts).rstrip())
    return lines


def rule_name(rule: Any) -> str:
    """``Epsilon(1e-06)``, ``Identity()``, ``Gamma(1e-06, gamma=0.25)``: ε first, then other fields."""
    if rule is None:
        return "-- none --"
    if not dataclasses.is_dataclass(rule):
        return repr(rule)
    fields = [f.name for f in dataclasses.fields(rule)]
    parts = []
    if "epsilon" in fields and rule.epsilon is not None:
        parts.append(f"{rule.epsilon:g}" if isinstance(rule.epsilon, float) else repr(rule.epsilon))
    defaults = {f.name: f.default for f in dataclasses.fields(rule)}
    parts += [f"{f}={getattr(rule, f)!r}" for f in fields
              if f != "epsilon" and getattr(rule, f) is not None
              and not (isinstance(getattr(rule, f), bool) and getattr(rule, f) == defaults[f])]
    return f"{type(rule).__name__}({', '.join(parts)})"
