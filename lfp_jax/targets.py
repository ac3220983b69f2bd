r"""Output relevance for explaining language models: what :func:`lfp_jax.lrp`'s ``target`` is made of.

A language model's outputs are logits ``z`` of shape ``(batch, tokens, vocabulary)``. Each function
here returns the output relevance, an array of that shape that is zero except at the explained logits,
which keep their value (so that under a conservative composite the input relevance sums to the
explained score). All of them work under ``jit`` and ``vmap``.

* :func:`token`: the logit of one token at one position, per sequence (the next-token prediction
  being explained);
* :func:`span`: the sum of the logits of several tokens at several positions, e.g. a generated
  continuation, explained in one backward pass;
* :func:`contrastive`: the difference of two logits at one position, ``z_token − z_foil``: why the model
  prefers one continuation over another.

Example::

    explain = jax.jit(lfp_jax.lrp(lambda p, ids: lm.apply({"params": p}, ids)))
    logits = lm.apply({"params": lm_params}, ids)
    target = lfp_jax.targets.token(logits, jnp.argmax(logits[:, -1], -1))   # the predicted next token
    _, per_token = explain(lm_params, ids, target=target)                   # shaped like ids
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array


def _check(logits: ArrayLike) -> Array:
    logits = jnp.asarray(logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must have the shape (..., tokens, vocabulary), got {logits.shape}")
    return logits


def _at(logits: Array, position: ArrayLike, token: ArrayLike) -> Array:
    """A mask of ``logits``' shape that is 1 at ``[..., position, token]`` (per sequence)."""
    lead = logits.shape[:-2]
    t, v = logits.shape[-2:]
    position = jnp.broadcast_to(jnp.asarray(position) % t, lead)
    token = jnp.broadcast_to(jnp.asarray(token), lead)
    return (jax.nn.one_hot(position, t, dtype=logits.dtype)[..., :, None]
            * jax.nn.one_hot(token, v, dtype=logits.dtype)[..., None, :])


def token(logits: ArrayLike, token: ArrayLike, position: ArrayLike = -1) -> Array:
    r"""The logit of ``token`` at ``position``, per sequence: :math:`R_z = z \odot e_{t, k}`.

    Args:
      logits: ``(..., tokens, vocabulary)``.
      token: the token id to explain, per sequence (shape ``logits.shape[:-2]`` or a scalar).
      position: the position whose prediction is explained (default the last; negative counts from the
        end), per sequence or a scalar.
    """
    logits = _check(logits)
    return logits * _at(logits, position, token)


def span(logits: ArrayLike, tokens: ArrayLike, mask: ArrayLike | None = None) -> Array:
    r"""The sum of the logits of ``tokens[..., t]`` at every position ``t`` where ``mask`` is true:
    :math:`R_z = \sum_t m_t\, z_{t, k_t}` spread over those logits.

    For a generated continuation, ``tokens`` are the next tokens (``ids[:, 1:]`` against the logits of
    ``ids[:, :-1]``) and ``mask`` marks the generated part: one backward pass explains all of it.

    Args:
      logits: ``(..., tokens, vocabulary)``.
      tokens: ``(..., tokens)`` integer ids, the token explained at each position.
      mask: ``(..., tokens)`` booleans or weights (default: every position).
    """
    logits = _check(logits)
    tokens = jnp.asarray(tokens)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must have the shape of the logits without the vocabulary axis, "
                         f"{logits.shape[:-1]}, got {tokens.shape}")
    weight = jax.nn.one_hot(tokens, logits.shape[-1], dtype=logits.dtype)
    if mask is not None:
        weight = weight * jnp.asarray(mask, logits.dtype)[..., None]
    return logits * weight


def contrastive(logits: ArrayLike, token: ArrayLike, foil: ArrayLike, position: ArrayLike = -1) -> Array:
    r"""The difference ``z_token − z_foil`` at ``position``, per sequence: relevance ``+z`` at the
    token's logit and ``−z`` at the foil's. The input relevance then says what makes the model prefer
    ``token`` over ``foil``.

    Args:
      logits: ``(..., tokens, vocabulary)``.
      token, foil: token ids, per sequence or scalars.
      position: as in :func:`token`.
    """
    logits = _check(logits)
    return logits * (_at(logits, position, token) - _at(logits, position, foil))


__all__ = ["token", "span", "contrastive"]
