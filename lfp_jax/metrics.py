r"""Faithfulness of explanations: perturbation curves, for a batch in one jitted program.

An attribution ``R`` says which input features a score ``s(x)`` (a class logit, a next-token logit)
rests on. The perturbation test (pixel flipping, token deletion) checks it: replace the features
group by group in the order of ``R`` and record the score after each step.

* **Most relevant first (MoRF).** The groups in decreasing order of relevance. A faithful attribution
  makes the score fall fast, so the area under the curve is small.
* **Least relevant first (LeRF).** The groups in increasing order. The score should hold up, so the
  area is large.

With ``G`` groups, ``K`` steps and ``n_k = round(k G / K)`` groups replaced after step ``k``, the curves
are ``s_k = s(x^{(k)})`` for ``k = 0 … K``. They are plotted over the fraction ``f_k = k / K``
removed; their areas are trapezoids on ``[0, 1]``:

.. math::

    A = \sum_{k=0}^{K-1} (f_{k+1} - f_k)\, \frac{s_k + s_{k+1}}{2}, \qquad
    \Delta A = A_\mathrm{LeRF} - A_\mathrm{MoRF}

``ΔA`` is the area between the two curves (AttnLRP's faithfulness measure, Achtibat et al. 2024).
The larger it is, the better the attribution separates what matters from what does not. Areas are in
the score's units; compare attributions of the same model on the same examples.

:func:`perturbation_curves` takes any score function and any attribution.
:func:`faithfulness` takes a model ``fun(params, x)`` and an LRP-style target. It computes the
baseline attributions (random, gradient, gradient × input, ε-LRP) in the same call, and evaluates
them with the user's attributions on the same perturbations. Every step of every curve of a batch is
one program: the perturbed inputs of ``chunk`` steps are stacked and run at once (``jax.lax.map`` over
chunks).

Groups and replacement:

* ``group``: the block of input elements replaced together, one size per non-batch axis of ``x``.
  ``None`` means each element alone. ``(1, 1, C)`` gives the pixels of channel-last images,
  ``(4, 4, C)`` their 4×4 patches, and ``(1, V)`` the tokens of one-hot text. An axis of size ``-1``
  is taken whole. Relevance is summed within each group; it may also be passed per group already.
  Integer token ids ``(B, T)`` are grouped per token.
* ``replacement``: what a removed group becomes.

  * ``"zero"``: 0, or token id 0.
  * ``"mean"``: the example's mean over the axes the groups split. For pixels, that is the mean
    colour of the image per channel.
  * ``"blur"``: a Gaussian blur of the example with σ = ``sigma`` elements along those axes.
  * A number or an array broadcastable to ``x``: a dataset mean, or a mask/pad token id.
  * A callable ``x ↦ array shaped like x``.

Example::

    def apply(params, images):
        return model.apply({"params": params}, images)

    _, rel = jax.jit(lfp_jax.lrp(apply))(params, images, target=labels)
    curves = lfp_jax.metrics.faithfulness(apply, params, images, labels, {"AttnLRP": rel},
                                          group=(1, 1, 1), steps=28)
    {name: float(c.area_between.mean()) for name, c in curves.items()}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BASELINES", "Curves", "baseline_attributions", "faithfulness", "perturbation_curves",
           "replace_groups"]

Array = jax.Array

#: The baseline attributions :func:`faithfulness` computes by name.
BASELINES = ("random", "gradient", "gradient_x_input", "epsilon")

# When ``chunk`` is not given, each chunk of perturbed batches holds about _CHUNK_EXAMPLES examples (on
# CPU a model runs batches of a few hundred as fast per example as larger ones) and at most
# _CHUNK_ELEMENTS input elements (2**22 float32: 16 MiB of input; the activations take a multiple).
_CHUNK_EXAMPLES = 256
_CHUNK_ELEMENTS = 1 << 22


class Curves(NamedTuple):
    """Perturbation curves of a batch (a pytree: it passes through ``jit`` and ``vmap``).

    Attributes:
      fractions: ``(K+1,)`` the fraction of groups replaced after each step, ``0 … 1``.
      morf: ``(B, K+1)`` the score after each step, most relevant groups first.
      lerf: ``(B, K+1)`` the score after each step, least relevant groups first.
    """

    fractions: Array
    morf: Array
    lerf: Array

    @property
    def auc_morf(self) -> Array:
        """``(B,)`` area under the most-relevant-first curve (small is faithful)."""
        return _trapezoid(self.morf, self.fractions)

    @property
    def auc_lerf(self) -> Array:
        """``(B,)`` area under the least-relevant-first curve (large is faithful)."""
        return _trapezoid(self.lerf, self.fractions)

    @property
    def area_between(self) -> Array:
        """``(B,)`` ``ΔA = A_LeRF − A_MoRF``, the area between the curves (large is faithful)."""
        return self.auc_lerf - self.auc_morf

    def summary(self) -> dict[str, float]:
        """Batch means of the three areas, as floats."""
        return {"auc_morf": float(jnp.mean(self.auc_morf)), "auc_lerf": float(jnp.mean(self.auc_lerf)),
                "area_between": float(jnp.mean(self.area_between))}


def _trapezoid(s: Array, f: Array) -> Array:
    return jnp.sum(jnp.diff(f) * (s[..., 1:] + s[..., :-1]) / 2, axis=-1)


# -- groups ------------------------------------------------------------------------------------------


def _group_shape(shape: tuple[int, ...], group: Sequence[int] | None) -> tuple[int, ...]:
    """The group block, one size per non-batch axis of ``shape``; -1 takes the axis whole."""
    inner = shape[1:]
    if group is None:
        return (1,) * len(inner)
    group = tuple(int(g) for g in group)
    if len(group) != len(inner):
        raise ValueError(f"group={group} has {len(group)} sizes, but x of shape {shape} has {len(inner)} "
                         f"non-batch axes: give one size per axis, e.g. (1, 1, {inner[-1]}) for the pixels "
                         f"of channel-last images" if len(inner) == 3 else
                         f"group={group} has {len(group)} sizes, but x of shape {shape} has {len(inner)} "
                         f"non-batch axes: give one size per axis (-1 for a whole axis)")
    group = tuple(n if g == -1 else g for g, n in zip(group, inner))
    bad = [(a, g, n) for a, (g, n) in enumerate(zip(group, inner)) if g < 1 or n % g]
    if bad:
        a, g, n = bad[0]
        raise ValueError(f"group={group} does not tile x of shape {shape}: axis {a + 1} has {n} elements, "
                         f"not a multiple of the group size {g}")
    return group


def _grid(shape: tuple[int, ...], group: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // g for n, g in zip(shape[1:], group))


def _split(a: Array, grid: tuple[int, ...], group: tuple[int, ...]) -> Array:
    """``(B, *shape)`` → ``(B, n1, g1, n2, g2, ...)``."""
    return a.reshape((a.shape[0],) + tuple(v for pair in zip(grid, group) for v in pair))


def _group_relevance(relevance: Array, shape: tuple[int, ...], group: tuple[int, ...]) -> Array:
    """``(B, G)``: relevance summed within each group (or given per group already)."""
    grid = _grid(shape, group)
    relevance = jnp.asarray(relevance)
    if relevance.shape == tuple(shape):
        summed = jnp.sum(_split(relevance, grid, group), axis=tuple(range(2, 2 * len(grid) + 1, 2)))
        return summed.reshape(shape[0], -1)
    if relevance.shape == (shape[0],) + grid:
        return relevance.reshape(shape[0], -1)
    raise ValueError(f"relevance of shape {relevance.shape} fits neither x {tuple(shape)} nor its groups "
                     f"{(shape[0],) + grid} (group={group}); pass the relevance of x, or one value per group")


def _expand(mask: Array, shape: tuple[int, ...], group: tuple[int, ...]) -> Array:
    """A ``(B, G)`` group mask as an element mask of ``shape``."""
    grid = _grid(shape, group)
    m = mask.reshape((shape[0],) + tuple(v for n in grid for v in (n, 1)))
    m = jnp.broadcast_to(m, (shape[0],) + tuple(v for pair in zip(grid, group) for v in pair))
    return m.reshape(shape)


# -- replacements ------------------------------------------------------------------------------------


def _split_axes(shape: tuple[int, ...], group: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of ``x`` (batch axis 0) that the groups split: a group is smaller than the axis."""
    return tuple(a + 1 for a, (g, n) in enumerate(zip(group, shape[1:])) if g < n)


def _gaussian_blur(x: Array, axes: tuple[int, ...], sigma: float) -> Array:
    """A separable Gaussian blur along ``axes``: kernel ``exp(-d²/2σ²)`` normalised, radius ``⌈3σ⌉``,
    edges reflected."""
    radius = max(1, math.ceil(3 * sigma))
    d = np.arange(-radius, radius + 1)
    w = np.exp(-d ** 2 / (2 * sigma ** 2))
    w = w / w.sum()
    out = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    for axis in axes:
        n = out.shape[axis]
        if n == 1:
            continue
        r = min(radius, n - 1)
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = jnp.pad(out, pad, mode="reflect")
        ww = w[radius - r: radius + r + 1]
        ww = ww / ww.sum()
        out = sum(float(wk) * jax.lax.slice_in_dim(padded, k, k + n, axis=axis) for k, wk in enumerate(ww))
    return out.astype(x.dtype)


def _replacement(x: Array, replacement: Any, group: tuple[int, ...], sigma: float) -> Array:
    """What the removed groups become: an array broadcastable to ``x``."""
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if isinstance(replacement, str):
        if replacement == "zero":
            return jnp.zeros((), x.dtype)
        if integer:
            raise ValueError(f"replacement={replacement!r} needs float inputs; x holds integers ({x.dtype}, "
                             f"token ids?): pass the id of a mask or pad token, e.g. replacement=0")
        axes = _split_axes(x.shape, group)
        if replacement == "mean":
            return jnp.mean(x, axis=axes, keepdims=True).astype(x.dtype)
        if replacement == "blur":
            return _gaussian_blur(x, axes, sigma)
        raise ValueError(f"unknown replacement {replacement!r}; choose 'zero', 'mean' or 'blur', or pass a "
                         f"value, an array broadcastable to x, or a function of x")
    value = replacement(x) if callable(replacement) else replacement
    value = jnp.asarray(value)
    if integer and not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"x holds integers ({x.dtype}, token ids?) but the replacement is {value.dtype}: "
                         f"pass a token id (a mask or pad token)")
    try:
        jnp.broadcast_shapes(value.shape, x.shape)
    except ValueError:
        raise ValueError(f"the replacement of shape {value.shape} does not broadcast to x of shape "
                         f"{x.shape}") from None
    return value.astype(x.dtype)


def replace_groups(x: Any, mask: Any, *, group: Sequence[int] | None = None, replacement: Any = "zero",
                   sigma: float = 2.0) -> Array:
    """``x`` with the groups where ``mask`` ``(B, G)`` is true replaced (the perturbation of one step).

    Args:
      x: ``(B, ...)`` inputs.
      mask: ``(B, G)`` booleans, ``G`` the number of groups (row-major over the group grid).
      group, replacement, sigma: as in :func:`perturbation_curves`.
    """
    x = jnp.asarray(x)
    group = _group_shape(x.shape, group)
    value = _replacement(x, replacement, group, sigma)
    return jnp.where(_expand(jnp.asarray(mask, bool), x.shape, group), value, x)


# -- curves ------------------------------------------------------------------------------------------


def _counts(n_groups: int, steps: int) -> np.ndarray:
    """Groups replaced after each step: ``round(k G / K)``, ``k = 0 … K``."""
    return np.rint(np.arange(steps + 1) * n_groups / steps).astype(np.int32)


def _default_chunk(x: Array, n: int) -> int:
    return max(1, min(n, _CHUNK_EXAMPLES // x.shape[0], _CHUNK_ELEMENTS // max(1, x.size)))


def _curves(score: Callable[..., Array], score_args: tuple, x: Array, relevance: Array, value: Array,
            group: tuple[int, ...], steps: int, chunk: int | None) -> Curves:
    rel = _group_relevance(relevance, x.shape, group)
    n_groups = rel.shape[1]
    rel = rel.astype(jnp.promote_types(rel.dtype, jnp.float32))
    # rank[b, g]: when group g is replaced (0 = first); ties keep index order (stable sort)
    morf = jnp.argsort(jnp.argsort(-rel, axis=1, stable=True), axis=1)
    lerf = jnp.argsort(jnp.argsort(rel, axis=1, stable=True), axis=1)
    ranks = jnp.stack([morf, lerf])                                    # (2, B, G)
    counts = jnp.asarray(np.tile(_counts(n_groups, steps), 2))         # (2(K+1),)
    which = jnp.repeat(jnp.arange(2), steps + 1)

    def one(i):
        mask = ranks[which[i]] < counts[i]
        return score(jnp.where(_expand(mask, x.shape, group), value, x), *score_args)

    n = 2 * (steps + 1)
    scores = jax.lax.map(one, jnp.arange(n), batch_size=chunk or _default_chunk(x, n))   # (2(K+1), B)
    scores = jnp.asarray(scores)
    if scores.shape[1:] != (x.shape[0],):
        raise ValueError(f"score must return one value per example, shape ({x.shape[0]},); it returned "
                         f"{scores.shape[1:]}")
    fractions = jnp.arange(steps + 1, dtype=scores.dtype) / steps
    return Curves(fractions, scores[: steps + 1].T, scores[steps + 1:].T)


@functools.partial(jax.jit, static_argnames=("score", "group", "steps", "chunk"))
def _curves_jit(score, score_args, x, relevance, value, group, steps, chunk):
    return _curves(score, score_args, x, relevance, value, group, steps, chunk)


def _run(score, score_args, x, relevance, steps, group, replacement, sigma, chunk) -> Curves:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {x.shape}")
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    group = _group_shape(x.shape, group)
    value = _replacement(x, replacement, group, sigma)
    return _curves_jit(score, score_args, x, relevance, value, group, int(steps), chunk)


def perturbation_curves(score: Callable[[Array], Array], x: Any, relevance: Any, *, steps: int = 20,
                        group: Sequence[int] | None = None, replacement: Any = "zero", sigma: float = 2.0,
                        chunk: int | None = None) -> Curves:
    r"""Most- and least-relevant-first perturbation curves of a batch, in one jitted program.

    After step ``k`` of ``K`` the ``round(k G / K)`` groups of highest (MoRF) or lowest (LeRF) relevance
    of each example are replaced, and ``score`` is evaluated on the perturbed batch. See the module
    docstring for the areas.

    Args:
      score: ``x' ↦ (B,)`` scores of a perturbed batch ``x'`` shaped like ``x``, e.g.
        ``lambda x: model(x)[jnp.arange(B), labels]``. Row ``b`` is always a perturbation of example
        ``b``. It is static under ``jit``: pass the same function object again to reuse the compiled
        program.
      x: ``(B, ...)`` inputs, float features or integer token ids.
      relevance: the attribution, shaped like ``x`` or like its groups ``(B, *grid)``. Larger is more
        relevant; ties are replaced in index order.
      steps: ``K``, the number of steps (each replaces about ``G/K`` groups).
      group: the group block, one size per non-batch axis (``None``: each element; ``-1``: whole axis).
      replacement: ``"zero"``, ``"mean"``, ``"blur"``, a value or array broadcastable to ``x`` (a
        token id for ids), or a function of ``x``.
      sigma: the blur's standard deviation in elements (``replacement="blur"``).
      chunk: how many of the ``2(K+1)`` perturbed batches run at once (vmapped; chunks one after
        another in a ``lax.map``). The default gives chunks of about 256 examples, with at most 16 MiB
        of input. Larger chunks pay off on accelerators.

    Returns:
      :class:`Curves` with ``fractions`` ``(K+1,)`` and ``morf``, ``lerf`` ``(B, K+1)``.
    """
    return _run(score, (), x, relevance, steps, group, replacement, sigma, chunk)


# -- attributions and the whole evaluation -----------------------------------------------------------


def _weights(outputs: Any, target: Any) -> Array:
    """The weights ``w`` of the explained score ``s(x) = Σ w ⊙ fun(x)`` per example: ``one_hot(label)``
    for integer labels, ``target / outputs`` (where the outputs are non-zero) for an output relevance
    from :mod:`lfp_jax.targets` (1 at an explained logit, −1 at a contrasted one)."""
    outputs = jnp.asarray(outputs)
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.integer):
        if target.shape != outputs.shape[:1] or outputs.ndim != 2:
            raise ValueError(f"integer targets are class labels, one per row of outputs (B, classes); got "
                             f"labels {target.shape} for outputs {outputs.shape}: for other outputs pass "
                             f"the output relevance (lfp_jax.targets)")
        return jax.nn.one_hot(target, outputs.shape[-1], dtype=outputs.dtype)
    if target.shape != outputs.shape:
        raise ValueError(f"the target (output relevance) has shape {target.shape}, the outputs "
                         f"{outputs.shape}: they must match")
    safe = jnp.where(outputs == 0, 1, outputs)
    return jnp.where(outputs == 0, 0, target / safe).astype(outputs.dtype)


def _scores(fun: Callable, params: Any, x: Array, w: Array) -> Array:
    out = fun(params, x)
    return jnp.sum(w * out, axis=tuple(range(1, out.ndim)))


def _epsilon_lrp(epsilon: float):
    from lfp_jax import composites, rules

    grad = rules.Gradient()
    c = composites.lfp_epsilon(epsilon, dropout_rescale=False).with_rules(
        (composites.Match(kind="softmax"), grad), (composites.Match(kind="bilinear"), grad),
        name=f"epsilon_lrp(epsilon={epsilon:g})")
    return dataclasses.replace(c, preset=len(c.entries))   # rules for sites a model may lack: no warning


@functools.lru_cache(maxsize=64)
def _model_score(fun: Callable) -> Callable[..., Array]:
    """``(x', params, w) ↦ Σ w ⊙ fun(params, x')`` per example: one function object per model, so that
    the compiled curves of a model are reused across batches (``params`` and ``w`` are arguments)."""
    return lambda x, params, w: _scores(fun, params, x, w)


def _gradient_composite():
    """Every site the plain gradient, embeddings relevance ``e ⊙ ∂s/∂e``: LRP with it is gradient × input."""
    from lfp_jax import composites, rules

    grad = rules.Gradient()
    entries = tuple((composites.Match(kind=k), grad) for k in sorted(grad.kinds))
    entries += ((composites.Match(kind="embedding"), rules.Embedding()),)
    return composites.Composite(entries, name="gradient_x_input", preset=len(entries))


def baseline_attributions(fun: Callable, params: Any, x: Any, target: Any, names: Sequence[str] = BASELINES,
                          *, key: Any = None, epsilon: float = 1e-6) -> dict[str, Array]:
    r"""Baseline attributions of the score ``s(x) = Σ w ⊙ fun(params, x)`` (``w`` from ``target`` as in
    :func:`lfp_jax.lrp`), shaped like ``x``:

    * ``"random"``: uniform noise in ``[0, 1)`` from ``key``. It is the floor an attribution must beat.
    * ``"gradient"``: ``∂s/∂x`` (signed). It is not defined for integer token ids.
    * ``"gradient_x_input"``: ``x ⊙ ∂s/∂x``. For token ids it is ``Σ_d e_{t,d} ∂s/∂e_{t,d}`` at the
      embedding lookup (LXT's ``inputs_embeds · grad``).
    * ``"epsilon"``: ε-LRP. It uses the ε rule at linear layers, sums and normalisations, the identity
      at activations, and the plain gradient at softmax and at products of two input-dependent values.
      This is LRP without AttnLRP's attention rules.

    Args:
      fun: the model, ``fun(params, x)``.
      target: class labels (one per row) or an output relevance shaped like the outputs.
      names: which baselines.
      key: the PRNG key of ``"random"`` (default ``jax.random.key(0)``).
      epsilon: ε of ``"epsilon"``.
    """
    from lfp_jax.api import lrp

    x = jnp.asarray(x)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if integer and "gradient" in names:
        raise ValueError("the 'gradient' baseline needs float inputs; x holds integers (token ids), which "
                         "have no gradient: leave 'gradient' out (gradient_x_input is defined for ids)")
    w = _weights(fun(params, x), target)
    out: dict[str, Array] = {}
    for name in names:
        if name == "random":
            out[name] = jax.random.uniform(jax.random.key(0) if key is None else key, x.shape)
        elif name == "gradient":
            out[name] = jax.grad(lambda xx: jnp.sum(_scores(fun, params, xx, w)))(x)
        elif name == "gradient_x_input":
            if integer:
                _, out[name] = lrp(fun, _gradient_composite())(params, x, target=target)
            else:
                g = jax.grad(lambda xx: jnp.sum(_scores(fun, params, xx, w)))(x)
                out[name] = x * g
        else:
            _, out[name] = lrp(fun, _epsilon_lrp(epsilon))(params, x, target=target)
    return out


def faithfulness(fun: Callable, params: Any, x: Any, target: Any,
                 attributions: Mapping[str, Any] | None = None, *, baselines: Sequence[str] | None = None,
                 steps: int = 20, group: Sequence[int] | None = None, replacement: Any = "zero",
                 sigma: float = 2.0, chunk: int | None = None, key: Any = None,
                 epsilon: float = 1e-6) -> dict[str, Curves]:
    r"""Perturbation curves of the user's ``attributions`` and of baseline attributions, same model, same
    examples, same perturbations.

    The score is the explained output, ``s(x') = Σ w ⊙ fun(params, x')`` per example. The weights
    ``w`` come from ``target`` as in :func:`lfp_jax.lrp`: class labels give the label's logit, and an
    output relevance from :mod:`lfp_jax.targets` gives the explained logits, a contrast or a span.

    Args:
      fun: the model, ``fun(params, x)``; the first output axis is the batch.
      params: its parameters.
      x: ``(B, ...)`` inputs, float features or integer token ids.
      target: class labels ``(B,)`` or an output relevance shaped like the outputs.
      attributions: ``{name: relevance shaped like x (or like its groups)}``, e.g. the AttnLRP relevance
        from :func:`lfp_jax.lrp`.
      baselines: names from :data:`BASELINES` to compute and evaluate as well. By default all of them,
        except ``"gradient"`` for integer inputs.
      steps, group, replacement, sigma, chunk: as in :func:`perturbation_curves`.
      key: the PRNG key of the random baseline.
      epsilon: ε of the ε-LRP baseline.

    Returns:
      ``{name: Curves}``: the baselines first, then ``attributions`` in their order.
    """
    x = jnp.asarray(x)
    if baselines is None:
        ids = jnp.issubdtype(x.dtype, jnp.integer)   # no gradient of token ids
        baselines = tuple(b for b in BASELINES if not (b == "gradient" and ids))
    w = _weights(fun(params, x), target)
    every = dict(baseline_attributions(fun, params, x, target, tuple(baselines), key=key, epsilon=epsilon))
    for name, rel in (attributions or {}).items():
        if name in every:
            raise ValueError(f"attribution name {name!r} is also a baseline's: rename it")
        every[name] = rel
    score = _model_score(fun)
    return {name: _run(score, (params, w), x, rel, steps, group, replacement, sigma, chunk)
            for name, rel in every.items()}
