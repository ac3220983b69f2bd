"""Transformer models for the zoo: a ViT classifier and a GPT-style causal decoder, in Flax linen.

Written with plain ``nn.Dense`` layers (PyTorch's ``U(±1/√fan_in)`` for kernels and biases, so no
parameter starts at zero and LFP can move every one), so that every attention product, softmax and
normalisation is visible to lfp_jax as written; the default composite gives them AttnLRP's rules.

* :class:`ViT`: patch embedding (a convolution with stride = patch size), a class token or mean
  pooling, learned position embeddings, pre-norm blocks (LayerNorm → multi-head self-attention →
  residual, LayerNorm → GELU MLP → residual), a final LayerNorm and a linear head.
* :class:`GPT`: token embedding of one-hot inputs (a Dense layer, so the input relevance is per
  token), learned position embeddings, pre-norm blocks (RMSNorm → causal multi-head attention →
  residual, RMSNorm → SiLU-gated MLP ``W₂ (silu(x W₁) ⊙ x W₃)`` → residual), a final RMSNorm and a
  linear head over the vocabulary at every position.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfp_jax.nn import torch_bias_init, torch_kernel_init


def _dense(features: int, fan_in: int, name: str | None = None, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_kernel_init(),
                    bias_init=torch_bias_init(fan_in), name=name)


class RMSNorm(nn.Module):
    """``y = γ ⊙ x / sqrt(mean(x²) + eps)``."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections (optionally causal)."""

    heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        if d % self.heads:
            raise ValueError(f"model width {d} is not divisible by {self.heads} heads")
        dh = d // self.heads

        def split(h):
            return h.reshape(b, t, self.heads, dh).transpose(0, 2, 1, 3)

        q, k, v = (split(_dense(d, d, name=n)(x)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
        if self.causal:
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
        out = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return _dense(d, d, name="out")(out)


class EncoderBlock(nn.Module):
    heads: int
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = x + SelfAttention(self.heads)(nn.LayerNorm()(x))
        h = nn.gelu(_dense(self.mlp_ratio * d, d)(nn.LayerNorm()(x)))
        return x + _dense(d, self.mlp_ratio * d)(h)


class DecoderBlock(nn.Module):
    heads: int
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = x + SelfAttention(self.heads, causal=True)(RMSNorm()(x))
        h = RMSNorm()(x)
        gated = jax.nn.silu(_dense(self.mlp_ratio * d, d, name="gate")(h)) * _dense(
            self.mlp_ratio * d, d, name="up")(h)
        return x + _dense(d, self.mlp_ratio * d, name="down")(gated)


class ViT(nn.Module):
    """A Vision Transformer for small images (MNIST: 28x28, patches 7x7 → 16 tokens)."""

    num_classes: int = 10
    patch: int = 7
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    pool: str = "cls"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        fan_in = self.patch * self.patch * x.shape[-1]
        x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                    kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in), name="patches")(x)
        x = x.reshape(x.shape[0], -1, self.width)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
        x = x + self.param("position", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        for _ in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_ratio)(x)
        x = nn.LayerNorm()(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return _dense(self.num_classes, self.width, name="head")(x)


class GPT(nn.Module):
    """A small GPT-style causal decoder over one-hot tokens ``(batch, T, vocab)``; logits per position."""

    num_classes: int = 96  # the vocabulary size
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 3 or x.shape[1] > self.context:
            raise ValueError(f"GPT takes one-hot tokens (batch, T <= {self.context}, vocab), got {x.shape}")
        x = _dense(self.width, x.shape[-1], name="embed", use_bias=False)(x)
        position = self.param("position", nn.initializers.normal(0.02), (1, self.context, self.width))
        x = x + position[:, :x.shape[1]]
        for _ in range(self.depth):
            x = DecoderBlock(self.heads, self.mlp_ratio)(x)
        return _dense(self.num_classes, self.width, name="head")(RMSNorm()(x))
