"""Finding the sites of a model: where reward crosses a layer, an activation or a normalisation.

A jaxpr is primitives, not layers. This module reads a :class:`~lfp_jax._graph.Graph` and decides, for
every primitive through which reward can flow, what it is part of:

* **taint**: a value is *input-dependent* if it depends on a floating-point input of the model
  (parameters, constant arguments and integer inputs such as labels or PRNG keys are constants for
  the reward flow); ``stop_gradient`` ends dependence. Only floating-point values carry reward: an
  input-dependent integer or boolean (an arg-max, a sequence length, a mask, a ``cond`` predicate)
  selects as a constant would, except for the comparisons inside an activation such as
  ``(x > 0).astype(f)``. Only values that reach a rewarded output are considered.
* **categories** of single primitives: *structural* (reshape, transpose, slice, concat, ...: reward
  moves unchanged), *mixing* (``dot_general``, convolutions, ``reduce_sum``, sum pooling, the sum of
  two input-dependent values), *elementwise affine* (adding, multiplying or dividing by a constant:
  a bias, a BatchNorm scale in eval mode, the ``1/n`` of a mean), *routing* (max pooling, the
  elementwise ``max``/``min`` of two input-dependent values), and *nonlinear* (everything else).
* **regions**: every nonlinear primitive is grown into the smallest single-input, single-output
  sub-graph around it, using the dominator tree of the data flow (the region's input dominates it, its
  output post-dominates it). A region that is elementwise in its input is an **activation** (ReLU,
  ``x·σ(x)``, inlined GELU, ``(x > 0).astype(f)``, ...); one that normalises by a reduced standard
  deviation is a **normalization** (BatchNorm with batch statistics, LayerNorm, ...); ``exp/Σexp`` is
  a **softmax**. A product of two independent input-dependent values is a **bilinear** site.
* **blocks**: a mixing primitive starts a block that extends through following affine and structural
  primitives (``x @ W`` then ``+ b``); the ε stabiliser of its rule is applied where the block output
  enters another block. A linear site whose rule asks for it (``Rule.merges_affine_tail``: LFP-ε and
  the classic LRP rules) includes the bias and eval-mode normalisation after it; the classic rules
  apply their stabiliser to that layer's own output and take ``R`` there (``rules.ABSOLUTE``).

Every input-dependent primitive ends up in a site, in a block, or in an error that names it and the
user's source line. Unknown primitives can be declared with :func:`register_primitive`.

The work is split: ``_primitives`` (tables and categories), ``_dataflow`` (taint, relevance,
dominator trees), ``_regions`` (region growth and classification), ``_blocks`` (stabilisers and
control-flow sub-plans); this module builds the sites and the :class:`Plan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from lfp_jax import _compat, _embedding, _names, _params
from lfp_jax._blocks import normalize_spikes_in_rules, place_stabilizers
from lfp_jax._dataflow import DataFlow, output_taint, param_origins
from lfp_jax._graph import Graph, Lit, is_float
from lfp_jax._primitives import (
    ELEMENTWISE,
    MIXING,
    NO_REWARD,
    RANDOM,
    ROUTING,
    STRUCTURAL,
    category,
    register_primitive,
)
from lfp_jax._regions import find_regions, product_chains
from lfp_jax.rules import ABSOLUTE, WinnerTakeAll


@dataclasses.dataclass(eq=False)
class Site:
    """A place where one rule decides how reward crosses.

    Attributes:
      kind: ``linear``, ``sum``, ``pool``, ``max_pool``, ``max`` (elementwise max/min of two
        input-dependent values), ``activation``, ``normalization``, ``softmax``, ``dropout``,
        ``spiking``, ``embedding`` (a lookup of a parameter table by token ids, where reward enters),
        ``bilinear`` (a product of input-dependent values), ``quotient``,
        ``nonlinear`` or ``unknown`` (the last three have no rule in the presets).
      label: what it computes (``dense``, ``conv``, ``relu``, ``silu``, ``batch_norm``, ...).
      nodes: indices of its primitives in the graph, in order.
      operands: its external inputs (graph values or constants), reward-carrying ones first.
      output: the value it hands on; ``extras`` are inner values used elsewhere without reward.
      path: the module path of the site, which ``Match(path=...)`` selects by: the linen module path
        (``MLP/Dense_0``), else the attribute path of its parameters (nnx ``layers/0/linear``, equinox
        ``layers/0``; a plain dict ``w1``), else, for a site without parameters, the module holding
        the layer that feeds it ('' when nothing names it).
      name_stack: the raw name stack (linen module path, ``jax.named_scope``; '' for none).
      source_line: the user's code.
      param_paths: leaf paths of the parameters the site uses (through any computation).
      reparameterized: for parameters reaching the site through computations other than moves
        (weight normalisation, ``softplus``/``exp``, ...): ``(leaf path, primitives)`` pairs.
      primitives, params: name and parameters of each primitive in ``nodes``.
      operand_positions, output_positions: for a one-primitive site, where each operand sits among
        the primitive's inputs and where ``(output, *extras)`` sit among its outputs.
      rule: the rule chosen by the composite (``None`` if there is none; ``problem`` says why).
      sources: per reward-carrying operand, the model arguments it depends on (a bit mask).
      hint: what the analysis noticed about a site without a rule (for the error message).
      factors: for a product site, how many input-dependent factors it multiplies (with repeats).
      first: a linear site whose input is a model input, reached only through moves (reshape,
        transpose, ...) and elementwise affine operations (an input normalisation): the *first
        layer* of LRP presets (``Match(first=True)``); inside ``scan``/``cond``/``remat`` bodies, one
        reading a body input that is read so from a model input (not a scan carry).
      relevance_output: an activation whose output receives the relevance ``R`` itself (from a rule
        that hands ``R``, :attr:`lfp_jax.rules.Rule.returns_relevance`), not ``c``.
    """

    kind: str
    label: str
    nodes: tuple[int, ...]
    operands: tuple[Any, ...]
    output: int
    extras: tuple[int, ...]
    name_stack: str
    source_line: str
    primitives: tuple[str, ...]
    params: tuple[dict, ...] = ()
    operand_positions: tuple[int, ...] | None = None
    output_positions: tuple[int, ...] | None = None
    rule: Any = None
    input_epsilon: float | None = None
    carries_reward: tuple[bool, ...] = ()
    normalized_output: bool = False  # spiking: every use wants c = R / spikes; the rule converts
    path: str = ""
    param_paths: tuple[str, ...] = ()
    reparameterized: tuple[tuple[str, tuple[str, ...]], ...] = ()
    problem: str | None = None
    sources: tuple[int, ...] = ()
    hint: str = ""
    factors: int = 0
    first: bool = False  # a linear site reading a model input (through moves and affine ops only)
    head: int = 1  # a merged linear site: its linear part is nodes[:head] (the primitive and moves)
    relevance_output: bool = False  # an activation whose output receives R itself (rules that hand R)
    ids_operands: tuple[int, ...] = ()  # an embedding site: which operands are token ids
    index_weights: tuple[float, ...] | None = None  # a gather's share per index-vector component


@dataclasses.dataclass(eq=False)
class Plan:
    """The analysis of one graph: what the interpreter needs to evaluate it with rules."""

    graph: Graph
    tainted: set
    sites: list
    site_of_node: dict  # node index -> Site (the site is evaluated at its last node)
    stabilize: dict  # value id -> ε of the block whose output it is, where a block boundary wraps it
    wrapped_edges: set  # (node index, operand position) reading the stabilised value
    wrapped_outputs: set  # graph output positions reading the stabilised value
    subplans: dict  # node index -> {param key: Plan | tuple[Plan, ...]}
    output_epsilon: dict  # output position -> ε of the block producing it (for the seed)
    schedule: list = dataclasses.field(default_factory=list)  # node indices and Sites, in order
    relevance_inputs: set = dataclasses.field(default_factory=set)  # input positions receiving R as is
    relevance_edges: dict = dataclasses.field(default_factory=dict)  # (node, pos) -> ε | None: R -> c
    relevance_pass: set = dataclasses.field(default_factory=set)  # affine nodes passing R unchanged
    id_nodes: set = dataclasses.field(default_factory=set)  # nodes the token ids' carriers follow
    id_inputs: set = dataclasses.field(default_factory=set)  # input positions of ids with a carrier
    body_ids: set = dataclasses.field(default_factory=set)  # ids looked up inside control flow
    gather_weights: dict = dataclasses.field(default_factory=dict)  # id nodes: a table looked up by ids
    param_nodes: set = dataclasses.field(default_factory=set)  # nodes computing parameter values
    param_uses: set = dataclasses.field(default_factory=set)  # effective weights read by sites, outputs
    param_use_edges: set = dataclasses.field(default_factory=set)  # (node, position) reading one
    zero_keeping: list = dataclasses.field(default_factory=list)  # per input: zero parameter stays 0


@dataclasses.dataclass(frozen=True)
class Context:
    """What every (sub-)analysis of one model shares: the composite and the parameters' leaf paths."""

    composite: Any
    leaf_paths: tuple[str, ...] = ()


def analyse(graph: Graph, in_taint: list[bool], out_relevant: list[bool], composite: Any, *,
            in_eps: list | None = None, wrap_out: list | None = None, in_src: list | None = None,
            in_origin: list | None = None, in_class: list | None = None,
            leaf_paths: Sequence[str] = (), nested: bool = False, in_first: list | None = None,
            in_relevance: list | None = None, in_roles: list | None = None) -> Plan:
    """Find the sites of ``graph`` and resolve their rules.

    A site the composite has no rule for keeps ``rule=None`` and says why in ``Site.problem``; the
    caller reports all of them at once (see :func:`problems`).

    Args:
      graph: the flattened model.
      in_taint: per input, whether it is input-dependent (carries reward).
      out_relevant: per output, whether it receives reward.
      composite: chooses the rule of each site.
      in_eps: per input, the ε of the block whose not-yet-stabilised output it is (sub-graphs).
      wrap_out: per output, stabilise a pending block output inside this graph (default: no, its ε
        is reported in ``Plan.output_epsilon`` for the caller: the seed, or the enclosing graph).
      in_src: per input, a bit mask of the model arguments it comes from (for error messages).
      in_origin: per input, ``(parameter leaves, primitives)`` for values computed from parameters
        only, else ``None``; ``leaf_paths`` names the leaves.
      in_class: per input, the :class:`~lfp_jax._dataflow.IndexClass` of an input-dependent integer
        or boolean input (sub-graphs).
      nested: the graph is the body of a ``scan``/``cond``/``remat`` (its inputs are not the model's).
      in_first: per input of a body, whether it is read from a model input through moves and affine
        operations only (for ``Match(first=True)``).
      in_relevance: per input of a body, whether a rule inside may hand ``R`` itself to it (the
        enclosing graph then carries it on: ``Plan.relevance_inputs``).
      in_roles: per input, ``"ids"`` (token ids), ``"param"`` (a parameter) or ``None``: where
        embedding lookups are (see :mod:`lfp_jax._embedding`).
    """
    context = composite if isinstance(composite, Context) else Context(composite, tuple(leaf_paths))
    n_in, n_out = len(graph.inputs), len(graph.outputs)
    return _Analysis(graph, in_taint, out_relevant, context,
                     list(in_eps) if in_eps is not None else [None] * n_in,
                     list(wrap_out) if wrap_out is not None else [False] * n_out,
                     in_src, in_origin if in_origin is not None else [None] * n_in, in_class,
                     nested, in_first, in_relevance, in_roles).run()


def problems(plan: Plan) -> list[Site]:
    """The sites of ``plan`` (sub-plans included) that have no rule, in order."""
    return [site for _, site in iter_sites(plan) if site.rule is None]


def _position(atoms: tuple, atom: Any) -> int:
    """Index of ``atom`` (a value id or a constant) in ``atoms``, by identity for constants."""
    return next(k for k, b in enumerate(atoms)
                if (b is atom) or (isinstance(atom, int) and isinstance(b, int) and b == atom))


class _Analysis(DataFlow):
    def __init__(self, graph: Graph, in_taint, out_relevant, context, in_eps, wrap_out, in_src,
                 in_origin, in_class, nested=False, in_first=None, in_relevance=None, in_roles=None):
        super().__init__(graph, in_taint, out_relevant, in_src, in_class, in_roles)
        self.nested = nested
        self.in_first, self.in_relevance = in_first, in_relevance
        self.rewarded_outputs = {o for o, r in zip(graph.outputs, out_relevant) if r and isinstance(o, int)}
        self.context, self.composite = context, context.composite
        self.in_eps, self.wrap_out = in_eps, wrap_out
        self.origin = param_origins(graph, in_origin, self.tainted, self.roles)

    def subplan(self, graph: Graph, taint: list[bool], **kwargs: Any) -> Plan:
        """The analysis of a control-flow body (``_blocks`` asks for it: no import of this module there)."""
        return analyse(graph, taint, output_taint(graph, taint, kwargs.get("in_roles")), self.context,
                       nested=True, **kwargs)

    def run(self) -> Plan:
        # control flow reading only token ids still holds sites when a lookup inside is an embedding
        cats = {i: category(self, i) for i in self.rel_nodes if self._tin(i) or i in self.sub_in}
        region_of, singles = find_regions(self, cats)
        self._chains = product_chains(self, singles)
        for i in self.unclassified:
            if self._feeds_rewarded_output(i):
                cats[i] = "unclassified"
                singles[i] = ("nonlinear", "bool_to_float")
        return self._build_plan(cats, region_of, singles)

    def _feeds_rewarded_output(self, i: int) -> bool:
        """Whether node ``i``'s outputs reach a rewarded output or a value that carries reward."""
        stack, seen = list(self.g.nodes[i].outputs), set()
        while stack:
            v = stack.pop()
            if v is None or v in seen:
                continue
            seen.add(v)
            if v in self.relevant or v in self.rewarded_outputs:
                return True
            for j in self.uses.get(v, ()):
                stack.extend(self.g.nodes[j].outputs)
        return False

    def _build_plan(self, cats, region_of, singles) -> Plan:
        g = self.g
        sites: list[Site] = []
        site_of_node: dict[int, Site] = {}
        seen_regions = set()
        for i in sorted(cats):
            if i in region_of:
                x, region, y, kind, label = region_of[i]
                if id(region) in seen_regions:
                    continue
                seen_regions.add(id(region))
                site = self._make_site(kind, label, sorted(region), [x], y)
            elif i in self._chains:
                chain = self._chains[i]
                if i != chain[-1]:
                    continue
                site = self._make_site(*singles[i], list(chain), None, None)
            elif i in singles:
                site = self._make_site(*singles[i], [i], None, None)
            else:
                site = self._single_site(i, cats)
                if site is None:
                    continue
            sites.append(site)
            for r in site.nodes:
                site_of_node[r] = site
        for i in sorted(self.embeddings):
            if i in self.rel_nodes:
                site = _embedding.embedding_site(self, i)
                sites.append(site)
                site_of_node[i] = site
        for site in sites:
            if site.kind == "bilinear":
                site.factors = self._factors(site)
            if site.kind == "bilinear" and any(
                    site_of_node.get(self.producer.get(a)) is not None
                    and site_of_node[self.producer[a]].label == "step" for a in site.operands
                    if isinstance(a, int)):
                site.hint = (" One of its operands is a step (a comparison cast to float) of an "
                             "input-dependent value; if it is a mask, apply the boolean with "
                             "jnp.where(mask, x, 0), a constant selector (or count with integers).")
        plan = Plan(g, self.tainted, sites, site_of_node, {}, set(), set(), {}, {})
        plan.schedule = self._schedule(site_of_node)
        self._site_of_node = site_of_node
        _names.attach_parameters(self, plan, cats)
        if not self.nested or self.in_first is not None:
            self._mark_first_layers(sites, cats)
        for site in sites:
            site.rule, site.problem = self.composite.lookup(site)
        if self._merge_affine_tails(plan, cats):
            plan.schedule = self._schedule(site_of_node)
        place_stabilizers(self, plan, cats, self.context, self.in_eps, self.wrap_out)
        _embedding.trace_ids(self, plan)   # after the bodies: ids looked up inside them
        plan.param_nodes = _params.param_nodes(self)
        plan.param_uses, plan.param_use_edges = _params.uses(self, plan)
        plan.zero_keeping = _params.zero_keeping(self, plan)
        self._hand_relevance(plan, cats)
        normalize_spikes_in_rules(self, plan)
        return plan

    # -- classic LRP layers -----------------------------------------------------------------------

    def _mark_first_layers(self, sites: list, cats: dict) -> None:
        """``Site.first``: linear sites whose input comes from a model input through moves and
        elementwise affine operations only."""
        for site in sites:
            if site.kind != "linear":
                continue
            stack = [a for a, c in zip(site.operands, site.carries_reward) if c]
            reached, seen = bool(stack), set()
            while stack and reached:
                a = stack.pop()
                if a in seen:
                    continue
                seen.add(a)
                p = self.producer.get(a)
                if p is None:  # a graph input: the model's, or a body input read from one
                    reached = reached and self._is_model_input(a)
                    continue
                if cats.get(p) not in ("structural", "affine") or p in self._site_of_node:
                    reached = False
                stack.extend(self._tin(p))
            site.first = reached

    def _is_model_input(self, v: int) -> bool:
        if not self.nested:
            return True
        k = self.g.inputs.index(v)
        return bool(self.in_first and self.in_first[k])

    def reads_model_input(self, a: int) -> bool:
        """Whether value ``a`` is a model input, or computed from one by moves and affine operations."""
        stack, seen = [a], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            p = self.producer.get(v)
            if p is None:
                if v not in self.tainted or not self._is_model_input(v):
                    return False
                continue
            if category(self, p) not in ("structural", "affine") or p in getattr(self, "_site_of_node", {}):
                return False
            stack.extend(self._tin(p))
        return True

    def _merge_affine_tails(self, plan: Plan, cats: dict) -> bool:
        """Extend linear sites whose rule asks for it (:attr:`Rule.merges_affine_tail`) over the chain
        of elementwise affine operations after them (``+ b``; an eval-mode BatchNorm's ``− μ``, ``·γ/σ``,
        ``+ β``): each link's only input-dependent operand is the previous link, used nowhere else."""
        g, changed = self.g, False
        for site in plan.sites:
            if (site.kind != "linear" or site.rule is None or len(site.nodes) != 1
                    or not site.rule.merges_affine_tail):
                continue
            chain, v, moves = [], site.output, 0
            while v not in self.graph_outputs and len(self.uses.get(v, ())) == 1:
                (j,) = self.uses[v]
                node = g.nodes[j]
                if j in plan.site_of_node or self._tin(j) != [v] or list(node.inputs).count(v) != 1 \
                        or len(node.outputs) != 1 or g.aval(node.outputs[0]).dtype != g.aval(v).dtype:
                    break
                if cats.get(j) == "structural" and node.name in ("transpose", "reshape") \
                        and moves == len(chain):  # (W.T @ x.T).T + b, equinox's Linear under vmap
                    moves += 1
                elif cats.get(j) != "affine" or g.aval(node.outputs[0]).shape != g.aval(v).shape:
                    break
                chain.append(j)
                v = node.outputs[0]
            chain = chain if len(chain) > moves else []
            if not chain:
                continue
            fresh = self._make_site(site.kind, site.label, list(site.nodes) + chain, None, v)
            for name in ("nodes", "operands", "output", "extras", "primitives", "params",
                         "operand_positions", "output_positions", "carries_reward", "sources"):
                setattr(site, name, getattr(fresh, name))
            site.head = 1 + moves
            for j in chain:
                plan.site_of_node[j] = site
            changed = True
        return changed

    def _hand_relevance(self, plan: Plan, cats: dict) -> None:
        """Edges into the sites of rules that hand ``R`` itself (:attr:`Rule.returns_relevance`).

        Walking back from each such operand through moves, elementwise affine operations that are in no
        block (an input normalisation ``(x − μ)/σ``: the relevance of a value is that of its image) and
        winner-takes-all pooling, ``R`` reaches
        a producer that takes it as it is: a model input (its relevance is returned as is), an
        activation (:attr:`Rule.accepts_relevance`: ``c_x = R / stab(x)``), a site whose output takes
        ``R`` (:data:`~lfp_jax.rules.ABSOLUTE`). Otherwise the edge where the walk stops converts it:
        ``c = R / stab(v)`` where a block's ε applies, else ``c = R / v``. Every other use of a value
        that carries ``R`` converts its ``c`` with ``R = v ⊙ c`` (an ``ABSOLUTE`` boundary).
        """
        g = self.g
        inputs = {v: k for k, v in enumerate(g.inputs)}
        r_edges: set[tuple[int, int]] = set()
        r_values: set[int] = set()

        def convert(edge, value, eps):
            plan.wrapped_edges.discard(edge)
            plan.relevance_edges[edge] = eps

        def walk(value: int, edge: tuple[int, int]) -> None:
            while True:
                r_edges.add(edge)
                if edge in plan.wrapped_edges:  # a pending block output: its boundary takes R
                    e = plan.stabilize[value]
                    if e is ABSOLUTE:
                        plan.wrapped_edges.discard(edge)
                    else:
                        convert(edge, value, e)
                    return
                p = self.producer.get(value)
                if p is None:
                    if self.nested and not (self.in_relevance and self.in_relevance[inputs[value]]):
                        convert(edge, value, None)  # scan/cond bodies: c = R / x at the body input
                    else:
                        r_values.add(value)
                        plan.relevance_inputs.add(inputs[value])
                    return
                site = plan.site_of_node.get(p)
                if site is not None:
                    rule = site.rule
                    if site.output != value:
                        convert(edge, value, None)
                    elif site.kind == "activation" and getattr(rule, "accepts_relevance", False):
                        r_values.add(value)
                        site.relevance_output = True
                    elif rule is not None and rule.output_epsilon is ABSOLUTE:
                        pass
                    elif (site.kind == "max_pool" and isinstance(rule, WinnerTakeAll)
                          and sum(site.carries_reward) == 1 and len(site.nodes) == 1):
                        r_values.add(value)
                        site.relevance_output = True  # R is routed to the winner as it is
                        operand = site.operands[0]
                        edge = (site.nodes[0], list(g.nodes[site.nodes[0]].inputs).index(operand))
                        value = operand
                        continue
                    else:
                        convert(edge, value, None)
                    return
                node = g.nodes[p]
                tin = self._tin(p)
                if (node.name in STRUCTURAL or node.name == "convert_element_type"
                        or cats.get(p) == "affine") and len(tin) == 1 and not node.subgraphs:
                    if cats.get(p) == "affine":
                        plan.relevance_pass.add(p)  # R_x = R_y: evaluated with an identity VJP
                    r_values.add(value)
                    edge, value = (p, list(node.inputs).index(tin[0])), tin[0]
                    continue
                convert(edge, value, None)
                return

        for i, subs in plan.subplans.items():  # a remat body handing R to its inputs
            body = subs.get("jaxpr") if g.nodes[i].name in _compat.REMAT else None
            if isinstance(body, Plan):
                for k in sorted(body.relevance_inputs):
                    a = g.nodes[i].inputs[k]
                    if isinstance(a, int):
                        walk(a, (i, k))
        for site in plan.sites:
            if site.rule is None or not site.rule.returns_relevance:
                continue
            for a, carries in zip(site.operands, site.carries_reward):
                if not (carries and isinstance(a, int)):
                    continue
                for r in site.nodes:
                    for pos, b in enumerate(g.nodes[r].inputs):
                        if isinstance(b, int) and b == a:
                            walk(a, (r, pos))
        for v in r_values:
            for i in self.uses.get(v, ()):
                for p, b in enumerate(g.nodes[i].inputs):
                    if isinstance(b, int) and b == v and (i, p) not in r_edges:
                        plan.stabilize[v] = ABSOLUTE
                        plan.wrapped_edges.add((i, p))
            for pos, o in enumerate(g.outputs):
                if isinstance(o, int) and o == v:
                    plan.stabilize[v] = ABSOLUTE
                    plan.wrapped_outputs.add(pos)

    def _factors(self, site: Site) -> int:
        """Input-dependent factors of a product site, counted with repeats (``a * a * b``: 3)."""
        inside = {o for r in site.nodes for o in self.g.nodes[r].outputs}
        return sum(1 for r in site.nodes for p in self.edges.get(r, ())
                   if self.g.nodes[r].inputs[p] not in inside) or 2

    def _schedule(self, site_of_node: dict) -> list:
        """A topological order of nodes in which each site is one step.

        A site is evaluated as a whole, so values computed inside it (e.g. batch statistics that a
        BatchNorm also stores) are available only after it; consumers outside wait for it.
        """
        g = self.g
        unit = [site_of_node.get(i, i) for i in range(len(g.nodes))]
        done, order = set(), []
        for start in range(len(g.nodes)):
            stack = [(unit[start], False)]
            while stack:
                u, expanded = stack.pop()
                key = id(u) if isinstance(u, Site) else u
                if key in done:
                    continue
                if expanded:
                    done.add(key)
                    order.append(u)
                    continue
                stack.append((u, True))
                members = u.nodes if isinstance(u, Site) else (u,)
                for r in members:
                    for a in g.nodes[r].inputs:
                        p = self.producer.get(a) if isinstance(a, int) else None
                        if p is not None and unit[p] is not u:
                            pu = unit[p]
                            if (id(pu) if isinstance(pu, Site) else pu) not in done:
                                stack.append((pu, False))
        return order

    def _single_site(self, i: int, cats) -> Site | None:
        node, cat = self.g.nodes[i], cats[i]
        name = node.name
        if cat == "mixing":
            kind, label = {
                "dot_general": ("linear", "dense"),
                "conv_general_dilated": ("linear", "conv"),
                "reduce_window_sum": ("pool", "avg_pool"),
                "reduce_sum": ("pool", "reduce_sum"),
                "cumsum": ("pool", "cumsum"),
            }.get(name, ("sum", "sum") if name in ("add", "sub", "add_any") else ("pool", name))
            return self._make_site(kind, label, [i], None, None)
        if cat == "select":
            label = {"max": "maximum", "min": "minimum"}.get(name, "where_max")
            return self._make_site("max", label, [i], None, None)
        if cat == "routing":
            return self._make_site("max_pool", name.replace("reduce_window_", "") + "_pool"
                                   if "window" in name else name, [i], None, None)
        if cat == "spiking":
            return self._make_site("spiking", "lif", [i], None, None)
        if cat == "structural" and name == "select_n":
            return self._dropout_site(i)
        return None

    def _dropout_site(self, i: int) -> Site | None:
        """``select_n(mask, 0, x / keep)`` with a random mask (drawn from a PRNG key inside ``fun``).

        A mask that is not random (padding, causal masks) makes no dropout site: masked scaling is an
        affine block like any other.
        """
        node = self.g.nodes[i]
        if not self._is_random(node.inputs[0]):
            return None
        cases = [a for a in node.inputs[1:] if self._t(a)]
        if len(cases) != 1:
            return None
        p = self.producer.get(cases[0])
        if p is None or len(self.consumers.get(cases[0], [])) != 1:
            return None
        scale = self.g.nodes[p]
        if scale.name not in ("mul", "div") or len(self._tin(p)) != 1:
            return None
        const = [a for a in scale.inputs if not self._t(a)]
        if not const or self.g.aval(const[0]).shape != ():
            return None
        return self._make_site("dropout", "dropout", [p, i], None, None)

    def _is_random(self, atom) -> bool:
        """Whether ``atom`` is computed from random bits (``random_bits``, ``threefry2x32``, ...)."""
        stack, seen = [atom], set()
        while stack:
            a = stack.pop()
            p = self.producer.get(a) if isinstance(a, int) else None
            if p is None or p in seen:
                continue
            seen.add(p)
            if self.g.nodes[p].name in RANDOM:
                return True
            stack.extend(self.g.nodes[p].inputs)
        return False

    def _make_site(self, kind, label, nodes, sources, output) -> Site:
        g = self.g
        nodes = sorted(nodes)
        inside = {o for r in nodes for o in g.nodes[r].outputs if o is not None}
        operands, seen = [], set()
        for r in nodes:
            for a in g.nodes[r].inputs:
                key = a if isinstance(a, int) else id(a)
                if (isinstance(a, int) and a in inside) or key in seen:
                    continue
                seen.add(key)
                operands.append(a)
        carries = [self._t(a) and is_float(g.aval(a)) for a in operands]
        order = sorted(range(len(operands)), key=lambda k: not carries[k])
        operands = [operands[k] for k in order]
        if output is None:
            output = [o for o in g.nodes[nodes[-1]].outputs if o is not None][0]
        extras = tuple(
            o for r in nodes for o in g.nodes[r].outputs
            if o is not None and o != output and self._used_outside(o, set(nodes))
        )
        first = g.nodes[nodes[0]]
        single = g.nodes[nodes[0]] if len(nodes) == 1 else None
        return Site(
            kind=kind, label=label, nodes=tuple(nodes), operands=tuple(operands), output=output,
            extras=extras, name_stack=first.path, source_line=first.where,
            primitives=tuple(g.nodes[r].name for r in nodes),
            params=tuple(g.nodes[r].params for r in nodes),
            operand_positions=None if single is None else tuple(
                _position(single.inputs, a) for a in operands),
            output_positions=None if single is None else tuple(
                _position(single.outputs, v) for v in (output,) + extras),
            carries_reward=tuple(carries[k] for k in order),
            sources=tuple(self.sources.get(a, 0) for a, k in zip(operands, order) if carries[k]),
        )

    def _used_outside(self, v: int, nodes: set[int]) -> bool:
        return v in self.graph_outputs or bool(self.uses.get(v, set()) - nodes)


def iter_sites(plan: Plan, depth: int = 0) -> Iterable[tuple[int, Site]]:
    """All sites of a plan and its sub-plans, with their nesting depth."""
    for step in plan.schedule:
        if isinstance(step, Site):
            yield depth, step
            continue
        for sub in plan.subplans.get(step, {}).values():
            for s in sub if isinstance(sub, tuple) else (sub,):
                yield from iter_sites(s, depth + 1)


__all__ = ["Site", "Plan", "Context", "analyse", "problems", "register_primitive", "iter_sites",
           "output_taint", "Lit", "STRUCTURAL", "ROUTING", "MIXING", "ELEMENTWISE", "NO_REWARD"]
