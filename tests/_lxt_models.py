"""Plain jax.numpy forward functions of the models in the LXT 0.6 fixtures (tests/data/lxt, written by
tools/lxt_reference/make_fixtures.py), for comparing lfp_jax's relevance with LXT's on identical weights.
No lfp_jax here: these are only the models. ``p`` maps the fixture's ``param/<name>`` entries to arrays
in torch layout (linear weights ``(out, in)``, embedding tables ``(rows, features)``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

HEADS = 2


def _linear(p, name, x):
    return x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)


def _layer_norm(p, name, x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _causal_attention(p, name, x):
    b, t, d = x.shape
    dh = d // HEADS

    def split(h):
        return h.reshape(b, t, HEADS, dh).transpose(0, 2, 1, 3)

    q, k, v = (split(_linear(p, f"{name}.{n}", x)) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
    scores = scores + jnp.triu(jnp.full((t, t), jnp.finfo(x.dtype).min, x.dtype), 1)
    out = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return _linear(p, f"{name}.o", out)


def token_lm(p, ids):
    """``token_lm`` fixture: int ids (batch, tokens) → logits (batch, tokens, vocabulary).

    Word rows gathered from the table ``embed``, plus the position rows ``pos[arange(tokens)]``; one
    pre-LN causal block (attention, GELU MLP, residual adds); a final LayerNorm; the head reuses the
    table: ``h @ embed.T``, no bias. LXT's per-token relevance is measured at ``embed[ids]``."""
    table = p["embed"]
    words = table[ids]
    x = words + p["pos"][jnp.arange(ids.shape[1])]
    x = x + _causal_attention(p, "attn", _layer_norm(p, "ln1", x))
    h = jax.nn.gelu(_linear(p, "fc1", _layer_norm(p, "ln2", x)), approximate=False)
    x = x + _linear(p, "fc2", h)
    return _layer_norm(p, "ln", x) @ table.T
