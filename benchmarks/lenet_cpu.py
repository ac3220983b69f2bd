"""Why a LeNet step is slow on CPU, and what helps: layouts, pooling lowering, XLA flags.

    python -m benchmarks.lenet_cpu [--batch 128] [--steps 30] [--json out.json]

The LeNet of the benchmarks (conv 5x5x16, ReLU, 2x2 max pool, conv 5x5x16, ReLU, 2x2 max pool,
Dense 120, 84, 10) written in plain JAX in several variants; for each, the median time of a jitted
forward pass, of a gradient step (``jax.grad`` of the mean cross-entropy + SGD) and of an LFP step
(``lfp_jax.lfp_grad`` with the softmax-loss reward + SGD), measured alternately. Every variant runs in
its own process so that XLA flags can differ:

==================  ==========================================================================
variant             what changes
==================  ==========================================================================
``nhwc``            Flax's layout (NHWC/HWIO) and ``lax.reduce_window`` max pooling (baseline)
``nchw``            PyTorch's layout (NCHW/OIHW)
``tiled_pool``      2x2 pooling as reshape + ``max`` over the window axes (same values)
``im2col``          convolution as ``conv_general_dilated_patches`` + matrix product
``+flag``           the baseline under an XLA CPU flag (``XLA_FLAGS``)
==================  ==========================================================================

The LFP step of every variant is what ``lfp_jax`` computes for that program; since the engine evaluates
non-overlapping max pooling as reshape + reduce on CPU (``rules.WinnerTakeAll``), its LFP step does
not pay for ``reduce_window``'s VJP whichever way the model wrote its pooling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("nhwc", "nchw", "tiled_pool", "im2col")
FLAGS = ("--xla_cpu_multi_thread_eigen=false", "--xla_cpu_enable_fast_math=true")


def _run_variant(variant: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax import lax

    import lfp_jax

    nchw = variant == "nchw"
    spec = ("NCHW", "OIHW", "NCHW") if nchw else ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        if variant == "im2col":
            kh, kw, cin, cout = w.shape
            patches = lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), "VALID", dimension_numbers=spec)
            return patches @ jnp.transpose(w, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=spec)

    def pool(x):
        if variant == "tiled_pool":
            b, h, w, c = x.shape
            return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        window = (1, 1, 2, 2) if nchw else (1, 2, 2, 1)
        return lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")

    def model(p, x):
        bias = (lambda b: b[:, None, None]) if nchw else (lambda b: b)
        x = pool(jax.nn.relu(conv(x, p["c1"]) + bias(p["b1"])))
        x = pool(jax.nn.relu(conv(x, p["c2"]) + bias(p["b2"])))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ p["d1"] + p["e1"])
        x = jax.nn.relu(x @ p["d2"] + p["e2"])
        return x @ p["d3"] + p["e3"]

    keys = iter(jax.random.split(jax.random.key(0), 16))

    def uniform(shape, fan_in):
        bound = 1 / np.sqrt(fan_in)
        return jax.random.uniform(next(keys), shape, jnp.float32, -bound, bound)

    conv_shape = (lambda cin, cout: (cout, cin, 5, 5)) if nchw else (lambda cin, cout: (5, 5, cin, cout))
    p = {"c1": uniform(conv_shape(1, 16), 25), "b1": uniform((16,), 25),
         "c2": uniform(conv_shape(16, 16), 400), "b2": uniform((16,), 400),
         "d1": uniform((256, 120), 256), "e1": uniform((120,), 256),
         "d2": uniform((120, 84), 120), "e2": uniform((84,), 120),
         "d3": uniform((84, 10), 84), "e3": uniform((10,), 84)}
    x = jax.random.normal(next(keys), (batch, 1, 28, 28) if nchw else (batch, 28, 28, 1))
    y = jax.random.randint(next(keys), (batch,), 0, 10)

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(p, x), y).mean()

    lfp = lfp_jax.lfp_grad(model, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)
    fns = {"forward": jax.jit(model), "grad": jax.jit(lambda p, x, y: sgd(p, jax.grad(loss)(p, x, y))),
           "lfp": jax.jit(lambda p, x, y: sgd(p, lfp(p, x, y)))}
    args = {"forward": (p, x), "grad": (p, x, y), "lfp": (p, x, y)}
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - t)
    return {"variant": variant, "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": batch,
            **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in times.items()}, "jax": jax.__version__}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant, in-process
    args = parser.parse_args(argv)
    if args.variant:
        row = _run_variant(args.variant, args.batch, args.steps)
        print(json.dumps(row))
        return [row]
    runs = [(v, "") for v in VARIANTS] + [("nhwc", f) for f in FLAGS]
    rows = []
    for variant, flags in runs:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        done = subprocess.run([sys.executable, "-m", "benchmarks.lenet_cpu", "--variant", variant, "--batch",
                               str(args.batch), "--steps", str(args.steps)], env=env, capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if done.returncode != 0:
            raise SystemExit(f"variant {variant} {flags} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant + (' ' + flags if flags else ''):<48} forward {r['forward_ms']:6.2f} ms  "
              f"grad {r['grad_ms']:6.2f} ms  LFP {r['lfp_ms']:6.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
