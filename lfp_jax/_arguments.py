"""Argument checks shared by the transformations: argument numbers, the reward's arguments, the reward
itself, and the call of ``fun``. Every check fails early, says what is wrong and how to fix it."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util as jtu

from lfp_jax.errors import RewardError


def as_argnums(value: Any, name: str, n: int | None = None) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple, checked against ``n`` positional arguments
    (negative numbers count from the end, as in ``jax.grad``; out of range is an error, never wrapped)."""
    def is_index(k):
        return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))

    if is_index(value):
        nums = (int(value),)
    elif isinstance(value, (tuple, list)) and all(is_index(k) for k in value):
        nums = tuple(int(k) for k in value)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints (argument positions), got {value!r} "
                        f"({type(value).__name__})")
    if n is not None:
        bad = [k for k in nums if not -n <= k < n]
        if bad:
            raise ValueError(f"{name}={value!r} does not fit a call with {n} positional arguments: "
                             f"position{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} "
                             f"{'are' if len(bad) > 1 else 'is'} out of range (valid: {-n} to {n - 1})")
    if len(set(k % n for k in nums) if n else set(nums)) != len(nums):
        raise ValueError(f"{name}={value!r} names an argument twice")
    return nums


def argnums_tuple(argnums: int | Sequence[int], n: int, allow_empty: bool = False) -> tuple[int, ...]:
    nums = as_argnums(argnums, "argnums", n)
    if not nums and not allow_empty:
        raise ValueError("argnums must name at least one argument holding parameters")
    return tuple(sorted(k % n for k in nums))


def input_argnums(value, n: int, argnums: tuple[int, ...]) -> tuple[int, ...] | None:
    if value is None:
        return None
    nums = tuple(sorted({k % n for k in as_argnums(value, "input_argnums", n)}))
    if set(nums) & set(argnums):
        raise ValueError(f"input_argnums={value!r} and argnums={argnums!r} overlap: an argument "
                         f"holds either parameters or inputs")
    return nums


def split_args(args, argnums, reward_argnums, input_nums):
    """``fun``'s arguments, the reward's, and the argument numbers in ``fun``'s positions."""
    n = len(args)
    as_argnums(reward_argnums, "reward_argnums", n)
    reward_set = {k % n for k in reward_argnums}
    fun_args = [a for i, a in enumerate(args) if i not in reward_set]
    reward_args = [args[i % n] for i in reward_argnums]
    mapping = [i for i in range(n) if i not in reward_set]

    def to_fun(nums, name):
        single = not isinstance(nums, (tuple, list))
        nums = as_argnums(nums, name, n)
        for k in nums:
            if k % n in reward_set:
                raise ValueError(f"{name} {nums} and reward_argnums {tuple(reward_argnums)} overlap")
        fun_nums = tuple(mapping.index(k % n) for k in nums)
        return fun_nums[0] if single else fun_nums

    inputs = None if input_nums is None else to_fun(input_nums, "input_argnums")
    return fun_args, reward_args, to_fun(argnums, "argnums"), inputs, mapping


def check_call(fun: Callable, n_args: int, reward_argnums: tuple[int, ...], n_given: int,
               reward_fn: Callable | None = None) -> None:
    """Raise a ``TypeError`` that names the missing keyword when ``fun`` cannot take ``n_args``
    positional arguments (typically: labels meant for the reward passed to the model, because
    ``reward_argnums`` was left out). Functions whose signature Python cannot read are not checked."""
    accepts = _accepts(fun, n_args)
    if accepts is None or accepts[0]:
        return
    takes = accepts[1]
    if reward_argnums:
        raise TypeError(
            f"fun takes {takes} positional argument{'s' * (takes != 1)}, but {n_args} remain for it "
            f"after reward_argnums={tuple(reward_argnums)} took theirs from the {n_given} given: check "
            f"argnums, reward_argnums and the arguments of the call.")
    extra = tuple(range(takes, n_given))
    reward_takes = _accepts(reward_fn, 1 + len(extra)) if reward_fn is not None else None
    fits = "" if reward_takes is not None and not reward_takes[0] else (
        f" If argument{'s' * (len(extra) != 1)} {', '.join(map(str, extra))} (labels, targets) "
        f"{'are' if len(extra) != 1 else 'is'} for the reward, say so: reward_argnums={extra!r} passes "
        f"{'them' if len(extra) != 1 else 'it'} to reward_fn(outputs, ...) instead of fun.")
    raise TypeError(f"fun takes {takes} positional argument{'s' * (takes != 1)} but was given {n_given} "
                    f"(no reward_argnums given).{fits}")


def _accepts(fun: Callable, n: int) -> tuple[bool, int] | None:
    """``(whether fun takes n positional arguments, how many it takes at most)``; ``None`` when its
    signature cannot be read or it takes any number."""
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) <= n <= len(positional), len(positional)


def is_array(leaf: Any) -> bool:
    """Leaves that are traced: arrays (JAX, NumPy). Anything else (an equinox module's activation
    function, a pooling layer's Python ``-inf``, a dropout flag) is a static part of the model and is
    closed over, as ``equinox.filter_jit`` does."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or hasattr(leaf, "__jax_array__")


def leaf_names(path) -> tuple[str, ...]:
    """The key names of a pytree key path, nnx's trailing ``.value`` dropped (a key named ``value``
    elsewhere, BERT's ``attention/self/value``, is kept)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    while parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return tuple(parts)


def path_name(path) -> str:
    """``layers/0/linear/kernel`` for a pytree key path (nnx's trailing ``.value`` dropped)."""
    return "/".join(leaf_names(path))


def check_reward(reward: Any, outputs: Any, out_tree) -> list[Any]:
    r_leaves, r_tree = jtu.tree_flatten(reward)
    if r_tree != out_tree:
        raise RewardError(
            f"the reward must have the structure of the model outputs: got {r_tree}, expected "
            f"{out_tree}. reward_fn(outputs) should return one array per output array."
        )
    for r, o in zip(r_leaves, jtu.tree_leaves(outputs)):
        shape = jnp.shape(r)
        if shape != o.shape:
            raise RewardError(
                f"reward shape {shape} does not match output shape {o.shape}: the reward is given "
                f"per output value (e.g. per sample and class for logits of shape (batch, classes))."
            )
        dtype = jnp.result_type(r)
        if not (jnp.issubdtype(dtype, jnp.number) or dtype == jnp.bool_):
            raise RewardError(f"reward dtype {dtype} is not numeric")
    return r_leaves


def output_relevance(outputs: Any, target: Any) -> Any:
    """The output relevance of ``lrp``: ``one_hot(labels) ⊙ outputs`` for integer labels, else ``target``."""
    if isinstance(outputs, jax.Array) and jnp.issubdtype(jnp.result_type(target), jnp.integer):
        labels = jnp.asarray(target)
        if labels.shape != outputs.shape[:-1]:
            raise RewardError(
                f"integer targets are class labels, one per output row: expected shape "
                f"{outputs.shape[:-1]} for outputs of shape {outputs.shape}, got {labels.shape}. Pass "
                f"the output relevance itself (an array shaped like the outputs, e.g. from "
                f"lfp_jax.targets) for anything else.")
        return jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype) * outputs
    return target


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning that points at the user's call, past every lfp_jax frame."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level
