"""A model traced once for given arguments: its graph, its analysis (the plan), and where every leaf of
its arguments goes (a parameter, an input that carries reward, token ids, a constant).

:class:`Traced` is what every transformation builds first. It hands the plan down to the interpreter
(:meth:`Traced.vjp`) and nothing below it calls back: the analysis returns the sites with their
problems, and the reports of :mod:`lfp_jax._report` are made here from them.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util as jtu

from lfp_jax import _arguments, _embedding, _graph, _report, sites
from lfp_jax.composites import Composite, _show, unmatched
from lfp_jax.errors import LFPError, NoRuleError, UnmatchedRuleWarning
from lfp_jax.interpreter import evaluate
from lfp_jax.rules import ABSOLUTE
from lfp_jax.rules._base import output_share


class Traced:
    """``fun`` traced once for given primals: graph, plan, and where every leaf goes.

    Attributes (per traced leaf, in flattening order): ``leaves``, ``paths``, ``owner`` (the argument
    holding it), ``is_param``, ``is_input``, ``in_taint`` (a float input: carries reward), ``is_ids``
    (an integer input: token ids). ``diff``: the leaves differentiated (parameters and float inputs);
    ``id_leaves``: the token-id leaves whose relevance is computed (their lookups are embedding sites
    outside control flow); ``carrier_dtype``: the float type of their carriers.
    """

    def __init__(self, fun, primals, composite, argnums, has_aux, input_argnums=None,
                 positions=None, strict=True):
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        self.argnums = _arguments.argnums_tuple(argnums, len(primals), allow_empty=input_argnums is not None)
        self.input_argnums = _arguments.input_argnums(input_argnums, len(primals), self.argnums)
        self.positions = list(positions) if positions is not None else list(range(len(primals)))
        all_leaves, self.in_tree = jtu.tree_flatten(primals)
        self.all_leaves = all_leaves
        self.traced = [k for k, leaf in enumerate(all_leaves) if _arguments.is_array(leaf)]
        self.leaves = [all_leaves[k] for k in self.traced]
        owner = []  # primal index of each leaf
        for k, p in enumerate(primals):
            owner += [k] * len(jtu.tree_leaves(p))
        self.owner = [owner[k] for k in self.traced]
        paths = [jtu.keystr(path) for path, _ in jtu.tree_flatten_with_path(primals)[0]]
        self.paths = [paths[k] for k in self.traced]
        self.is_param = [k in self.argnums for k in self.owner]
        avals = [jax.typeof(x) for x in self.leaves]
        self.avals = avals
        for leaf_aval, param, path in zip(avals, self.is_param, self.paths):
            if param and not _graph.is_float(leaf_aval):
                raise LFPError(
                    f"parameter leaf {path} has dtype {leaf_aval.dtype}: LFP feedback is defined for "
                    f"floating-point parameters only. Pass integer or key state through an argument "
                    f"that is not in argnums={self.argnums}."
                )

        def flat_fun(*leaves):
            full = list(all_leaves)
            for k, v in zip(self.traced, leaves):
                full[k] = v
            return fun(*jtu.tree_unflatten(self.in_tree, full))

        closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*self.leaves)
        if has_aux:
            if not (isinstance(out_shape, tuple) and len(out_shape) == 2):
                raise LFPError("has_aux=True needs fun to return a pair (outputs, aux)")
            self.out_tree = jtu.tree_structure(out_shape[0])
        else:
            self.out_tree = jtu.tree_structure(out_shape)
        n_primary = self.out_tree.num_leaves
        self.full_out_tree = jtu.tree_structure(out_shape)
        self.graph = _graph.build_graph(closed)
        self.is_input = [not p and (self.input_argnums is None or k in self.input_argnums)
                         for p, k in zip(self.is_param, self.owner)]
        self.in_taint = [i and _graph.is_float(a) for i, a in zip(self.is_input, avals)]
        self.is_ids = [i and _embedding.is_integer(a) for i, a in zip(self.is_input, avals)]
        out_avals = [self.graph.aval(o) for o in self.graph.outputs]
        self.primary = [k < n_primary for k in range(len(out_avals))]
        self.float_out = [_graph.is_float(a) for a in out_avals]
        self.names = tuple(_arguments.path_name(path) or f"<argument {self.positions[k]}>"
                           for path, k in zip(self.key_paths(primals), self.owner))
        # explanations (no parameter arguments): the constant arguments hold the weights, name the
        # sites for Match(path=...) as parameters do, and are the tables token ids are looked up in
        weights = [p or (not self.argnums and not i) for p, i in zip(self.is_param, self.is_input)]
        self.plan = sites.analyse(
            self.graph, self.in_taint, self.primary, composite,
            in_src=[1 << self.positions[k] for k in self.owner],
            in_origin=[(frozenset({j}), frozenset()) if w else None for j, w in enumerate(weights)],
            in_roles=[_embedding.IDS if d else (_embedding.PARAM if w and _graph.is_float(a) else None)
                      for d, w, a in zip(self.is_ids, weights, avals)],
            leaf_paths=self.names)
        self._refuse_mixed_products()
        self._warn_unmatched(composite)
        if strict:
            missing = sites.problems(self.plan)
            if missing:
                raise NoRuleError(_report.problem_report(self, missing))
        reached = [k for k, o in enumerate(self.graph.outputs)
                   if self.primary[k] and self.float_out[k] and isinstance(o, int)
                   and o in self.plan.tainted]
        if not reached:
            raise LFPError(self._unreached())
        self.diff = [k for k in range(len(self.leaves)) if self.is_param[k] or self.in_taint[k]]
        self.id_leaves = sorted(k for k in self.plan.id_inputs if k not in self.plan.body_ids)
        tables = [self.graph.aval(s.operands[1 - s.ids_operands[0]] if s.label == "one_hot"
                                  else s.operands[0]) for s in self.plan.sites if s.kind == "embedding"]
        # at least float32: a token's relevance sums its lookup's features (bfloat16 tables lose digits)
        self.carrier_dtype = jnp.promote_types(jnp.result_type(*[a.dtype for a in tables]), jnp.float32) \
            if tables else jnp.float32

    def _unreached(self) -> str:
        """Why no reward can flow back: no input at all, token ids that index no parameter table, or
        float inputs that do not reach the outputs."""
        inputs = [k for k in range(len(self.leaves)) if self.is_input[k]]
        given = "" if self.input_argnums is None else f", input_argnums={self.input_argnums}"
        if not inputs:
            floats = sorted({self.positions[k] for k, a in zip(self.owner, self.avals) if _graph.is_float(a)})
            return (f"every argument of fun holding arrays is a parameter or a constant (argnums="
                    f"{self.argnums}{given}), so no input is left to carry reward. argnums names the "
                    f"arguments holding parameters; the model's inputs (argument"
                    f"{'s' * (len(floats) != 1)} {', '.join(map(str, floats))} hold floats) must not be "
                    f"among them.")
        kinds = sorted({str(self.avals[k].dtype) for k in inputs})
        ids = [k for k in inputs if self.is_ids[k]]
        if ids and not any(self.in_taint[k] for k in inputs):
            where = ", ".join(sorted({self.names[k] for k in ids}))
            found = (f"the inputs of fun are integers ({where}: {', '.join(kinds)}{given}), and no lookup "
                     f"of a parameter table by them reaches the outputs, so there is nothing reward "
                     f"could enter at. Reward enters a model of token ids where a table ")
            if not self.argnums:   # lrp: every argument but the explained ones is a constant
                return found + ("passed to fun as an argument (not closed over by fun) is looked up by "
                                "them (E[ids], jnp.take, nn.Embed, one_hot(ids) @ E); ids that only mask, "
                                "select or count are constants.")
            return found + (f"in argnums={self.argnums} is looked up by them (E[ids], jnp.take, "
                            f"nn.Embed, one_hot(ids) @ E); ids that only mask, select or count are "
                            f"constants. If the table is closed over by fun, pass it in an argument in "
                            f"argnums; if these integers are labels for the reward, pass them with "
                            f"reward_argnums.")
        return ("no floating-point input of fun reaches its (floating-point) outputs, so there is "
                f"nothing reward could flow back through (input dtypes: {kinds}{given}). LFP propagates "
                "reward to float inputs (images, features) and to the lookups of token ids in parameter "
                "tables: check that the outputs depend on them (no stop_gradient, no integer "
                "conversion on the way).")

    def _warn_unmatched(self, composite: Composite) -> None:
        """Warn about pairs added to a preset (``with_rules``) that select no site of this model: a
        misspelt path, label or kind would otherwise leave the preset's rule in place unnoticed."""
        all_sites = [site for _, site in sites.iter_sites(self.plan)]
        missing = unmatched(composite, all_sites)
        if not missing:
            return
        paths = sorted({s.path for s in all_sites if s.path})
        labels = sorted({f"{s.kind}/{s.label}" for s in all_sites})
        for match, rule in missing:
            warnings.warn(
                f"{_show(match)} -> {_show(rule)} in composite {composite.name!r} selects no site of "
                f"this model, so it has no effect. The model's sites (kind/label): {', '.join(labels)}"
                + (f"; module paths: {', '.join(paths[:12])}{' ...' if len(paths) > 12 else ''}"
                   if paths else "") + ". lfp_jax.describe(fun, *args) shows the table.",
                UnmatchedRuleWarning, stacklevel=_arguments.user_stacklevel())

    def _refuse_mixed_products(self) -> None:
        """Without ``input_argnums``, a product of a value computed from the input with one computed
        only from another argument (``(x − mean) · rsqrt(var)`` with running statistics passed in) is
        ambiguous: the argument may be a constant. Such sites get no rule; the error asks which."""
        if self.input_argnums is not None:
            return
        for _, site in sites.iter_sites(self.plan):
            if site.kind == "bilinear" and site.rule is not None and _report.argument_hint(self, site):
                site.rule, site.problem = None, _report.MIXED

    def key_paths(self, primals):
        """Key paths of the traced leaves, without the argument's position."""
        flat = jtu.tree_flatten_with_path(primals)[0]
        return [flat[k][0][1:] for k in self.traced]

    def unflatten(self, values: list) -> Any:
        """The primals' structure with ``values`` at traced leaves and ``None`` at static ones."""
        full: list[Any] = [None] * len(self.all_leaves)
        for k, v in zip(self.traced, values):
            full[k] = v
        return jtu.tree_unflatten(self.in_tree, full)

    def argument(self, position: int) -> str:
        """``argument 2 (['batch_stats']['BatchNorm_0']['mean'], ...)``: a user-facing description."""
        local = self.positions.index(position)
        names = [p for p, o in zip(self.names, self.owner) if o == local]
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        return f"argument {position}" + (f" ({shown})" if shown else "")

    # -- the backward pass --------------------------------------------------------------------------

    def vjp(self, taps: dict | None = None):
        """Evaluate the model with its rules; returns ``(outs, backward, extra)``: the graph outputs,
        ``backward(seeds) -> (leaf cotangents, carrier cotangents, tap cotangents)`` and, with
        ``taps``, what :func:`~lfp_jax.interpreter.evaluate` recorded in them."""
        carriers = [jnp.zeros(self.avals[k].shape, self.carrier_dtype) for k in self.id_leaves]

        def f(diff_leaves, carriers, tap_values):
            full = list(self.leaves)
            for k, v in zip(self.diff, diff_leaves):
                full[k] = v
            tp = None
            if taps is not None:
                tp = dict(taps, out=tap_values.get("out", {}), record=tap_values.get("record", {}),
                          **{"in": tap_values.get("in", {})})
                if "values" in taps:  # every site's operands and output (conservation)
                    tp["values"] = {}
            outs = evaluate(self.plan, full, tp, dict(zip(self.id_leaves, carriers)))
            extra = None if tp is None else {k: v for k, v in tp.items() if k in ("values", "moved")}
            return [o for o, fl in zip(outs, self.float_out) if fl], (outs, extra)

        if not any(isinstance(leaf, jax.core.Tracer) for leaf in self.leaves):
            # called eagerly: run the rewritten program compiled (one XLA computation for the forward
            # pass and one for the backward pass) instead of dispatching its operations one by one,
            # which costs several times a compile on anything but the smallest model; under jit/vmap it
            # is inlined anyway
            f = jax.jit(f)
        tap_values = {} if taps is None else {k: v for k, v in taps.items() if k in ("out", "in", "record")}
        _, vjp_fn, (outs, extra) = jax.vjp(f, [self.leaves[k] for k in self.diff], carriers, tap_values,
                                           has_aux=True)
        return outs, vjp_fn, extra

    def results(self, cts: list, carrier_cts: list) -> list:
        """Per traced leaf, from the backward pass's cotangents: a parameter's feedback (the ``|W|`` of
        every effective weight is applied at its use), an input's relevance ``x ⊙ c_x`` (or ``R`` where
        the rules handed it whole), the relevance of each token of an id input; ``None`` elsewhere."""
        out: list[Any] = [None] * len(self.leaves)
        for k, ct in zip(self.diff, cts):
            if self.is_param[k]:
                out[k] = ct
            else:
                out[k] = ct if k in self.plan.relevance_inputs else self.leaves[k] * ct
        for k, ct in zip(self.id_leaves, carrier_cts):
            out[k] = ct
        return out

    def check_ids_explained(self, positions: tuple[int, ...]) -> None:
        """Refuse to explain token ids whose lookups are inside control flow (no per-token relevance)."""
        hidden = sorted({self.names[k] for k in self.plan.body_ids
                         if self.owner[k] in positions and self.is_ids[k]})
        if hidden:
            raise LFPError(
                f"the token ids {', '.join(hidden)} are looked up inside a scan, cond or remat body, where "
                f"the relevance of each token cannot be carried back to the ids (the loop primitives "
                f"take no extra operands for it). Look the ids up before the loop and pass the "
                f"embeddings in (lfp_value_and_feedback trains such a model as it is; only the per-token "
                f"relevance needs the lookup outside).")

    def seeds(self, outs: list, r_leaves: list) -> tuple[list, dict]:
        """The cotangents that start the backward pass from the reward leaves ``r_leaves`` (one per
        primary output), and the reward of each float output position that has one."""
        found, given, r_iter = [], {}, iter(r_leaves)
        for k, (out, fl) in enumerate(zip(outs, self.float_out)):
            r = next(r_iter) if self.primary[k] else None
            if not fl:
                continue
            if r is None:
                found.append(jnp.zeros_like(out))
                continue
            eps = self.plan.output_epsilon.get(k)  # the ε rule of the block producing the output
            r = jax.lax.stop_gradient(jnp.asarray(r, out.dtype))
            given[k] = r
            if eps is ABSOLUTE:  # the output takes the reward itself (see rules.ABSOLUTE)
                found.append(r)
            else:
                found.append(output_share(r, out, eps))
        return found, given
