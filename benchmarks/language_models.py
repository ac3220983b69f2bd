"""Language models written the way JAX users write them, for the step-time benchmark.

Each takes integer token ids ``(batch, T)`` and looks them up in an ``nn.Embed`` table, as Hugging
Face's Flax models, Flax's examples and ``gemma`` do; lfp_jax sees the lookup as an embedding site.
They follow the published architectures in the parts that decide the cost of a step (which products,
normalisations and activations there are, and where), not in every detail:

* :class:`Llama`: RMSNorm (``x · γ / rms(x)``), rotary position embeddings on queries and keys,
  grouped-query causal attention, SwiGLU MLP ``W_d (silu(x W_g) ⊙ x W_u)``, no biases, an untied head.
* :class:`Gemma`: embeddings scaled by ``√d``, RMSNorm with ``(1 + γ)`` and ``γ`` initialised to 0,
  rotary embeddings, multi-query attention (one key/value head), GeGLU MLP (tanh-approximated GELU),
  the head tied to the embedding table (``h Eᵀ``).
* :class:`Bert`: token, position and segment embeddings, post-norm encoder blocks (attention →
  residual → LayerNorm, GELU MLP → residual → LayerNorm), a padding mask added to the scores, and the
  masked-language-model head (dense, GELU, LayerNorm, then the tied embedding table plus a bias).

``dtype`` is the computation dtype; :func:`init` casts the parameters to it as well (``gemma``'s
default for bfloat16). Flax's initialisers leave biases and LayerNorm offsets at zero, as in the
libraries; the benchmark passes ``allow_frozen=True``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

#: the benchmark's size: width 256, 4 layers, 8 heads, sequence 128, batch 16 (a realistic CPU size)
SIZE = {"vocab": 1024, "width": 256, "depth": 4, "heads": 8, "seq": 128, "batch": 16}


def _wide(dtype: Any) -> Any:
    """At least float32: normalisations, softmax and rotary angles are computed there in bfloat16."""
    return jnp.promote_types(dtype, jnp.float32)


def rotary(x: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of ``x`` ``(batch, T, heads, dh)``: each pair of features
    ``(x_i, x_{i + dh/2})`` at position ``t`` is rotated by the angle ``t · base^(-2i/dh)``."""
    t, dh = x.shape[1], x.shape[-1]
    wide = _wide(x.dtype)
    inv = base ** (-jnp.arange(0, dh // 2, dtype=wide) * 2 / dh)
    angle = jnp.arange(t, dtype=wide)[:, None] * inv[None, :]                    # (T, dh/2)
    cos, sin = (f(angle)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    first, second = x[..., :dh // 2], x[..., dh // 2:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class RMSNorm(nn.Module):
    """``x / rms(x) · γ``, or ``· (1 + γ)`` with ``γ`` starting at 0 (``offset=True``, Gemma)."""

    offset: bool = False
    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],))
        x32 = x.astype(_wide(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * ((1 + scale) if self.offset else scale)).astype(self.dtype)


class Attention(nn.Module):
    """Causal or bidirectional multi-head attention with ``kv_heads`` key/value heads (grouped-query;
    1 is multi-query), optional rotary embeddings and an optional key mask ``(batch, T)``."""

    heads: int
    kv_heads: int
    causal: bool
    rope: bool
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        b, t, d = x.shape
        dh = d // self.heads
        dense = lambda n, name: nn.DenseGeneral((n, dh), use_bias=self.use_bias, dtype=self.dtype,  # noqa: E731
                                                name=name)
        q = dense(self.heads, "query")(x)
        k, v = dense(self.kv_heads, "key")(x), dense(self.kv_heads, "value")(x)
        if self.rope:
            q, k = rotary(q), rotary(k)
        group = self.heads // self.kv_heads
        q = q.reshape(b, t, self.kv_heads, group, dh)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(dh)
        if self.causal:
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
        if key_mask is not None:
            scores = scores + jnp.where(key_mask, 0.0, jnp.finfo(scores.dtype).min)[:, None, None, None, :]
        weights = jax.nn.softmax(scores.astype(_wide(scores.dtype)), axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, t, self.heads, dh)
        return nn.DenseGeneral(d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype, name="out")(out)


class _Decoder(nn.Module):
    vocab: int = SIZE["vocab"]
    width: int = SIZE["width"]
    depth: int = SIZE["depth"]
    heads: int = SIZE["heads"]
    dtype: Any = jnp.float32


class Llama(_Decoder):
    """A Llama-style causal decoder over token ids; logits ``(batch, T, vocab)``."""

    kv_heads: int = 4
    hidden: int = 4 * SIZE["width"] * 2 // 3

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, dtype=self.dtype, name="embed")(ids)
        for i in range(self.depth):
            a = Attention(self.heads, self.kv_heads, causal=True, rope=True, dtype=self.dtype,
                          name=f"layer_{i}_attn")(RMSNorm(dtype=self.dtype, name=f"layer_{i}_attn_norm")(x))
            x = x + a
            h = RMSNorm(dtype=self.dtype, name=f"layer_{i}_mlp_norm")(x)
            gate = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name=f"layer_{i}_gate")(h)
            up = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name=f"layer_{i}_up")(h)
            x = x + nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                             name=f"layer_{i}_down")(jax.nn.silu(gate) * up)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x)
        return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="lm_head")(x)


class Gemma(_Decoder):
    """A Gemma-style causal decoder over token ids with a tied head; logits ``(batch, T, vocab)``."""

    hidden: int = 4 * SIZE["width"]

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.width, dtype=self.dtype, name="embedder")
        x = embed(ids) * jnp.sqrt(jnp.asarray(self.width, self.dtype))
        for i in range(self.depth):
            h = RMSNorm(offset=True, dtype=self.dtype, name=f"layer_{i}_pre_attention_norm")(x)
            x = x + Attention(self.heads, 1, causal=True, rope=True, dtype=self.dtype,
                              name=f"layer_{i}_attn")(h)
            h = RMSNorm(offset=True, dtype=self.dtype, name=f"layer_{i}_pre_ffw_norm")(x)
            gate = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name=f"layer_{i}_gating")(h)
            up = nn.Dense(self.hidden, use_bias=False, dtype=self.dtype, name=f"layer_{i}_up")(h)
            x = x + nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                             name=f"layer_{i}_linear")(jax.nn.gelu(gate, approximate=True) * up)
        x = RMSNorm(offset=True, dtype=self.dtype, name="final_norm")(x)
        return embed.attend(x)


class Bert(_Decoder):
    """A BERT-style encoder with the masked-language-model head; ids of 0 are padding (masked keys).
    Logits ``(batch, T, vocab)``."""

    hidden: int = 4 * SIZE["width"]
    max_len: int = 512

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[1]
        embed = nn.Embed(self.vocab, self.width, dtype=self.dtype, name="word_embeddings")
        position = nn.Embed(self.max_len, self.width, dtype=self.dtype, name="position_embeddings")
        segment = nn.Embed(2, self.width, dtype=self.dtype, name="token_type_embeddings")
        x = embed(ids) + position(jnp.arange(t)[None, :]) + segment(jnp.zeros_like(ids))
        x = nn.LayerNorm(dtype=self.dtype, name="embeddings_norm")(x)
        mask = ids != 0
        for i in range(self.depth):
            a = Attention(self.heads, self.heads, causal=False, rope=False, use_bias=True, dtype=self.dtype,
                          name=f"layer_{i}_attention")(x, mask)
            x = nn.LayerNorm(dtype=self.dtype, name=f"layer_{i}_attention_norm")(x + a)
            h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name=f"layer_{i}_intermediate")(x))
            x = nn.LayerNorm(dtype=self.dtype, name=f"layer_{i}_output_norm")(
                x + nn.Dense(self.width, dtype=self.dtype, name=f"layer_{i}_output")(h))
        h = nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="mlm_transform")(x))
        h = nn.LayerNorm(dtype=self.dtype, name="mlm_norm")(h)
        bias = self.param("mlm_bias", nn.initializers.zeros, (self.vocab,))
        return embed.attend(h) + bias.astype(self.dtype)


MODELS = {"llama": Llama, "gemma": Gemma, "bert": Bert}
#: the module name of each model's token embedding table (``params[name]["embedding"]``)
TOKEN_TABLES = {"llama": "embed", "gemma": "embedder", "bert": "word_embeddings"}


def build(name: str, dtype: Any = jnp.float32, **size) -> nn.Module:
    """One of :data:`MODELS` at the benchmark's size (``size`` overrides: ``width``, ``depth``, ...)."""
    if name not in MODELS:
        raise ValueError(f"unknown language model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](dtype=dtype, **size)


def init(model: nn.Module, key: jax.Array, ids: jax.Array):
    """The model's parameters, cast to its computation dtype (bfloat16 parameters, as ``gemma``)."""
    params = model.init(key, ids)["params"]
    return jax.tree.map(lambda p: p.astype(model.dtype), params)


def batch(key: jax.Array, vocab: int = SIZE["vocab"], size: int = SIZE["batch"], seq: int = SIZE["seq"]):
    """Token ids ``(size, seq + 1)`` with no padding (ids from 1); inputs are ``ids[:, :-1]``, the
    next-token labels ``ids[:, 1:]``."""
    return jax.random.randint(key, (size, seq + 1), 1, vocab)
