"""Parameters that are entirely zero: LFP feedback is ``|θ| ⊙ (...)``, so such arrays never move."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lfp_jax import _graph
from lfp_jax.errors import FrozenParameterError

def frozen_parameters(params: Any) -> list[str]:
    """Paths of the floating-point arrays in ``params`` that are entirely zero (traced ones skipped)."""
    return [path for path, _ in find_frozen(params)]


def find_frozen(params: Any) -> list[tuple[str, str]]:
    """``(path, what)`` of every all-zero floating-point array; ``what`` says what it is (see
    :func:`frozen_message`)."""
    from lfp_jax.nn.initializers import _leaf_name, is_norm_scale

    flat = jtu.tree_flatten_with_path(params)[0]
    names = [_leaf_name(path) for path, _ in flat]
    kernels = {n[:-1] for n, (_, leaf) in zip(names, flat) if n and n[-1] == "kernel" and jnp.ndim(leaf) >= 2}
    scales = {n[:-1] for n, (_, leaf) in zip(names, flat) if is_norm_scale(n, leaf)}
    frozen = []
    for name, (path, leaf) in zip(names, flat):
        if isinstance(leaf, jax.core.Tracer) or not _graph.is_float(getattr(leaf, "aval", leaf)):
            continue
        # numpy, not jnp: under jit a jnp comparison of a captured constant would be traced
        if not (leaf.size and not np.any(np.asarray(leaf) != 0)):
            continue
        last, owner = (name[-1] if name else ""), name[:-1]
        if last in ("kernel", "bias") and owner in kernels:
            what = "layer"
        elif is_norm_scale(name, leaf):
            what = "scale"
        elif last in ("bias", "offset") and owner in scales:
            what = "offset"
        else:
            what = "other"
        frozen.append((jtu.keystr(path), what))
    return frozen


_FROZEN_ADVICE = {
    "layer": "Flax initialises biases to zero: params = lfp_jax.nn.torch_init(key, params) gives "
             "kernels and biases PyTorch's U(±1/√fan_in), as in the reference",
    "scale": "a normalisation scale of zero silences its layer (Flax's ResNets start every residual "
             "block's last scale at zero): lfp_jax.nn.torch_init sets all-zero normalisation scales "
             "to 1, PyTorch's default",
    "offset": "normalisation offsets start at 0 in PyTorch and Flax alike, so they stay frozen under "
              "LFP, as in the reference; lfp_jax.nn.torch_init keeps them",
    "other": "give them non-zero initial values (lfp_jax.nn.torch_init covers only Flax kernels and "
             "biases and normalisation scales)",
}


def frozen_message(frozen: list[tuple[str, str]]) -> str:
    lines = ["parameters that are all exactly zero never change under LFP (feedback is proportional "
             "to |θ|):"]
    for what in ("layer", "scale", "offset", "other"):
        paths = [p for p, w in frozen if w == what]
        if paths:
            lines.append(f"  {', '.join(paths)}: {_FROZEN_ADVICE[what]}.")
    lines.append("Pass allow_frozen=True where freezing is intended.")
    return "\n".join(lines)


def check_params(params: Any) -> None:
    """Raise :class:`~lfp_jax.errors.FrozenParameterError` if a parameter array is entirely zero.

    LFP feedback is ``|θ| ⊙ (...)``, so such arrays never move (Flax initialises biases to zero; use
    :func:`lfp_jax.nn.torch_init`). Traced values are skipped (call this once outside ``jit``).
    """
    frozen = find_frozen(params)
    if frozen:
        raise FrozenParameterError(frozen_message(frozen))


