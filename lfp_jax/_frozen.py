r"""Parameters that are entirely zero and can therefore never move under LFP.

LFP feedback is ``(∂W/∂θ)ᵀ (|W| ⊙ c_W)`` at every effective weight ``W = h(θ)`` (see
:mod:`lfp_jax._params`). A parameter used directly, moved or scaled has ``W = 0`` when ``θ = 0`` and
then never moves: Flax's zero biases, the zero normalisation scale that Flax's ResNets put at the end
of every residual block. A zero parameter used through a shift (Gemma's RMSNorm computes
``x · (1 + scale)`` with ``scale`` initialised to 0) has ``W ≠ 0`` and moves: it is not reported.

The check runs where people train. With concrete parameters it runs on the host when the model is
traced; under ``jax.jit``, ``pmap`` and ``vmap`` the parameters are tracers, and the compiled step
reads one element of each candidate leaf; only when one is 0 does it test the whole leaf and call back
to the host, which warns once per set of leaves, when the step runs (with JAX's asynchronous dispatch,
possibly after the call has returned; at the latest when its results are read). Under a ``vmap`` of
batched parameters the branch becomes a select, and the call-back runs at every step. The call-back is
a ``jax.pure_callback`` (an effect would also cost every call of the step JAX's fast dispatch path);
its int32 zero is added to the feedback so that the check stays in the program.

The check is not free: a host call-back in an executable slows XLA's CPU runtime down even where it
never runs (``benchmarks/frozen_check.py``: 5-15 % of a CPU step). ``allow_frozen=True`` compiles the
step without it, once the warning has been read or the parameters checked (:func:`check_params` with
the model).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lfp_jax import _graph
from lfp_jax._arguments import leaf_names, user_stacklevel
from lfp_jax._trace import Traced
from lfp_jax.composites import lfp_epsilon
from lfp_jax.errors import FrozenParameterError, FrozenParameterWarning

_ADVICE = {
    "layer": "Flax and Hugging Face's Flax models initialise these biases to zero (GPT-2, BERT): "
             "params = lfp_jax.nn.torch_init(key, params) draws kernels and biases from PyTorch's "
             "U(±1/√fan_in), as in the reference (keep_kernels=True draws only the biases and keeps the "
             "model's own kernels)",
    "scale": "a normalisation scale of zero silences its layer and everything feeding it (Flax's "
             "ResNets start the last scale of every residual block at zero): "
             "lfp_jax.nn.torch_init(key, params, fun, *args) sets the zero scales that LFP cannot move "
             "to 1, PyTorch's default (it leaves scales used as 1 + scale alone: those move)",
    "offset": "normalisation offsets start at 0 in PyTorch and Flax alike, so they stay frozen under "
              "LFP, as in the reference; lfp_jax.nn.torch_init keeps them",
    "other": "give them non-zero initial values (lfp_jax.nn.torch_init covers Flax's kernels and "
             "biases and zero normalisation scales)",
}

_warned: set[str] = set()


def _kind(names: list[tuple[str, ...]], leaves: list[Any]) -> list[str]:
    """What each leaf is, for the advice: a layer's kernel or bias, a normalisation scale or offset."""
    kernels = {n[:-1] for n, leaf in zip(names, leaves) if n and n[-1] == "kernel" and np.ndim(leaf) >= 2}
    scales = {n[:-1] for n, leaf in zip(names, leaves) if is_norm_scale(n, leaf)}
    kinds = []
    for name, leaf in zip(names, leaves):
        last, owner = (name[-1] if name else ""), name[:-1]
        if last in ("kernel", "bias") and owner in kernels:
            kinds.append("layer")
        elif is_norm_scale(name, leaf):
            kinds.append("scale")
        elif last in ("bias", "offset") and owner in scales:
            kinds.append("offset")
        else:
            kinds.append("other")
    return kinds


def is_norm_scale(name: tuple[str, ...], leaf: Any) -> bool:
    """Whether a leaf at key names ``name`` is a normalisation scale (a 1-D Flax ``scale`` or
    equinox ``weight``)."""
    if not name or not hasattr(leaf, "shape"):
        return False
    return name[-1] in ("scale", "weight") and np.ndim(leaf) == 1


def message(frozen: list[tuple[str, str]]) -> str:
    """The warning or error text for ``(path, kind)`` pairs."""
    lines = ["parameters that are all exactly zero never change under LFP (the feedback of a weight is "
             "|W| ⊙ c_W, and these are used as weights directly, moved or scaled):"]
    for what in ("layer", "scale", "offset", "other"):
        paths = [p for p, w in frozen if w == what]
        if paths:
            lines.append(f"  {', '.join(paths)}: {_ADVICE[what]}.")
    lines.append("Pass allow_frozen=True where freezing is intended.")
    return "\n".join(lines)


def candidates(t: Any) -> list[int]:
    """The traced leaves (of a :class:`~lfp_jax._trace.Traced`) that never move if they are zero: float
    parameters every use of which keeps a zero a zero."""
    keep = t.plan.zero_keeping
    return [k for k in range(len(t.leaves)) if t.is_param[k] and k < len(keep) and keep[k]
            and t.leaves[k].size]


def report(t: Any) -> Any:
    """Warn about candidate leaves that are entirely zero: now for concrete ones, from inside the
    compiled program for traced ones (see the module docstring).

    Returns ``None``, or for traced leaves an int32 zero computed by the check, which the caller adds to
    the feedback: a value the outputs depend on keeps the check in the compiled program. The check reads
    one element of each candidate leaf per step; only when one of them is 0 does it test the whole leaf
    and call back to the host (``jax.pure_callback``: no effect, so JAX keeps its fast dispatch path).
    """
    cands = candidates(t)
    if not cands:
        return None
    names = [tuple(t.names[k].split("/")) for k in range(len(t.leaves))]
    kinds = dict(zip(range(len(t.leaves)), _kind(names, t.leaves)))
    values = {k: _concrete(t.leaves[k]) for k in cands}
    traced = [k for k in cands if values[k] is None]
    frozen = [(t.paths[k], kinds[k]) for k in cands if values[k] is not None and not np.any(values[k] != 0)]
    if frozen:
        warnings.warn(message(frozen), FrozenParameterWarning, stacklevel=user_stacklevel())
    if not traced:
        return None
    leaves = [t.leaves[k] for k in traced]
    found = tuple((t.paths[k], kinds[k]) for k in traced)

    first = jnp.stack([leaf[(0,) * leaf.ndim] == 0 for leaf in leaves])   # one element each: cheap

    def full_check(_):
        flags = jnp.stack([jnp.all(leaf == 0) for leaf in leaves])
        return jax.pure_callback(functools.partial(_warn_once, found), jax.ShapeDtypeStruct((), jnp.int32),
                                 flags, vmap_method="sequential")

    return jax.lax.cond(jnp.any(first), full_check, lambda _: jnp.zeros((), jnp.int32), None)


def _concrete(leaf: Any) -> np.ndarray | None:
    """The value of ``leaf`` on the host, if it has one: a concrete array, or one batched by an eager
    ``vmap`` (its tracer holds the array); ``None`` for an abstract tracer (``jit``, ``pmap``)."""
    while isinstance(leaf, jax.core.Tracer) and type(leaf).__name__ == "BatchTracer":
        leaf = getattr(leaf, "val", None)
    if leaf is None or isinstance(leaf, jax.core.Tracer):
        return None
    return np.asarray(leaf)   # numpy: a jnp comparison of a leaf captured under jit would be traced


def _warn_once(found: tuple, flags: Any) -> np.ndarray:
    """Host side of the in-program check: warn once per set of frozen leaves. Returns the int32 zero
    that the compiled step adds to the feedback."""
    flags = np.asarray(flags).reshape(-1, len(found))
    frozen = [f for f, on in zip(found, flags.any(axis=0)) if on]
    text = message(frozen) if frozen else None
    if text is not None and text not in _warned:
        _warned.add(text)
        warnings.warn(text + " (found inside a compiled step)", FrozenParameterWarning, stacklevel=2)
    return np.zeros((), np.int32)


def find_frozen(params: Any) -> list[tuple[str, str]]:
    """``(path, kind)`` of every all-zero floating-point array of ``params`` (traced ones skipped),
    judged by the arrays alone: parameters used as ``1 + θ`` are among them (they move; the check with
    the model, :func:`check_params` with ``fun``, leaves them out)."""
    flat = jtu.tree_flatten_with_path(params)[0]
    names = [leaf_names(path) for path, _ in flat]
    kinds = _kind(names, [leaf for _, leaf in flat])
    frozen = []
    for kind, (path, leaf) in zip(kinds, flat):
        if isinstance(leaf, jax.core.Tracer) or not _graph.is_float(getattr(leaf, "aval", leaf)):
            continue
        if leaf.size and not np.any(np.asarray(leaf) != 0):
            frozen.append((jtu.keystr(path), kind))
    return frozen


def would_freeze(params: Any, fun: Any, args: tuple) -> list[tuple[str, str]]:
    """``(path, kind)`` of the leaves of ``params`` that ``fun(params, *args)`` uses so that they could
    never move if they were zero (used directly, moved or scaled; see the module docstring). Needs no
    values: it works on tracers too (inside ``pmap``, for a model with a named batch axis)."""
    t = Traced(fun, (params, *args), lfp_epsilon(), 0, False, strict=False)
    names = [tuple(t.names[k].split("/")) for k in range(len(t.leaves))]
    kinds = _kind(names, t.leaves)
    return [(t.paths[k][len("[0]"):], kinds[k]) for k in candidates(t)]


def frozen_leaves(params: Any, fun: Any, args: tuple) -> list[tuple[str, str]]:
    """``(path, kind)`` of the leaves of ``params`` that are zero and that ``fun(params, *args)`` uses so
    that they can never move (concrete parameters)."""
    values = {jtu.keystr(path): leaf for path, leaf in jtu.tree_flatten_with_path(params)[0]}
    return [(path, kind) for path, kind in would_freeze(params, fun, args)
            if not np.any(np.asarray(values[path]) != 0)]


def check_params(params: Any, fun: Any = None, *args: Any) -> None:
    """Raise :class:`~lfp_jax.errors.FrozenParameterError` if a parameter array is entirely zero and so
    can never move under LFP.

    Without ``fun`` every all-zero float array counts. With the model, ``fun(params, *args)``, only
    those that it uses directly, moved or scaled: a zero used as ``1 + θ`` moves and is not reported.
    Traced values are skipped (call this once outside ``jit``; inside, ``lfp_value_and_feedback`` warns
    by itself).
    """
    frozen = find_frozen(params) if fun is None else frozen_leaves(params, fun, args)
    if frozen:
        raise FrozenParameterError(message(frozen))
