"""LRP explanations on a small CNN against the plain input gradient, on CPU (and zennit's, if measured).

    python -m benchmarks.lrp_cpu [--batch 64] [--repeats 30] [--min-seconds 10]
        [--pools reduce_window,reshape] [--json benchmarks/results/lrp_cpu.json]
        [--zennit-json benchmarks/results/lrp_zennit_cpu.json]

The CNN (plain JAX, NHWC/HWIO, float32, biases): conv 1→16 5x5, ReLU, 2x2 max pool, conv 16→32 5x5,
ReLU, 2x2 max pool, flatten, Dense 512→120, ReLU, Dense 120→10; PyTorch-style uniform initialisation
(key 0), inputs uniform in [0, 1) of shape 28x28x1 (key 1), labels uniform over 10 classes (key 2).
The max pool is written two ways (``--pools``): ``reduce_window`` (``lax.reduce_window``, what
``flax.linen.max_pool`` calls) and ``reshape`` (reshape + ``max`` over the window axes, same values).

Per pooling variant, each jitted and timed *alternately* in one process (all methods of all variants in
one loop, ``--repeats`` rounds and at least ``--min-seconds``), medians:

* ``forward``: the logits (context);
* ``grad``: ``jax.grad`` of the target logits' sum with respect to the input (one forward, one backward);
* ``value_and_grad``: the same with ``jax.value_and_grad`` (also returns the value, as ``lrp`` does);
* ``lrp ε``: ``lfp_jax.lrp(model, composites.attn_lrp(), argnums=1)(params, x, target=labels)`` --
  the default composite: ε on every linear layer, identity on ReLU, winner takes all at max pools;
* ``lrp EpsilonPlus``: ``composites.epsilon_plus()``, zennit's preset -- z⁺ on convolutions, ε on
  dense layers.

Both ``lrp`` functions return ``(logits, relevance)``; the issue's target is ``lrp ε ≤ 1.1 × grad``.
The first call (trace + lower + compile + one run) of each method is measured twice on fresh
functions, in the order of the methods and then reversed, keeping the faster. For each compiled
executable, the number of convolutions, fusions and ``reduce-window`` / ``select-and-scatter`` ops of
its optimised HLO and XLA's flop estimate are kept too: they show where the extra time of a rule goes.

With ``tools/zennit_reference/lrp_time.py``'s JSON present (run it with the PyTorch + zennit
interpreter first), one combined table shows both frameworks, each method's ratio to its own
framework's input gradient.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lfp_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLS = ("reduce_window", "reshape")
METHODS = ("forward", "grad", "value_and_grad", "lrp_epsilon", "lrp_epsilon_plus")
LABELS = {"forward": "forward (context)", "grad": "jax.grad (input)",
          "value_and_grad": "jax.value_and_grad (input)", "lrp_epsilon": "lfp_jax.lrp, ε (attn_lrp)",
          "lrp_epsilon_plus": "lfp_jax.lrp, EpsilonPlus"}
ZENNIT_LABELS = {"forward": "forward (context)", "grad": "torch autograd (input)",
                 "zennit_epsilon": "zennit Gradient, ε everywhere",
                 "zennit_epsilon_plus": "zennit Gradient, EpsilonPlus"}


def model_fn(pool: str) -> Callable:
    """The CNN ``f(params, x) -> logits`` with its max pool written as ``pool``."""

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def max_pool(x):
        if pool == "reshape":
            b, h, w, c = x.shape
            return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def model(p, x):
        x = max_pool(jax.nn.relu(conv(x, p["conv1"]["w"]) + p["conv1"]["b"]))
        x = max_pool(jax.nn.relu(conv(x, p["conv2"]["w"]) + p["conv2"]["b"]))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ p["dense1"]["w"] + p["dense1"]["b"])
        return x @ p["dense2"]["w"] + p["dense2"]["b"]

    return model


def init(batch: int):
    """Parameters (uniform ±1/√fan_in, PyTorch's default), inputs in [0, 1) and labels."""
    shapes = {"conv1": ((5, 5, 1, 16), 25), "conv2": ((5, 5, 16, 32), 400), "dense1": ((512, 120), 512),
              "dense2": ((120, 10), 120)}
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(shapes)))
    params = {}
    for name, (shape, fan_in) in shapes.items():
        bound = 1 / np.sqrt(fan_in)
        params[name] = {"w": jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound),
                        "b": jax.random.uniform(next(keys), shape[-1:], jnp.float32, -bound, bound)}
    x = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    return params, x, y


def methods(pool: str) -> dict[str, Callable]:
    """Fresh (not yet traced) jitted functions ``(params, x, labels) -> ...`` of every method."""
    model = model_fn(pool)

    def target_logits(p, x, y):
        z = model(p, x)
        return jnp.sum(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) * z)

    eps = lfp_jax.composites.attn_lrp()
    eps_plus = lfp_jax.composites.epsilon_plus()
    return {
        "forward": jax.jit(lambda p, x, y: model(p, x)),
        "grad": jax.jit(jax.grad(target_logits, argnums=1)),
        "value_and_grad": jax.jit(jax.value_and_grad(target_logits, argnums=1)),
        "lrp_epsilon": jax.jit(lambda p, x, y: lfp_jax.lrp(model, eps, argnums=1)(p, x, target=y)),
        "lrp_epsilon_plus": jax.jit(lambda p, x, y: lfp_jax.lrp(model, eps_plus, argnums=1)(p, x, target=y)),
    }


def hlo_summary(compiled) -> dict:
    """Op counts of the optimised HLO and XLA's flop estimate."""
    text = compiled.as_text()
    out = {op: len(re.findall(rf"\s{op}\(", text))
           for op in ("convolution", "fusion", "reduce-window", "select-and-scatter")}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        out["flops"] = float(cost.get("flops", float("nan")))
    except Exception:  # pragma: no cover - backend dependent
        out["flops"] = None
    return out


def first_calls(pools: list[str], args) -> tuple[dict, dict]:
    """First-call seconds (min of two, order forward..lrp then reversed) and the compiled executables."""
    order = [(pool, m) for pool in pools for m in METHODS]
    first: dict[tuple[str, str], float] = {}
    compiled = {}
    for sequence in (order, order[::-1]):
        for pool, m in sequence:
            fn = methods(pool)[m]  # fresh functions: nothing cached
            t = time.perf_counter()
            c = fn.lower(*args).compile()
            jax.block_until_ready(c(*args))
            seconds = time.perf_counter() - t
            first[pool, m] = min(seconds, first.get((pool, m), float("inf")))
            compiled[pool, m] = c
    return first, compiled


def bench(batch: int, repeats: int, min_seconds: float, pools: list[str]) -> list[dict]:
    params, x, y = init(batch)
    args = (params, x, y)
    first, compiled = first_calls(pools, args)
    keys = list(compiled)
    for k in keys:  # warm up
        jax.block_until_ready(compiled[k](*args))
    times: dict[tuple[str, str], list[float]] = {k: [] for k in keys}
    start = time.perf_counter()
    i = 0
    while i < 5 or i < repeats or time.perf_counter() - start < min_seconds:
        i += 1
        for k in keys:
            t = time.perf_counter()
            jax.block_until_ready(compiled[k](*args))
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = []
    for pool, m in keys:
        rows.append({
            "framework": "jax", "pool": pool, "method": m, "label": LABELS[m], "batch": batch,
            "ms": 1e3 * med[pool, m], "ratio_to_grad": med[pool, m] / med[pool, "grad"],
            "ratio_to_value_and_grad": med[pool, m] / med[pool, "value_and_grad"],
            "first_s": first[pool, m], "repeats": len(times[pool, m]),
            "q25_ms": 1e3 * float(np.quantile(times[pool, m], 0.25)),
            "q75_ms": 1e3 * float(np.quantile(times[pool, m], 0.75)),
            "hlo": hlo_summary(compiled[pool, m])})
    return rows


def check_relevance(batch: int) -> dict:
    """Sanity: under the ε composite the input relevance sums to about the target logit (ReLU net with
    biases: the biases absorb the rest), and both pooling variants give the same relevance."""
    params, x, y = init(batch)
    out = {}
    for pool in POOLS:
        f = methods(pool)
        logits, relevance = f["lrp_epsilon"](params, x, y)
        out[pool] = (np.asarray(logits), np.asarray(relevance))
    target = np.take_along_axis(out["reduce_window"][0], np.asarray(y)[:, None], 1)[:, 0]
    total = out["reduce_window"][1].reshape(batch, -1).sum(1)
    return {"pool_variants_agree": bool(np.allclose(out["reduce_window"][1], out["reshape"][1],
                                                    rtol=1e-5, atol=1e-7)),
            "mean_relevance_sum_over_target_logit": float(np.mean(total / target))}


def table(rows: list[dict], zennit: dict | None) -> str:
    """One Markdown table: method, median ms per batch, ratio to its framework's input gradient."""
    head = "| framework | pool | method | batch | median ms | / own grad | first call s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| JAX {jax.__version__} | {r['pool']} | {r['label']} | {r['batch']} | {r['ms']:.2f} | "
                     f"{r['ratio_to_grad']:.2f} | {r['first_s']:.2f} |")
    if zennit:
        env = zennit.get("environment", {})
        name = f"torch {env.get('torch', '?')} + zennit {env.get('zennit', '?')}"
        for r in zennit["rows"]:
            lines.append(f"| {name} | MaxPool2d | {ZENNIT_LABELS.get(r['method'], r['method'])} | "
                         f"{r['batch']} | {r['ms']:.2f} | {r['ratio_to_grad']:.2f} | "
                         f"{r['first_ms'] / 1e3:.2f} |")
    return "\n".join(lines)


def load_zennit(path: str | None, batch: int) -> dict | None:
    if not path:
        return None
    if not os.path.exists(path):
        print(f"(no zennit timings at {path}: run `/path/to/torch-venv/bin/python "
              f"tools/zennit_reference/lrp_time.py --batch {batch}` first for the zennit rows)")
        return None
    with open(path) as f:
        data = json.load(f)
    batches = {r.get("batch") for r in data.get("rows", [])}
    if batches != {batch}:
        print(f"(zennit timings at {path} are for batch {sorted(batches)}, not {batch}: left out)")
        return None
    return data


def _git_state() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lfp_jax"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": commit, "lfp_jax_modified": bool(dirty), "lfp_jax_path": lfp_jax.__file__}
    except Exception:  # not run from a git checkout
        return {"commit": None, "lfp_jax_path": lfp_jax.__file__}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per method (at least)")
    parser.add_argument("--min-seconds", type=float, default=10.0, help="time for at least this long")
    parser.add_argument("--pools", default=",".join(POOLS), help=f"comma-separated, from {POOLS}")
    parser.add_argument("--json", default=None, help="write the rows (and the environment) here")
    parser.add_argument("--zennit-json", default=os.path.join(ROOT, "benchmarks", "results",
                                                              "lrp_zennit_cpu.json"),
                        help="timings written by tools/zennit_reference/lrp_time.py ('' for none)")
    args = parser.parse_args(argv)
    pools = args.pools.split(",")
    if set(pools) - set(POOLS):
        parser.error(f"unknown pool(s) {sorted(set(pools) - set(POOLS))}; choose from {POOLS}")
    load = os.getloadavg()
    rows = bench(args.batch, args.repeats, args.min_seconds, pools)
    zennit = load_zennit(args.zennit_json, args.batch)
    print(table(rows, zennit))
    for r in rows:
        if r["method"] == "lrp_epsilon":
            verdict = "met" if r["ratio_to_grad"] <= 1.1 else "NOT met"
            print(f"{r['pool']}: lrp ε / jax.grad = {r['ratio_to_grad']:.2f} "
                  f"(issue 11 target ≤ 1.1: {verdict})")
    print("\n| pool | method | convolutions | fusions | reduce-window | select-and-scatter | GFLOP |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["hlo"]
        flops = f"{h['flops'] / 1e9:.3f}" if h.get("flops") else "n/a"
        print(f"| {r['pool']} | {r['label']} | {h['convolution']} | {h['fusion']} | {h['reduce-window']} | "
              f"{h['select-and-scatter']} | {flops} |")
    check = check_relevance(args.batch)
    print(f"\nchecks: {check}")
    if args.json:
        env = {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
               "numpy": np.__version__, "backend": jax.default_backend(),
               "device": jax.devices()[0].device_kind,
               "cpu_count": os.cpu_count(), "python": platform.python_version(),
               "date": datetime.date.today().isoformat(), "loadavg_before": load,
               "loadavg_after": os.getloadavg(), **_git_state()}
        with open(args.json, "w") as f:
            composites = {"lrp_epsilon": lfp_jax.composites.attn_lrp().name,
                          "lrp_epsilon_plus": lfp_jax.composites.epsilon_plus().name}
            json.dump({"environment": env, "composites": composites, "checks": check, "rows": rows,
                       "zennit": zennit}, f, indent=1)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
