"""End-to-end demo: train the same MLP with LFP and with gradient descent and compare.

Runs offline on scikit-learn's handwritten digits (1797 8x8 images, shipped with scikit-learn)::

    python -m experiments.demo [--epochs 30] [--seed 0]

Both methods use the same model, initialisation, batches and optimiser (SGD with momentum 0.9 and
global-norm clipping at 3, as in the reference's minimal example); only the update direction
differs: LFP follows ``lfp_jax.lfp_grad`` (-feedback, a batch *sum* scaled by |θ|), gradient descent
``jax.grad`` of the mean cross-entropy. Learning rates are per method (LFP feedback has a different
scale), as in the paper.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lfp_jax
from lfp_jax import rewards


class MLP(nn.Module):
    hidden: tuple[int, ...] = (64, 32)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


def load_digits(seed: int):
    from sklearn.datasets import load_digits as _load

    data = _load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def make_step(model, method: str, optimizer):
    apply = model.apply

    def logits_fn(params, x):
        return apply({"params": params}, x)

    if method == "lfp":
        direction = lfp_jax.lfp_value_and_grad(logits_fn, rewards.softmax_loss, reward_argnums=(2,))
    else:
        def loss(params, x, y):
            z = logits_fn(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(z, y).mean(), z

        vg = jax.value_and_grad(loss, has_aux=True)

        def direction(params, x, y):
            (_, z), grads = vg(params, x, y)
            return z, grads

    @jax.jit
    def step(params, opt_state, x, y):
        logits, grads = direction(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), opt_state, acc

    return step


def train(method: str, epochs: int, seed: int, lr: float, batch: int = 64) -> dict:
    (xtr, ytr), (xte, yte) = load_digits(seed)
    model = MLP()
    key = jax.random.key(seed)
    params = model.init(key, xtr[:1])["params"]
    params = lfp_jax.nn.torch_init(jax.random.fold_in(key, 1), params)
    lfp_jax.check_params(params)
    optimizer = optax.chain(optax.clip_by_global_norm(3.0), optax.sgd(lr, momentum=0.9))
    opt_state = optimizer.init(params)
    step = make_step(model, method, optimizer)
    evaluate = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    history = []
    bar = tqdm(range(epochs), desc=f"{method:>3}", leave=False)
    for _ in bar:
        order = rng.permutation(len(xtr))
        accs = []
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            params, opt_state, acc = step(params, opt_state, xtr[idx], ytr[idx])
            accs.append(float(acc))
        test_acc = float(np.mean(np.asarray(evaluate(params, xte)) == yte))
        history.append(test_acc)
        bar.set_postfix(train_acc=f"{np.mean(accs):.3f}", test_acc=f"{test_acc:.3f}")
    return {"method": method, "test_accuracy": history[-1], "history": history, "lr": lr,
            "train_seconds": round(time.perf_counter() - start, 2), "seed": seed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-lfp", type=float, default=0.01)
    parser.add_argument("--lr-gd", type=float, default=0.05)
    args = parser.parse_args(argv)
    results = [train("lfp", args.epochs, args.seed, args.lr_lfp),
               train("gd", args.epochs, args.seed, args.lr_gd)]
    print(f"\ndigits MLP 64-64-32-10, {args.epochs} epochs, seed {args.seed}")
    for r in results:
        print(f"  {r['method']:>3}: test accuracy {r['test_accuracy']:.4f}  ({r['train_seconds']} s)")
    print(json.dumps({r["method"]: {k: r[k] for k in ("test_accuracy", "train_seconds", "lr", "seed")}
                      for r in results}))


if __name__ == "__main__":
    main()
