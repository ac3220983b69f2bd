"""Names of sites: the parameters each site uses and its module path, which ``Match(path=...)`` selects
by and ``describe`` shows (see :attr:`lfp_jax.sites.Site.path`)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def attach_parameters(flow, plan, cats: dict) -> None:
    """Give every site the parameters it uses (its own operands, and the biases and scales applied
    in its block: ``x @ W`` then ``+ b``) and its module path (see :attr:`Site.path`)."""
    g, paths = flow.g, flow.context.leaf_paths
    flow._own = {}   # id(site) -> the paths of the site's own weights
    owner: dict = {}
    used: dict[int, dict] = {}  # id(site) -> {leaf: primitives}

    def take(site, atoms):
        entry = used.setdefault(id(site), {})
        for a in atoms:
            found = flow.origin.get(a) if isinstance(a, int) else None
            if found is not None:
                for leaf in found[0]:
                    entry[leaf] = entry.get(leaf, frozenset()) | found[1]

    for step in plan.schedule:
        if not isinstance(step, int):
            take(step, step.operands)
            if step.kind not in ("activation", "dropout"):
                owner[step.output] = step
            continue
        if cats.get(step) not in ("affine", "structural", "routing"):
            continue
        tin = flow._tin(step)
        if len(tin) == 1 and tin[0] in owner:
            site = owner[tin[0]]
            take(site, [a for a in g.nodes[step].inputs if not (isinstance(a, int) and a in tin)])
            for o in g.nodes[step].outputs:
                if o is not None:
                    owner[o] = site
    for site in plan.sites:
        own = {leaf for a in site.operands if isinstance(a, int) and a in flow.origin
               for leaf in flow.origin[a][0]}
        flow._own[id(site)] = [paths[leaf] for leaf in sorted(own) if leaf < len(paths)]
        entry = used.get(id(site), {})
        named = sorted((paths[leaf] if leaf < len(paths) else f"leaf {leaf}", prims)
                       for leaf, prims in entry.items())
        site.param_paths = tuple(name for name, _ in named)
        site.reparameterized = tuple((name, tuple(sorted(p))) for name, p in named if p)
    for site in plan.schedule:
        if not isinstance(site, int):
            site.path = module_path(flow, site)

def module_path(flow, site) -> str:
    scope = clean_name_stack(site.name_stack)
    if scope:
        return scope
    own = flow._own.get(id(site))
    if own:  # a layer's own weights name it, not the biases and scales applied after it
        return parent(own)
    if site.param_paths:
        return parent(site.param_paths)
    # no parameters: the module holding the layer that feeds the site
    stack, seen = [a for a in site.operands if flow._t(a)], set()
    while stack:
        a = stack.pop(0)
        p = flow.producer.get(a)
        if p is None or p in seen:
            continue
        seen.add(p)
        feeding = flow._site_of_node.get(p)
        if feeding is not None and feeding is not site and feeding.param_paths:
            return feeding.path.rpartition("/")[0]
        stack.extend(flow._tin(p))
    return ""


_TRANSFORM = re.compile(r"^(vmap|pmap|jvp|transpose|checkpoint|remat|jit|pjit|scan|cond|while)\(.*\)$")


_LIFTED = re.compile(r"^\w+\.\w+_fn$")  # linen's lifted transforms: ``LSTMCell_0.scan_fn``


_METHOD = re.compile(r"^(\w+)\.\w+$")  # a module called through a method: ``Embed_0.attend``


def clean_name_stack(stack: str) -> str:
    """A name stack without transformation wrappers (``vmap(...)``), equinox's class scopes
    (``eqx.nn.Linear``), ``jnp.einsum``'s equations (``bi,bj->bij``) and linen's lifted functions
    (``LSTMCell_0.scan_fn``), with methods reduced to their module (``Embed_0.attend`` →
    ``Embed_0``; ``Transformer/Transformer._apply_attention/layer_0`` → ``Transformer/layer_0``): what is
    left is a module path (linen) or a user's ``jax.named_scope``. A stack of positions only
    (penzai's ``1/0/2``, indices into nested ``Sequential`` layers) names nothing: ``''``."""
    parts: list[str] = []
    for p in stack.split("/"):
        if not p or _TRANSFORM.match(p) or p.startswith("eqx.") or "->" in p or _LIFTED.match(p):
            continue
        method = _METHOD.match(p)
        p = method.group(1) if method else p
        if not (parts and parts[-1] == p):
            parts.append(p)
    if all(p.isdigit() for p in parts):
        return ""
    return "/".join(parts)


def parent(paths: Sequence[str]) -> str:
    """The module holding parameters at ``paths``: their common parent (a top-level leaf: itself)."""
    split = [p.split("/") for p in paths if not p.startswith("<")]  # "<argument 0>": an array
    if not split:
        return ""
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(common) == min(len(p) for p in split):  # one leaf, or a leaf and its own sub-leaves
        last = common[-1]
        if "." in last and not last.startswith("."):   # penzai's labels: ``attention/query.weights``
            common = common[:-1] + [last.partition(".")[0]]
        else:
            common = common[:-1] if len(common) > 1 else common
    return "/".join(common)
