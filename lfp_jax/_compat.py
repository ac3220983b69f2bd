"""Everything that depends on JAX's internal jaxpr representation, in one place.

JAX moved the jaxpr types from ``jax.core`` to ``jax.extend.core`` and changed the parameters of
several higher-order primitives between 0.10 and 0.12 (``scan`` lost ``num_consts``/``num_carry``
for flat-tree descriptors, and its body became an open ``Jaxpr``). The rest of the package only
talks to this module.
"""

from __future__ import annotations

import os
from typing import Any

import jax
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
_LIBRARY_DIRS = (
    _HERE,
    os.path.dirname(os.path.abspath(jax.__file__)),
)


def _library_dirs() -> tuple[str, ...]:
    dirs = list(_LIBRARY_DIRS)
    for mod in ("flax", "optax", "jaxlib"):
        try:
            module = __import__(mod)
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)))
        except ImportError:  # pragma: no cover - optional
            pass
    return tuple(dirs)


def user_line(source_info: Any) -> str | None:
    """``file:line (function)`` of the innermost user frame that created an equation, or None.

    Frames inside jax, flax, optax, lfp_jax and installed packages are skipped, so a model written
    with Flax points at the user's module, not at ``flax/linen/linear.py``.
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
        if not fname.startswith(lib) and "/site-packages/" not in fname and "<frozen" not in fname:
            return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
    return None


def name_stack(source_info: Any) -> str:
    """The Flax module path / ``jax.named_scope`` path of an equation ('' when there is none)."""
    stack = getattr(source_info, "name_stack", None)
    return str(stack) if stack is not None else ""
