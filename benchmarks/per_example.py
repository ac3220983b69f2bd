"""Per-example LFP feedback against per-example gradients: median time, first call.

    python -m benchmarks.per_example [--models mlp,lenet] [--batch 64] [--steps 30] [--json out.json]

For each model of ``experiments.models`` (evaluation mode: LeNet without dropout), four jitted functions
are timed *alternately* in one process (so all see the same machine state):

- ``lfp/ex``: ``jax.vmap`` over the examples of ``lfp_jax.lfp_grad`` on a batch of one, i.e. the
  feedback ``F_i = |θ| ⊙ J_θᵀ s_i`` of every example ``i`` (shape ``(batch, *θ.shape)`` per leaf);
- ``grad/ex``: ``jax.vmap(jax.grad(loss_of_one_example))``, the per-example cross-entropy gradients;
- ``|θ|grad/ex``: ``-|θ| ⊙`` the per-example gradients, the form LFP takes on ReLU networks (Theorem 1),
  as a control: one elementwise product more than ``grad/ex``, fused by XLA into the per-example
  weight-gradient outer product;
- ``lfp`` and ``grad``: the same on the whole batch (one summed feedback, one gradient), for scale.

``ratio`` is ``lfp/ex ÷ grad/ex``; ``ex/batch`` is ``lfp/ex ÷ lfp``, what per-example feedback costs
over batch feedback.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lfp_jax
from experiments import models

SHAPES = {"mlp": (28, 28, 1), "lenet": (28, 28, 1), "cifar_vgg": (32, 32, 3)}


def _functions(name: str, batch: int):
    """Parameters, data and the four functions ``f(params, x, y)`` to time."""
    if name not in SHAPES:
        raise ValueError(f"per-example benchmark has no input shape for model {name!r}; choose from "
                         f"{sorted(SHAPES)} (BatchNorm models have no per-example feedback: batch "
                         f"statistics couple the examples)")
    model = models.build(name, 10)
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, *SHAPES[name]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    params = model.init(jax.random.key(0), x[:2])["params"]

    def fun(p, x):
        return model.apply({"params": p}, x, train=False)

    lfp = lfp_jax.lfp_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(fun(p, x), y).sum()

    def one(f):
        """``f`` of a batch of one, vmapped over the examples."""
        return jax.vmap(lambda p, xi, yi: f(p, xi[None], yi[None]), in_axes=(None, 0, 0))

    grad_ex = one(jax.grad(loss))

    def scaled_ex(p, x, y):
        return jax.tree.map(lambda a, g: -jnp.abs(a) * g, p, grad_ex(p, x, y))

    fns = {"lfp/ex": one(lfp), "grad/ex": grad_ex, "|θ|grad/ex": scaled_ex, "lfp": lfp,
           "grad": jax.grad(loss)}
    return params, x, y, fns


def bench(name: str, batch: int, steps: int) -> dict:
    params, x, y, fns = _functions(name, batch)
    compiled, first = {}, {}
    for label, f in fns.items():
        t = time.perf_counter()
        compiled[label] = jax.jit(f).lower(params, x, y).compile()
        out = jax.block_until_ready(compiled[label](params, x, y))
        first[label] = time.perf_counter() - t
        lead = {a.shape[0] for a in jax.tree.leaves(out)}
        if label.endswith("/ex") and lead != {batch}:
            raise AssertionError(f"{label} did not return one result per example: leading dims {lead}")
    times = {label: [] for label in fns}
    for _ in range(steps):
        for label, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(params, x, y))
            times[label].append(time.perf_counter() - t)
    ms = {label: 1e3 * float(np.median(v)) for label, v in times.items()}
    return {
        "model": name, "batch": batch, "steps": steps, "device": jax.devices()[0].device_kind,
        "lfp_ex_ms": ms["lfp/ex"], "grad_ex_ms": ms["grad/ex"], "ratio": ms["lfp/ex"] / ms["grad/ex"],
        "scaled_grad_ex_ms": ms["|θ|grad/ex"],
        "lfp_batch_ms": ms["lfp"], "grad_batch_ms": ms["grad"],
        "ex_over_batch": ms["lfp/ex"] / ms["lfp"],
        "lfp_ex_first_s": first["lfp/ex"], "grad_ex_first_s": first["grad/ex"],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [bench(m, args.batch, args.steps) for m in args.models.split(",")]
    print(f"{'model':<8} {'batch':>5} {'LFP/ex ms':>9} {'grad/ex ms':>10} {'ratio':>6} {'|θ|grad/ex ms':>13} "
          f"{'LFP ms':>7} {'grad ms':>7} {'ex/batch':>8} {'1st LFP/ex s':>12} {'1st grad/ex s':>13}")
    for r in rows:
        print(f"{r['model']:<8} {r['batch']:>5} {r['lfp_ex_ms']:9.2f} {r['grad_ex_ms']:10.2f} "
              f"{r['ratio']:6.2f} {r['scaled_grad_ex_ms']:13.2f} {r['lfp_batch_ms']:7.2f} "
              f"{r['grad_batch_ms']:7.2f} "
              f"{r['ex_over_batch']:8.2f} {r['lfp_ex_first_s']:12.2f} {r['grad_ex_first_s']:13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
