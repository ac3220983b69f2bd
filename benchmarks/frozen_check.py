"""What the zero-parameter check costs a jitted LFP training step.

    python -m benchmarks.frozen_check [--models mlp,lenet,gpt] [--batch 128] [--steps 200]
        [--json out.json]

Under ``jax.jit`` the parameters are tracers, so ``lfp_value_and_feedback`` compiles the check into the
step: one ``all(θ == 0)`` reduction per parameter leaf that could be frozen, and a host call-back only
when one is zero (see ``lfp_jax._frozen``). For each model the same LFP step (optax SGD with momentum)
is compiled twice, with the check (the default) and without it (``allow_frozen=True``), and the two are
timed alternately (in a random order each round) in one process; the table gives the median step
times and their ratio. Parameters
are PyTorch-initialised (no zero leaf: the check runs, the call-back does not). A second pair of rows
(``+zeros``) keeps Flax's zero biases: there the call-back fires at every step (the first one warns; the
others find the warning given), which is the cost of leaving a reported problem in place.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import jax
import numpy as np
import optax

import lfp_jax
from benchmarks.step_time import CLASSES, _batch, environment
from experiments import models


def _step(name: str, batch: int, zeros: bool, check: bool):
    model = models.build(name, CLASSES.get(name, 10))
    x, y = _batch(name, model, batch)
    params = model.init(jax.random.key(0), x)["params"]
    if not zeros:
        params = lfp_jax.nn.torch_init(jax.random.key(1), params)
    fun = lambda p, x: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(2)})  # noqa: E731
    lfp = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                     allow_frozen=not check)
    opt = optax.sgd(0.01, momentum=0.9)

    def step(p, s, x, y):
        _, g = lfp(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    compiled = jax.jit(step).lower(params, state, x, y).compile()
    return compiled, (params, state, x, y)


def bench(name: str, batch: int, steps: int, zeros: bool) -> dict:
    with_check, args = _step(name, batch, zeros, check=True)
    without, _ = _step(name, batch, zeros, check=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lfp_jax.errors.FrozenParameterWarning)
        for c in (with_check, without):
            jax.block_until_ready(c(*args))
        times = {"check": [], "none": []}
        order = np.random.default_rng(0)
        for _ in range(steps):   # alternately, in a random order each round (no position advantage)
            pairs = [("check", with_check), ("none", without)]
            for label, c in (pairs[i] for i in order.permutation(2)):
                t = time.perf_counter()
                jax.block_until_ready(c(*args))
                times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"model": name + ("+zeros" if zeros else ""), "batch": batch, "steps": steps,
            "check_ms": 1e3 * med["check"], "none_ms": 1e3 * med["none"], "ratio": med["check"] / med["none"],
            "leaves": len(jax.tree.leaves(args[0]))}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet,gpt")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for zeros in (False, True):
            rows.append(bench(name, args.batch, args.steps, zeros))
            r = rows[-1]
            print(f"{r['model']}: with the check {r['check_ms']:.3f} ms, without {r['none_ms']:.3f} ms, "
                  f"ratio {r['ratio']:.3f}", flush=True)
    print("\n| model | parameter leaves | batch | with check ms | allow_frozen=True ms | ratio |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['leaves']} | {r['batch']} | {r['check_ms']:.3f} | {r['none_ms']:.3f} | "
              f"{r['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
