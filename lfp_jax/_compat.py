"""Everything that depends on JAX's internal jaxpr representation, in one place.

JAX moved the jaxpr types from ``jax.core`` to ``jax.extend.core`` and changed the parameters of
several higher-order primitives between 0.10 and 0.12 (``scan`` lost ``num_consts``/``num_carry``
for flat-tree descriptors, and its body became an open ``Jaxpr``). The rest of the package only
talks to this module.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from typing import Any

from jax.extend import core as jex

ClosedJaxpr = jex.ClosedJaxpr
Jaxpr = jex.Jaxpr
Literal = jex.Literal
Var = jex.Var
DropVar = getattr(jex, "DropVar", ())

# Primitive names, with the aliases different JAX versions use.
INLINE_CALLS = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
     "custom_vjp_call_jaxpr", "custom_lin"}
)
SCAN = frozenset({"scan"})
COND = frozenset({"cond"})
WHILE = frozenset({"while"})
REMAT = frozenset({"remat2", "checkpoint", "remat"})


def is_jaxpr(value: Any) -> bool:
    return isinstance(value, (ClosedJaxpr, Jaxpr))


def as_closed(value: Any) -> ClosedJaxpr:
    """A ``ClosedJaxpr`` for a ``Jaxpr`` or ``ClosedJaxpr`` parameter value."""
    if isinstance(value, ClosedJaxpr):
        return value
    return ClosedJaxpr(value, ())


def inline_jaxpr(params: dict) -> ClosedJaxpr:
    """The jaxpr evaluated by a call-like primitive (jit, custom_jvp_call, custom_vjp_call)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            return as_closed(params[key])
    raise KeyError(f"no inner jaxpr among params {sorted(params)}")


def scan_layout(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation, on every supported JAX version."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    groups = params["ft_in"].elts  # (consts, carry, xs) flat trees on jax >= 0.11
    return len(list(groups[0].vals)), len(list(groups[1].vals))


def while_layout(params: dict) -> tuple[int, int]:
    """``(cond_nconsts, body_nconsts)`` of a while equation."""
    return params["cond_nconsts"], params["body_nconsts"]


_HERE = os.path.dirname(os.path.abspath(__file__))
_STDLIB = os.path.dirname(os.path.abspath(os.__file__))
# the frameworks a model is written with: their frames are never the source of a site
_FRAMEWORKS = ("jax", "jaxlib", "flax", "optax", "equinox", "chex", "numpy", "ml_dtypes", "jaxtyping")
_FRAMEWORK_PARTS = ("/penzai/core/",)  # penzai's named-axis machinery (its layers are model code)


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    # located, not imported: importing equinox here cost a model's first call a second
    dirs = [_HERE]
    for mod in _FRAMEWORKS:
        module = sys.modules.get(mod)
        origin = getattr(module, "__file__", None)
        if origin is None:
            try:
                spec = importlib.util.find_spec(mod)
            except (ImportError, ValueError):  # pragma: no cover - optional
                spec = None
            origin = spec.origin if spec is not None else None
        if origin:
            dirs.append(os.path.dirname(os.path.abspath(origin)))
    return tuple(d + os.sep for d in dirs)   # a directory, not a prefix (numpyro is no numpy)


def user_line(source_info: Any) -> str | None:
    """``file:line (function)`` of the innermost frame that created an equation outside the frameworks
    (jax, flax, optax, equinox, lfp_jax, Python itself), or None.

    A model written with Flax points at the user's module, not at ``flax/linen/linear.py``; a model
    from an installed library (transformers, penzai, gemma) at the library's line, shown relative to
    its ``site-packages`` (``transformers/models/gpt2/modeling_flax_gpt2.py:215``).
    """
    tb = getattr(source_info, "traceback", None)
    if tb is None:
        return None
    try:
        from jax._src import source_info_util as siu

        code, lasti = tb.raw_frames()
        frames = [siu.raw_frame_to_frame(c, i) for c, i in zip(code, lasti)]
    except Exception:  # pragma: no cover - depends on jax internals
        return None
    lib = _library_dirs()
    for frame in frames:  # innermost first
        fname = os.path.abspath(frame.file_name)
        installed = "/site-packages/" in fname or "/dist-packages/" in fname
        if fname.startswith(lib) or "<frozen" in fname or (fname.startswith(_STDLIB) and not installed) \
                or any(part in fname for part in _FRAMEWORK_PARTS):
            continue
        shown = re.split(r"/(?:site|dist)-packages/", fname, maxsplit=1)[-1] if installed else frame.file_name
        return f"{shown}:{frame.start_line} ({frame.function_name})"
    return None


def name_stack(source_info: Any) -> str:
    """The Flax module path / ``jax.named_scope`` path of an equation ('' when there is none)."""
    stack = getattr(source_info, "name_stack", None)
    return str(stack) if stack is not None else ""
