"""LFP at scale: a ~100M-parameter decoder step, and the first call of a 48-layer decoder.

    python -m benchmarks.scale [--part step,first] [--steps 3] [--json out.json]

``step``: the Llama-style decoder of :mod:`benchmarks.language_models` at width 768, 12 layers,
12 heads (4 key/value heads), MLP width 2048, vocabulary 16384 (101M parameters), sequence 256,
batch 4, float32: one jitted LFP training step (``lfp_value_and_grad`` + SGD with momentum) and one
gradient step of the mean cross-entropy with the same optimiser, timed alternately (medians of
``--steps``), with the memory XLA's analysis gives each compiled step (arguments + outputs +
temporaries: the peak the step needs) and this process's peak resident memory after each compile.

``first``: the benchmark's Llama at its own size (width 256, 8 heads, sequence 128, batch 16) with 48
layers: the first call of each step (trace and lower, compile, one run) on fresh functions, LFP and
gradient alternately, twice each (the faster one kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lfp_jax
from benchmarks import language_models
from benchmarks.step_time import _optimiser_steps, _peak_bytes, environment

LARGE = {"vocab": 16384, "width": 768, "depth": 12, "heads": 12, "hidden": 2048}
LARGE_SEQ, LARGE_BATCH = 256, 4
DEEP = {"depth": 48}


def _steps(size: dict, seq: int, batch: int):
    model = language_models.build("llama", jnp.float32, **size)
    ids = language_models.batch(jax.random.key(2), size.get("vocab", language_models.SIZE["vocab"]),
                                batch, seq + 1)
    x, y = ids[:, :-1], ids[:, 1:]
    params = language_models.init(model, jax.random.key(0), x)
    fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    opt = optax.sgd(0.01, momentum=0.9)
    lfp = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                     allow_frozen=True)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(fun(p, x), y).mean()

    steps = _optimiser_steps(opt, lambda p, x, y: lfp(p, x, y)[1], jax.grad(loss))
    return (params, opt.init(params), x, y) + steps


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _first_call(step, *args):
    """Compile and run ``step`` once: ``(compiled, total s, trace-and-lower s, XLA compile s)``."""
    t = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - t, t1 - t, t2 - t1


def large_step(steps: int) -> dict:
    """One ~100M decoder's LFP and gradient step: times, compile times, memory."""
    p, s, x, y, lfp_step, grad_step = _steps(LARGE, LARGE_SEQ, LARGE_BATCH)
    n_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(p))
    row: dict = {"parameters": int(n_params), "seq": LARGE_SEQ, "batch": LARGE_BATCH, **LARGE}
    compiled = {}
    for label, step in (("grad", grad_step), ("lfp", lfp_step)):
        compiled[label], total, trace, comp = _first_call(step, p, s, x, y)
        row.update({f"{label}_first_s": total, f"{label}_trace_s": trace, f"{label}_compile_s": comp})
        row[f"{label}_bytes"] = _peak_bytes(compiled[label])
        row[f"{label}_peak_rss_mb_after"] = _peak_rss_mb()
        print(f"{label}: first call {row[f'{label}_first_s']:.1f} s, "
              f"memory {row[f'{label}_bytes'] / 2**20:.0f} MiB", flush=True)
    times: dict[str, list[float]] = {"lfp": [], "grad": []}
    for _ in range(steps):
        for label in ("lfp", "grad"):
            t = time.perf_counter()
            jax.block_until_ready(compiled[label](p, s, x, y))
            times[label].append(time.perf_counter() - t)
    row.update({f"{k}_s": float(np.median(v)) for k, v in times.items()})
    row.update({f"{k}_all_s": v for k, v in times.items()})
    row["ratio"] = row["lfp_s"] / row["grad_s"]
    row["memory_ratio"] = row["lfp_bytes"] / row["grad_bytes"]
    row["first_ratio"] = row["lfp_first_s"] / row["grad_first_s"]
    return row


def deep_first_call() -> dict:
    """The first call of a 48-layer decoder's LFP and gradient step (trace, lower, compile, run)."""
    row: dict = {"depth": DEEP["depth"], "width": language_models.SIZE["width"],
                 "seq": language_models.SIZE["seq"], "batch": language_models.SIZE["batch"]}
    first: dict[str, list[tuple[float, float, float]]] = {"lfp": [], "grad": []}
    for label in ("lfp", "grad", "grad", "lfp"):
        p, s, x, y, lfp_step, grad_step = _steps(DEEP, language_models.SIZE["seq"],
                                                 language_models.SIZE["batch"])
        step = lfp_step if label == "lfp" else grad_step
        c, *seconds = _first_call(step, p, s, x, y)
        first[label].append(tuple(seconds))
        row[f"{label}_bytes"] = _peak_bytes(c)
        print(f"{label}: first call {first[label][-1][0]:.1f} s", flush=True)
    for label, runs in first.items():
        total, trace, comp = min(runs)
        row.update({f"{label}_first_s": total, f"{label}_trace_s": trace, f"{label}_compile_s": comp})
    row["first_ratio"] = row["lfp_first_s"] / row["grad_first_s"]
    row["memory_ratio"] = row["lfp_bytes"] / row["grad_bytes"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="step,first", help="step (the ~100M decoder), first (48 layers)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out: dict = {"environment": environment()}
    parts = args.part.split(",")
    if "step" in parts:
        r = out["large"] = large_step(args.steps)
        print(f"~100M decoder ({r['parameters'] / 1e6:.1f}M parameters, batch {r['batch']}, sequence "
              f"{r['seq']}): LFP {r['lfp_s']:.2f} s, grad {r['grad_s']:.2f} s, ratio {r['ratio']:.3f}; "
              f"memory {r['lfp_bytes'] / 2**20:.0f} / {r['grad_bytes'] / 2**20:.0f} MiB "
              f"({r['memory_ratio']:.2f}); first call {r['lfp_first_s']:.1f} / {r['grad_first_s']:.1f} s")
    if "first" in parts:
        r = out["deep"] = deep_first_call()
        print(f"48-layer decoder first call: LFP {r['lfp_first_s']:.1f} s (trace {r['lfp_trace_s']:.1f}, "
              f"compile {r['lfp_compile_s']:.1f}), grad {r['grad_first_s']:.1f} s (trace "
              f"{r['grad_trace_s']:.1f}, compile {r['grad_compile_s']:.1f}): {r['first_ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
