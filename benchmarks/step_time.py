"""LFP step against gradient step: median step time, first call, peak memory.

    python -m benchmarks.step_time [--models mlp,lenet] [--batch 128] [--steps 100] [--json out.json]

For each model, a jitted LFP training step (``lfp_jax.lfp_value_and_grad`` + optax) and a jitted
``jax.value_and_grad`` step with the same optimiser are timed *alternately* in one process (so both see
the same machine state); the table shows medians, their ratio, the first call (trace + compile + run)
and the peak temporary memory from the compiled executables' memory analysis.
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

SHAPES = {"mlp": (28, 28, 1), "lenet": (28, 28, 1), "cifar_vgg": (32, 32, 3), "resnet": (32, 32, 3)}


def _steps(name: str, batch: int):
    model = models.build(name, 10)
    x = jnp.ones((batch, *SHAPES[name]), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(0), x)
    params, stats = variables["params"], variables.get("batch_stats")
    opt = optax.sgd(0.01, momentum=0.9)
    key = jax.random.key(1)

    def fun(p, x):
        v = {"params": p} if stats is None else {"params": p, "batch_stats": stats}
        kw = {"mutable": ["batch_stats"]} if stats is not None else {}
        out = model.apply(v, x, train=True, rngs={"dropout": key}, **kw)
        return out

    has_aux = stats is not None
    lfp = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                     has_aux=has_aux, allow_frozen=True)

    def loss(p, x, y):
        out = fun(p, x)
        z = out[0] if has_aux else out
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    def lfp_step(p, s, x, y):
        _, g = lfp(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def grad_step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return params, opt.init(params), x, y, lfp_step, grad_step


def _first_call(step, *args):
    t = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - t


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # pragma: no cover - backend dependent
        return None


def bench(name: str, batch: int, steps: int) -> dict:
    p, s, x, y, lfp_step, grad_step = _steps(name, batch)
    lfp_c, lfp_first = _first_call(lfp_step, p, s, x, y)
    grad_c, grad_first = _first_call(grad_step, p, s, x, y)
    times = {"lfp": [], "grad": []}
    for _ in range(steps):
        for label, c in (("lfp", lfp_c), ("grad", grad_c)):
            t = time.perf_counter()
            jax.block_until_ready(c(p, s, x, y))
            times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    mem = {"lfp": _peak_bytes(lfp_c), "grad": _peak_bytes(grad_c)}
    return {
        "model": name, "batch": batch, "device": jax.devices()[0].device_kind,
        "lfp_ms": 1e3 * med["lfp"], "grad_ms": 1e3 * med["grad"], "ratio": med["lfp"] / med["grad"],
        "lfp_first_s": lfp_first, "grad_first_s": grad_first, "first_ratio": lfp_first / grad_first,
        "lfp_bytes": mem["lfp"], "grad_bytes": mem["grad"],
        "memory_ratio": (mem["lfp"] / mem["grad"]) if mem["lfp"] and mem["grad"] else None,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [bench(m, args.batch, args.steps) for m in args.models.split(",")]
    print(f"{'model':<10} {'batch':>5} {'LFP ms':>8} {'grad ms':>8} {'ratio':>6} {'1st LFP s':>9} "
          f"{'1st grad s':>10} {'mem ratio':>9}")
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "n/a"
        print(f"{r['model']:<10} {r['batch']:>5} {r['lfp_ms']:8.2f} {r['grad_ms']:8.2f} {r['ratio']:6.2f} "
              f"{r['lfp_first_s']:9.2f} {r['grad_first_s']:10.2f} {mem:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
