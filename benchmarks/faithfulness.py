"""Perturbation curves per second: ``lfp_jax.metrics`` (one jitted program per batch) against a NumPy
loop over steps.

    python -m benchmarks.faithfulness [--models lenet,vit] [--batch 8,64] [--steps 28] [--repeats 5]
        [--json benchmarks/results/faithfulness_cpu.json]

The loop is how PyTorch attribution toolboxes compute a pixel-flipping curve. They sort each example's
relevance on the host. Then, for each step and each of the two orders (most and least relevant
first), they write the replacement into a NumPy copy of the batch and call the model on it, and they
read the scores back. Here the model call is the same jitted forward pass that ``metrics`` uses, so
the loop pays only for the host round trips and the steps run one after another.

``metrics.perturbation_curves`` builds every perturbed batch on the device and evaluates them
``chunk`` at a time in one jitted program. Both give the same curves (``tests/test_metrics.py``
checks 1e-6). Models are the experiments' LeNet and ViT, randomly initialised. MNIST-shaped inputs are
uniform in [-1, 1], one group per pixel, zero replacement, with ``--steps`` steps per curve. Each
method is timed alternately with the other, ``--repeats`` rounds after one warm-up call, and the
medians are compared. A "curve" is one example's pair (MoRF and LeRF).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_time import environment
from experiments import models
from lfp_jax import metrics


def numpy_curves(score, x, relevance, steps: int, group=None, value=0.0):
    """The perturbation curves by a loop over steps on the host (NumPy), ``score`` called per step on
    the whole perturbed batch: ``(fractions, morf, lerf)`` as NumPy arrays."""
    x = np.asarray(x)
    b = x.shape[0]
    group = metrics._group_shape(x.shape, group)
    grid = tuple(n // g for n, g in zip(x.shape[1:], group))
    rel = np.asarray(metrics._group_relevance(jnp.asarray(relevance), x.shape, group), np.float64)
    n_groups = rel.shape[1]
    counts = np.rint(np.arange(steps + 1) * n_groups / steps).astype(int)
    value = np.broadcast_to(np.asarray(value, x.dtype), x.shape)
    curves = []
    for order in (np.argsort(-rel, axis=1, kind="stable"), np.argsort(rel, axis=1, kind="stable")):
        scores = []
        for n in counts:
            mask = np.zeros((b, n_groups), bool)
            np.put_along_axis(mask, order[:, :n], True, axis=1)
            m = mask.reshape((b,) + tuple(v for k in grid for v in (k, 1)))
            blocks = (b,) + tuple(v for pair in zip(grid, group) for v in pair)
            m = np.broadcast_to(m, blocks).reshape(x.shape)
            scores.append(np.asarray(score(np.where(m, value, x))))
        curves.append(np.stack(scores, axis=1))
    return np.arange(steps + 1) / steps, curves[0], curves[1]


def _model(name: str, batch: int):
    vit = {"patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_ratio": 2, "pool": "cls"}
    kwargs = vit if name == "vit" else {}
    model = models.build(name, 10, **kwargs)
    x = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1), minval=-1, maxval=1)
    params = model.init(jax.random.key(0), x)["params"]
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return apply, params, x, labels


def bench(name: str, batch: int, steps: int, repeats: int) -> dict:
    apply, params, x, labels = _model(name, batch)
    rows = jnp.arange(batch)
    score = jax.jit(lambda x: apply(params, x)[rows, labels])
    relevance = jax.random.normal(jax.random.key(3), x.shape)

    def batched():
        c = metrics.perturbation_curves(score, x, relevance, steps=steps, group=(1, 1, 1))
        return jax.block_until_ready(c)

    def loop():
        return numpy_curves(score, x, relevance, steps, group=(1, 1, 1))

    first = {}
    for label, f in (("batched", batched), ("loop", loop)):
        t = time.perf_counter()
        f()
        first[label] = time.perf_counter() - t
    times = {"batched": [], "loop": []}
    for _ in range(repeats):
        for label, f in (("batched", batched), ("loop", loop)):
            t = time.perf_counter()
            f()
            times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"model": name, "batch": batch, "steps": steps, "forward_passes": 2 * (steps + 1),
            "batched_s": med["batched"], "loop_s": med["loop"], "first_call_batched_s": first["batched"],
            "batched_curves_per_s": batch / med["batched"], "loop_curves_per_s": batch / med["loop"],
            "speedup": med["loop"] / med["batched"],
            "spread_batched_s": [float(min(times["batched"])), float(max(times["batched"]))],
            "spread_loop_s": [float(min(times["loop"])), float(max(times["loop"]))]}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet,vit")
    parser.add_argument("--batch", default="8,64", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            rows.append(bench(name, batch, args.steps, args.repeats))
            r = rows[-1]
            print(f"{name}, batch {batch}: batched {r['batched_s']:.3f} s ({r['batched_curves_per_s']:.1f} "
                  f"curves/s), loop {r['loop_s']:.3f} s ({r['loop_curves_per_s']:.1f} curves/s), "
                  f"x{r['speedup']:.2f}", flush=True)
    print("\n| model | batch | steps | metrics (one program) curves/s | NumPy loop curves/s | speed-up |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['batched_curves_per_s']:.1f} | "
              f"{r['loop_curves_per_s']:.1f} | {r['speedup']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
