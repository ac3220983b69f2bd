"""One third-party language model in a process of its own (tests/test_library_models.py runs this file):
build it as published, describe it, train it for a few LFP steps under jit, explain a prediction per
token, and print what was found as one JSON line. Usage: ``python _library_child.py <model name>``."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", False)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _library_models import BUILDERS  # noqa: E402

import lfp_jax  # noqa: E402
from lfp_jax import Match, rewards, targets  # noqa: E402

STEPS = 8


def main(name: str) -> dict:
    start = time.perf_counter()
    fun, params, ids = BUILDERS[name]()
    found = lfp_jax.find_sites(fun, params, ids)
    table = lfp_jax.describe(fun, params, ids)
    labels = jnp.roll(ids, -1, axis=1)            # next-token prediction
    lfp = lfp_jax.lfp_value_and_grad(fun, rewards.softmax_loss, reward_argnums=(2,))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state):
        logits, neg_feedback = lfp(p, ids, labels)
        updates, state = opt.update(neg_feedback, state, p)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return optax.apply_updates(p, updates), state, loss

    losses, trained, state = [], params, opt.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            trained, state, loss = step(trained, state)
            losses.append(float(loss))   # float() waits for the step: its warning comes when it runs
    frozen = [str(w.message) for w in caught
              if issubclass(w.category, lfp_jax.errors.FrozenParameterWarning)]
    moved = {}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, before), after in zip(flat, jax.tree.leaves(trained)):
        key = jax.tree_util.keystr(path)
        if not np.any(np.asarray(before) != 0):   # leaves that started at zero: did LFP move them?
            moved[key] = bool(np.any(np.asarray(after) != 0))

    logits = fun(params, ids)
    target = targets.token(logits, jnp.argmax(logits[:, -1], -1))
    explain = lfp_jax.lrp(fun, argnums=1, record=Match(kind="embedding"))
    _, per_token, recorded = jax.jit(explain)(params, ids, target=target)
    looped = np.stack([lfp_jax.lrp(fun, argnums=1)(params, ids[b:b + 1], target=target[b:b + 1])[1][0]
                       for b in range(len(ids))])
    return {
        "model": name, "seconds": round(time.perf_counter() - start, 1),
        "versions": {m: _version(m) for m in ("jax", "flax", "transformers", "penzai", "gemma")},
        "sites": len(found), "kinds": sorted({s.kind for s in found}),
        "embedding_paths": [s.path for s in found if s.kind == "embedding"],
        "embedding_sources": [s.source_line for s in found if s.kind == "embedding"],
        "tied": "a tied head" in table, "losses": losses, "frozen_warnings": frozen,
        "zero_leaves_moved": moved,
        "per_token_shape": list(per_token.shape), "per_token": np.asarray(per_token).tolist(),
        "recorded_sum": float(sum(np.sum(v) for v in recorded.values())),
        "per_token_sum": float(np.sum(per_token)), "loop_error": float(np.max(np.abs(looped - per_token))),
        "target_sum": float(np.sum(target)),
    }


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(json.dumps(main(sys.argv[1])))
