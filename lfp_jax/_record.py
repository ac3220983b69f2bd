r"""Relevance inside the model: what reaches the output of chosen sites, read in the same backward pass
(``lrp(..., record=Match(...))``).

For a model from a library one cannot edit, the sites are the handles: a :class:`~lfp_jax.Match` by
kind, label or module path picks them (``describe`` lists them), and the relevance at each picked
site's output ``y`` is returned next to the input relevance,

.. math::  R_y = y \odot c_y ,

with ``c_y`` the normalised reward that all uses of ``y`` hand back to the site, as the site's rule
receives it: after the ε of the site's own block (``c_y = R / (y + ε·sign(y))``: for ε → 0 the
relevance the layers above give ``y``; a model fed ``y`` as its input gets
``R · y / (y + ε·sign(y))`` there). Where the rules hand the relevance itself (spikes, classic LRP
rules above an activation), ``R_y`` is that relevance. Picking the residual sums
(``Match(kind="sum")``) gives a block-by-block trace of relevance through a transformer. The engine
adds a zero to ``y`` where the site produces it (a *tap*); the tap's cotangent is ``c_y``, so
recording costs one addition per site.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lfp_jax import sites
from lfp_jax.errors import LFPError
from lfp_jax.rules import ABSOLUTE


def select(plan: Any, record: Any) -> list[tuple[int, Any]]:
    """``(index, site)`` of the sites ``record`` picks (a ``Match``, any ``site -> bool``, or a sequence
    of them), numbered as in :func:`~lfp_jax.describe`'s table."""
    selectors = list(record) if isinstance(record, (list, tuple)) else [record]
    for s in selectors:
        if not callable(s):
            raise TypeError(f"record takes a Match (or a predicate site -> bool, or a sequence of them), "
                            f"got {s!r} ({type(s).__name__})")
    found = list(sites.iter_sites(plan))
    chosen = [(n, site) for n, (_, site) in enumerate(found) if any(s(site) for s in selectors)]
    if not chosen:
        kinds = sorted({f"{s.kind}/{s.label}" for _, s in found})
        raise LFPError(f"record={record!r} picks no site of this model. Its sites (kind/label): "
                       f"{', '.join(kinds)}; lfp_jax.describe(fun, *args) lists them with their module "
                       f"paths.")
    nested = [n for n, site in chosen if found[n][0] > 0]
    if nested:
        raise LFPError(f"record={record!r} picks sites inside scan/cond/remat bodies (describe's sites "
                       f"{', '.join(map(str, nested))}), whose relevance is summed over the loop's steps "
                       f"inside JAX's reverse pass and cannot be read per step. Narrow the Match to sites "
                       f"outside the bodies (e.g. the blocks' outputs around a scan).")
    return chosen


def keys(chosen: list[tuple[int, Any]], total: int) -> list[str]:
    """A name per recorded site: its number in ``describe``'s table (zero-padded, so that the names sort
    in the order of the sites, as ``jit`` returns a dict), its kind and its module path."""
    width = len(str(max(total - 1, 0)))
    return [f"{n:0{width}d} {site.kind} {site.path or site.label}" for n, site in chosen]


def taps(plan: Any, chosen: list[tuple[int, Any]]) -> dict:
    """Zero taps at the outputs of the chosen sites (see :func:`lfp_jax.interpreter.evaluate`)."""
    g = plan.graph

    def zeros(v):
        aval = g.aval(v)
        return jnp.zeros(aval.shape, aval.dtype)

    return {"record": {site.output: zeros(site.output) for _, site in chosen}}


def recorded(site: Any, value: Any, ct: Any) -> Any:
    """``R_y`` at ``site``'s output ``value`` from its tap's cotangent ``ct``."""
    absolute = site.rule.output_epsilon is ABSOLUTE or site.relevance_output
    return ct if absolute else value * ct


def relevance(plan: Any, site: Any, atom: int, value: Any, cts: tuple, given: dict) -> Any:
    """The relevance handed to the value ``atom`` (``site``'s output, or a move of it) by its uses, from
    the cotangents of :func:`lfp_jax.conservation`'s taps on every read of it ``(plain, through a
    block boundary, handed as relevance)`` and, at a model output, the output relevance ``given``."""
    plain, wrapped, handed = cts
    absolute = site.rule.output_epsilon is ABSOLUTE or site.relevance_output
    r = (plain if absolute else value * plain) + value * wrapped + handed
    for pos, o in enumerate(plan.graph.outputs):
        if isinstance(o, int) and o == atom and pos in given:
            r = r + given[pos]
    return r
