"""Small language models that take integer token ids, each written the way its library writes them
(shared by the language-model tests; no assertions here).

* linen: ``nn.Embed`` with a tied head (``Embed.attend``) and learned positions looked up by ``arange``;
* nnx: ``nnx.Embed`` with Gemma's ``√d`` scaling, RMSNorm computing ``x · (1 + scale)`` with the scale
  initialised to 0, and a tied head;
* equinox: ``eqx.nn.Embedding`` BERT-style, with position and token-type tables, a LayerNorm, and a
  padding mask computed from the ids (``ids != 0``) in the attention;
* plain JAX: ``jnp.take`` of a table, two lookups of it (the ids and the ids shifted), a tied head.

Each has a full variant (causal softmax attention, GELU) and a ReLU variant (a causal mean over the
previous tokens instead of attention, ReLU instead of GELU), for which Theorem 1 holds.
"""

from __future__ import annotations

import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

V, T, D, B = 13, 6, 8, 3
F64 = jnp.float64


def ids_and_labels(seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k1, (B, T), 1, V)
    ids = ids.at[0, :2].set(0)   # padding at the start of the first sequence (0 is the pad id)
    return ids.astype(jnp.int32), jax.random.randint(k2, (B, T), 0, V).astype(jnp.int32)


def causal_mean(h):
    """Token mixing without attention: position t averages positions 0..t (linear in h)."""
    t = h.shape[-2]
    weights = jnp.tril(jnp.ones((t, t), h.dtype)) / jnp.arange(1, t + 1, dtype=h.dtype)[:, None]
    return jnp.einsum("ts,...sd->...td", weights, h)


def causal_attention(q, k, v, mask=None):
    scores = jnp.einsum("...td,...sd->...ts", q, k) / math.sqrt(q.shape[-1])
    allowed = jnp.tril(jnp.ones(scores.shape[-2:], bool))
    if mask is not None:   # padded keys are masked; a query still sees itself (no row of -inf alone)
        allowed = allowed & (mask[..., None, :] | jnp.eye(scores.shape[-1], dtype=bool))
    scores = jnp.where(allowed, scores, -jnp.inf)
    return jnp.einsum("...ts,...sd->...td", jax.nn.softmax(scores, axis=-1), v)


# -- linen -------------------------------------------------------------------------------------------


class LinenLM(nn.Module):
    relu: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, param_dtype=F64, embedding_init=nn.initializers.normal(1.0))
        pos = self.param("pos", nn.initializers.normal(0.3), (T, D), F64)
        h = embed(ids) + pos[jnp.arange(ids.shape[-1])]
        x = nn.LayerNorm(param_dtype=F64)(h)
        if self.relu:
            h = h + nn.Dense(D, param_dtype=F64)(causal_mean(x))
        else:
            q, k, v = (nn.Dense(D, param_dtype=F64, name=n)(x) for n in ("q", "k", "v"))
            h = h + nn.Dense(D, param_dtype=F64, name="o")(causal_attention(q, k, v))
        act = nn.relu if self.relu else nn.gelu
        hidden = nn.Dense(2 * D, param_dtype=F64)(nn.LayerNorm(param_dtype=F64)(h))
        h = h + nn.Dense(D, param_dtype=F64)(act(hidden))
        return embed.attend(nn.LayerNorm(param_dtype=F64)(h))


def linen_lm(relu: bool = False, seed: int = 1):
    model = LinenLM(relu)
    ids, _ = ids_and_labels()
    params = model.init(jax.random.key(seed), ids)["params"]
    params = _nonzero(params, seed)
    return (lambda p, ids: model.apply({"params": p}, ids)), params


# -- nnx ---------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x / rms(x) · (1 + scale)``, the scale initialised to 0."""

    def __init__(self, d):
        self.scale = nnx.Param(jnp.zeros(d, F64))

    def __call__(self, x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * (1 + self.scale[...])


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, relu: bool = False):
        self.relu = relu
        self.embed = nnx.Embed(V, D, param_dtype=F64, rngs=rngs, embedding_init=nnx.initializers.normal(1.0))
        self.norm1, self.norm2, self.final = RMSNorm(D), RMSNorm(D), RMSNorm(D)
        self.qkv = nnx.Linear(D, 3 * D, use_bias=False, param_dtype=F64, rngs=rngs)
        self.mix = nnx.Linear(D, D, use_bias=False, param_dtype=F64, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, use_bias=False, param_dtype=F64, rngs=rngs)
        self.gate = nnx.Linear(D, 2 * D, use_bias=False, param_dtype=F64, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids) * jnp.sqrt(D).astype(F64)   # Gemma scales the embeddings by √d
        x = self.norm1(h)
        if self.relu:
            h = h + self.mix(causal_mean(x))
        else:
            q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
            h = h + self.mix(causal_attention(q, k, v, mask=ids != 0))
        x = self.norm2(h)
        gated = nnx.relu(self.up(x)) if self.relu else nnx.silu(self.gate(x)) * self.up(x)
        h = h + self.down(gated)
        return self.embed.attend(self.final(h))


def nnx_lm(relu: bool = False, seed: int = 2):
    net = NnxLM(nnx.Rngs(seed), relu)
    graphdef, params = nnx.split(net, nnx.Param)
    return (lambda p, ids: nnx.merge(graphdef, p)(ids)), params


# -- equinox -----------------------------------------------------------------------------------------


class EqxBert(eqx.Module):
    """BERT's embeddings: word + position + token type, a LayerNorm; one encoder layer; a classifier
    on the first token. Modules take one example; the batch is a vmap."""

    words: eqx.nn.Embedding
    positions: eqx.nn.Embedding
    types: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    head: eqx.nn.Linear
    relu: bool = eqx.field(static=True)

    def __init__(self, key, relu: bool = False):
        k = jax.random.split(key, 8)
        self.words = eqx.nn.Embedding(V, D, key=k[0], dtype=F64)
        self.positions = eqx.nn.Embedding(T, D, key=k[1], dtype=F64)
        self.types = eqx.nn.Embedding(2, D, key=k[2], dtype=F64)
        self.norm = eqx.nn.LayerNorm(D, dtype=F64)
        self.qkv = eqx.nn.Linear(D, 3 * D, key=k[3], dtype=F64)
        self.out = eqx.nn.Linear(D, D, key=k[4], dtype=F64)
        self.up = eqx.nn.Linear(D, 2 * D, key=k[5], dtype=F64)
        self.down = eqx.nn.Linear(2 * D, D, key=k[6], dtype=F64)
        self.head = eqx.nn.Linear(D, 4, key=k[7], dtype=F64)
        self.relu = relu

    def __call__(self, ids, types):
        mask = ids != 0   # padding, from the ids
        e = jax.vmap(self.words)(ids) + jax.vmap(self.positions)(jnp.arange(ids.shape[0])) \
            + jax.vmap(self.types)(types)
        h = jax.vmap(self.norm)(e)
        if self.relu:
            mixed = causal_mean(h * mask[:, None].astype(h.dtype))
        else:
            q, k, v = jnp.split(jax.vmap(self.qkv)(h), 3, axis=-1)
            scores = q @ k.T / math.sqrt(D)
            mixed = jax.nn.softmax(jnp.where(mask[None, :], scores, -jnp.inf), axis=-1) @ v
        h = h + jax.vmap(self.out)(mixed)
        act = jax.nn.relu if self.relu else jax.nn.gelu
        h = h + jax.vmap(self.down)(act(jax.vmap(self.up)(h)))
        return self.head(h[0])


def eqx_bert(relu: bool = False, seed: int = 3):
    params, static = eqx.partition(EqxBert(jax.random.key(seed), relu), eqx.is_inexact_array)
    return (lambda p, ids, types: jax.vmap(eqx.combine(p, static))(ids, types)), params


def token_types(ids):
    return (jnp.arange(ids.shape[-1]) >= ids.shape[-1] // 2).astype(jnp.int32) * jnp.ones_like(ids)


# -- plain JAX ---------------------------------------------------------------------------------------


def take_lm(relu: bool = True, seed: int = 4):
    """``jnp.take`` of one table for the ids and for the ids shifted by one (a bigram feature), a
    hidden layer and a tied head."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"table": jax.random.normal(k[0], (V, D), F64),
              "w": jax.random.normal(k[1], (2 * D, D), F64) / math.sqrt(2 * D),
              "b": jax.random.normal(k[2], (D,), F64) * 0.1}

    def fun(p, ids):
        now = jnp.take(p["table"], ids, axis=0)
        before = jnp.take(p["table"], jnp.roll(ids, 1, axis=-1), axis=0)
        act = jax.nn.relu if relu else jax.nn.gelu
        h = act(jnp.concatenate([now, before], -1) @ p["w"] + p["b"])
        return h @ p["table"].T

    return fun, params


def _nonzero(params, seed):
    """Biases and LayerNorm offsets drawn away from zero, so that every leaf has feedback to compare."""
    flat, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(100 + seed), len(flat))
    flat = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) if not a.any() else a
            for a, k in zip(flat, keys)]
    return jax.tree_util.tree_unflatten(tree, flat)
