r"""The embedding rule: where reward enters a model that takes token ids.

A lookup ``e = E[ids]`` (or ``one_hot(ids) @ E``) of rows of a parameter table has no reward-carrying
input: its output is a reward source, as a floating-point input is (see :mod:`lfp_jax._embedding`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lfp_jax._embedding import spread
from lfp_jax.rules._base import Array, Rule, SiteCall


@dataclasses.dataclass(frozen=True)
class Embedding(Rule):
    r"""An embedding lookup ``e = E[ids]``: the table's feedback and the tokens' relevance.

    With ``c_e`` the normalised reward reaching the lookup's output (``R_e = e ⊙ c_e``), the table
    receives the LFP feedback of a layer whose Jacobian is the lookup: the rows looked up, summed,

    .. math::  F_{E_i} = |E_i| \odot \sum_{t:\ \mathrm{ids}_t = i} c_{e,t},

    so a row earns the reward its tokens carried (``F_{E_i} = \mathrm{sign}(E_i) \odot \sum_t R_{e,t}``);
    a table used again by a tied head ``h @ Eᵀ`` sums the feedback of both uses. The relevance of a
    token is the relevance at its lookup's output summed over the features,

    .. math::  R_{\mathrm{ids}_t} = \sum_d e_{t,d}\, c_{e,t,d},

    which is also what ``one_hot(ids) @ E`` gives its one-hot input (``x ⊙ J_xᵀ c_e`` summed over the
    vocabulary). Nothing is stabilised: the lookup is exact, and its output enters the next block as a
    model input does.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"embedding"})
    conservative: ClassVar[bool] = True

    def __call__(self, call: SiteCall, *operands: Array) -> tuple:
        carriers = call.carriers
        if not carriers or all(c is None for c in carriers):
            return call.fn(*operands)
        site = call.site
        positions = tuple(k for k, c in enumerate(carriers) if c is not None)
        one_hot = site.label == "one_hot"

        @jax.custom_vjp
        def lookup(ops, cs):
            return tuple(call.fn(*ops))

        def fwd(ops, cs):
            outs = tuple(call.fn(*ops))
            return outs, (ops, outs, cs)

        def bwd(res, cts):
            ops, outs, cs = res
            ct = cts[0]
            floats = [k for k, op in enumerate(ops) if jnp.issubdtype(jnp.result_type(op), jnp.inexact)]

            def value(*xs):
                full = list(ops)
                for k, x in zip(floats, xs):
                    full[k] = x
                return call.fn(*full)[0]

            grads = dict(zip(floats, jax.vjp(value, *[ops[k] for k in floats])[1](ct)))
            op_cts = tuple(grads.get(k) for k in range(len(ops)))
            dt = cs[positions[0]].dtype   # at least float32 (a sum over the features follows)
            if one_hot:  # the one-hot input's relevance x ⊙ J_xᵀ c_e, summed later over the vocabulary
                relevance = [ops[k].astype(dt) * grads[k].astype(dt) for k in positions]
            else:  # the relevance of each token: R_e summed over the features (transpose of spread)
                _, vjp = jax.vjp(lambda *c: spread(site.primitives[0], site.params[0], c, outs[0].shape,
                                                   site.index_weights), *[cs[k] for k in positions])
                relevance = list(vjp(outs[0].astype(dt) * ct.astype(dt)))
            c_cts = [None] * len(cs)
            for k, r in zip(positions, relevance):
                c_cts[k] = r.astype(cs[k].dtype)
            return op_cts, tuple(c_cts)

        lookup.defvjp(fwd, bwd)
        return lookup(tuple(operands), tuple(carriers))
