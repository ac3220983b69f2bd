"""Feedback and token relevance of the benchmark's language models, saved before the engine's
performance work changes how they are computed (``tests/test_lm_fixture.py`` checks the engine
against them, in float64).

    python tools/lm_feedback_fixture.py [--out tests/data/lm/feedback.npz]

Small configurations of :mod:`benchmarks.language_models` (vocabulary 32, width 16, 2 layers, 4 heads,
sequence 8, batch 2), every parameter drawn again in float64 (:func:`draw`: no parameter is zero, so
every leaf has feedback), default composites: LFP-ε feedback of the softmax-loss reward for the
next-token (decoders) or same-token (BERT) labels, and AttnLRP relevance per token of the last
position's label logit. Records the jax version and the commit it was made at.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lfp_jax  # noqa: E402
from benchmarks import language_models  # noqa: E402

CONFIG = {"vocab": 32, "width": 16, "depth": 2, "heads": 4}
SEQ, BATCH = 8, 2


def draw(params, offset_scales: bool):
    """Every leaf drawn again in float64 (Flax initialises in float32, whose rounding depends on XLA's
    optimisation passes): ``0.2·N(0, 1)``, and ``1 + 0.1·N(0, 1)`` for the scales of normalisations that
    multiply by ``γ`` (Gemma's multiply by ``1 + γ``: ``0.2·N(0, 1)`` there too). No leaf is zero."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for k, (path, leaf) in enumerate(leaves):
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(5), k), leaf.shape, jnp.float64)
        scale = jax.tree_util.keystr(path).endswith("['scale']") and not offset_scales
        out.append(1 + 0.1 * noise if scale else 0.2 * noise)
    return jax.tree_util.tree_unflatten(tree, out)


def compute(name: str) -> dict[str, np.ndarray]:
    """``feedback/<path>`` for every parameter and ``relevance`` per token of one model."""
    size = dict(CONFIG, hidden=24) if name != "bert" else dict(CONFIG, hidden=32, max_len=16)
    model = language_models.build(name, jnp.float64, **size)
    ids = language_models.batch(jax.random.key(3), CONFIG["vocab"], BATCH, SEQ)
    x, y = ids[:, :-1], (ids[:, :-1] if name == "bert" else ids[:, 1:])
    params = draw(language_models.init(model, jax.random.key(4), x), offset_scales=name == "gemma")
    fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    _, feedback = jax.jit(lfp_jax.lfp_value_and_feedback(fun, lfp_jax.rewards.softmax_loss,
                                                        reward_argnums=(2,), allow_frozen=True))(params, x, y)
    logits = fun(params, x)
    target = lfp_jax.targets.token(logits, y[:, -1])
    _, relevance = jax.jit(lfp_jax.lrp(fun))(params, x, target=target)
    out = {"relevance": np.asarray(relevance), "ids": np.asarray(ids)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(feedback):
        out["feedback/" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("tests", "data", "lm", "feedback.npz"))
    args = parser.parse_args(argv)
    arrays = {}
    for name in language_models.MODELS:
        arrays.update({f"{name}/{k}": v for k, v in compute(name).items()})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    arrays["meta/jax"] = np.asarray(jax.__version__)
    arrays["meta/commit"] = np.asarray(commit.strip())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays")


if __name__ == "__main__":
    main()
