"""Train one run: ``python -m experiments.train --config configs/<name>.yaml [--set key=value ...]``.

The run folder ``<out_dir>/<name>/seed<seed>/`` receives the resolved ``config.yaml``, per-epoch
metrics (``metrics.jsonl``), a checkpoint after every epoch (``checkpoint.msgpack``; ``--resume``
continues from it) and ``summary.json``. The last line printed is one JSON object with
``test_accuracy``, ``train_seconds``, ``method`` and ``seed``.

Both methods share data order, initialisation, model and optimiser; they differ in the update
direction: ``method: lfp`` uses ``lfp_jax.lfp_value_and_grad`` (-feedback of the configured reward),
``method: gd`` the gradient of the mean cross-entropy.

``dtype: bfloat16`` runs the model in bfloat16: parameters, BatchNorm statistics and optimiser state stay
float32 (master weights); the model function casts parameters and inputs to bfloat16 on entry and its
logits back to float32 on exit, so the forward pass and the LFP (or gradient) backward pass run in
bfloat16 and the casts' transposes hand optax a float32 direction (LFP: ``|θ| ⊙ c_θ`` with the float32
``θ`` and the bfloat16 ``c_θ``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm import tqdm

import lfp_jax
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, optim


def reward_fn(cfg: dict):
    """The configured reward: a function of ``lfp_jax.rewards`` with its options; ``scale`` multiplies it
    (the reference divides its spike reward by the number of time steps)."""
    spec = dict(cfg["reward"])
    name = spec.pop("name")
    scale = spec.pop("scale", None)
    fn = getattr(lfp_jax.rewards, name, None)
    if fn is None or name not in lfp_jax.rewards.__all__:
        raise ValueError(f"unknown reward {name!r}; choose one of {lfp_jax.rewards.__all__}")
    fn = functools.partial(fn, **spec) if spec else fn
    if scale is None:
        return fn
    return lambda z, y: fn(z, y) * scale


def composite_of(cfg: dict) -> lfp_jax.Composite:
    """The LFP composite of a run: ``lfp_epsilon`` (AttnLRP's rules at softmax and product sites) or
    ``reference_vit`` (the reference's transformer behaviour: the plain gradient there)."""
    name = cfg.get("composite", "lfp_epsilon")
    if name == "lfp_epsilon":
        return lfp_jax.lfp_epsilon(cfg["epsilon"], dropout_rescale=cfg["dropout_rescale"])
    if name == "reference_vit":
        return lfp_jax.composites.reference_vit(cfg["epsilon"])
    raise ValueError(f"composite must be 'lfp_epsilon' or 'reference_vit', got {name!r}")


def cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (other leaves, and ``None``, as they are)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


class Trainer:
    """Everything of one run but the loop: data, model, optimiser, jitted step and evaluation."""

    def __init__(self, cfg: dict, dataset: data_lib.Dataset | None = None):
        self.cfg = cfg
        d = cfg["data"]
        self.data = dataset or data_lib.load(d["name"], root=d.get("root"), seed=cfg["seed"],
                                             **(d.get("options") or {}))
        if d.get("subset"):
            self.data = self.data.subset(int(d["subset"]))
        model_kw = {k: v for k, v in cfg["model"].items() if k != "name"}
        self.model = models.build(cfg["model"]["name"], self.data.num_classes, **model_kw)
        self.spiking = cfg["model"]["name"] in models.SPIKING
        if self.spiking and not cfg["reward"]["name"].startswith("spike_"):
            raise ValueError(f"model {cfg['model']['name']!r} outputs spike trains (T, batch, classes): "
                             f"set reward.name to a spike reward (spike_rate_coded or "
                             f"spike_count_softmax_loss), not {cfg['reward']['name']!r}")
        self.key = jax.random.key(cfg["seed"])
        self.compute_dtype = jnp.dtype(cfg.get("dtype") or "float32")
        variables = self.model.init(self.key, self._inputs(self.data.x_train[:2], self.key), train=False)
        self.params = variables["params"]
        self.batch_stats = variables.get("batch_stats")
        self.steps_per_epoch = max(len(self.data.x_train) // cfg["batch_size"], 1)
        self.optimizer = optim.make(cfg["optimizer"], cfg["epochs"] * self.steps_per_epoch)
        self.opt_state = self.optimizer.init(self.params)
        self.train_step = jax.jit(self._make_step())
        self.predict = jax.jit(self._predict)
        self.eval_key = jax.random.fold_in(self.key, 2**31 - 1)  # rate coding of test batches

    # -- the step -----------------------------------------------------------------------------

    def _inputs(self, x, key):
        """The model's input for images ``x`` (rate-coded frames for ``encoding: rate`` spiking models)."""
        return models.encode_inputs(self.model, x, key)

    def _logits(self, out):
        return models.logits_of(self.cfg["model"]["name"], out)

    def _apply(self, params, batch_stats, x, key, train: bool):
        """The model in the compute dtype: float32 state in, float32 logits and statistics out."""
        if self.compute_dtype != jnp.float32:
            params, batch_stats, x = cast_floats((params, batch_stats, x), self.compute_dtype)
            out, new_stats = self._apply_model(params, batch_stats, x, key, train)
            return out.astype(jnp.float32), cast_floats(new_stats, jnp.float32)
        return self._apply_model(params, batch_stats, x, key, train)

    def _apply_model(self, params, batch_stats, x, key, train: bool):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
            out, updates = self.model.apply(variables, x, train=train, rngs={"dropout": key},
                                            mutable=["batch_stats"])
            return out, updates["batch_stats"]
        return self.model.apply(variables, x, train=train, rngs={"dropout": key}), None

    def _make_step(self):
        cfg = self.cfg
        has_bn = self.batch_stats is not None
        reward = reward_fn(cfg)
        noise = cfg["input_noise"]

        if cfg["method"] == "lfp":
            def fun(params, batch_stats, x, key):
                out, new_stats = self._apply(params, batch_stats, x, key, True)
                return (out, new_stats) if has_bn else out

            direction = lfp_jax.lfp_value_and_grad(
                fun, reward, reward_argnums=(4,), has_aux=has_bn, allow_frozen=True,
                composite=composite_of(cfg))

            def update_direction(params, batch_stats, x, key, y):
                value, neg_feedback = direction(params, batch_stats, x, key, y)
                out, new_stats = value if has_bn else (value, None)
                return out, new_stats, neg_feedback
        else:
            def loss_fn(params, batch_stats, x, key, y):
                out, new_stats = self._apply(params, batch_stats, x, key, True)
                if self.spiking:  # surrogate-gradient descent: cross-entropy of the spikes per step
                    loss = models.ce_rate_loss(out, y)
                else:
                    loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
                return loss, (out, new_stats)

            grad_fn = jax.grad(loss_fn, has_aux=True)

            def update_direction(params, batch_stats, x, key, y):
                grads, (out, new_stats) = grad_fn(params, batch_stats, x, key, y)
                return out, new_stats, grads

        def step(params, batch_stats, opt_state, x, y, key):
            k_noise, k_mask, k_drop = jax.random.split(key, 3)
            if noise["std"]:
                hit = jax.random.uniform(k_mask, (x.shape[0],) + (1,) * (x.ndim - 1)) < noise["prob"]
                x = x + hit * noise["std"] * jax.random.normal(k_noise, x.shape, x.dtype)
            x = self._inputs(x, jax.random.fold_in(key, 3))
            out, new_stats, direction_ = update_direction(params, batch_stats, x, k_drop, y)
            updates, opt_state = self.optimizer.update(direction_, opt_state, params)
            params = optax.apply_updates(params, updates)
            logits = self._logits(out)
            metrics = {
                "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
                "reward": jnp.sum(reward(out, y)) / y.shape[0],  # per sample, summed over outputs
            }
            return params, (new_stats if has_bn else batch_stats), opt_state, metrics

        return step

    def _predict(self, params, batch_stats, x, key):
        x = self._inputs(x, key)
        return self._logits(self._apply(params, batch_stats, x, self.key, False)[0])

    # -- evaluation and state -----------------------------------------------------------------

    def evaluate(self, params=None) -> dict:
        params = self.params if params is None else params
        bs = self.cfg["eval_batch_size"]
        correct, loss = 0, 0.0
        for i in range(0, len(self.data.x_test), bs):
            logits = self.predict(params, self.batch_stats, self.data.x_test[i:i + bs],
                                  jax.random.fold_in(self.eval_key, i))
            y = self.data.y_test[i:i + bs]
            correct += int(jnp.sum(jnp.argmax(logits, -1) == y))
            loss += float(optax.softmax_cross_entropy_with_integer_labels(logits, y).sum())
        n = self.data.y_test.size  # predictions: one per image, or one per character
        out = {"test_accuracy": correct / n, "test_loss": loss / n}
        if self.data.y_test.ndim > 1:  # language modelling: cross-entropy in bits per character
            out["test_bits_per_char"] = out["test_loss"] / np.log(2)
        return out

    def state(self, epoch: int) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state,
                "epoch": epoch}

    def load_state(self, blob: bytes) -> int:
        restored = flax.serialization.from_bytes(self.state(0), blob)
        self.params, self.batch_stats = restored["params"], restored["batch_stats"]
        self.opt_state = restored["opt_state"]
        return int(restored["epoch"])

    def run_epoch(self, epoch: int, progress: bool = True) -> dict:
        cfg = self.cfg
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(len(self.data.x_train))
        epoch_key = jax.random.fold_in(self.key, epoch + 1)
        sums = {"loss": 0.0, "accuracy": 0.0, "reward": 0.0}
        bar = tqdm(range(self.steps_per_epoch), desc=f"{cfg['name']} epoch {epoch + 1}/{cfg['epochs']}",
                   leave=False, disable=not progress, mininterval=0.5)
        for b in bar:
            idx = order[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            self.params, self.batch_stats, self.opt_state, m = self.train_step(
                self.params, self.batch_stats, self.opt_state, self.data.x_train[idx],
                self.data.y_train[idx], jax.random.fold_in(epoch_key, b))
            sums = {k: sums[k] + m[k] for k in sums}
            if progress and (b % 25 == 0 or b == self.steps_per_epoch - 1):
                bar.set_postfix({k: f"{float(v) / (b + 1):.3f}" for k, v in sums.items()})
        return {f"train_{k}": float(v) / self.steps_per_epoch for k, v in sums.items()}


def train(cfg: dict, *, resume: bool = False, progress: bool = True,
          dataset: data_lib.Dataset | None = None) -> dict:
    """Run ``cfg`` to the end (or continue it with ``resume``); returns the summary."""
    out = config_lib.run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "checkpoint.msgpack")
    trainer = Trainer(cfg, dataset)
    start, elapsed = 0, 0.0
    if resume and os.path.exists(ckpt):
        with open(ckpt, "rb") as f:
            start = trainer.load_state(f.read())
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows if r["epoch"] <= start]
            elapsed = rows[-1]["train_seconds"] if rows else 0.0
            with open(os.path.join(out, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        open(os.path.join(out, "metrics.jsonl"), "w").close()
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    row = {}
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        row = trainer.run_epoch(epoch, progress)
        jax.block_until_ready(trainer.params)
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch + 1, **row, **trainer.evaluate(), "train_seconds": round(elapsed, 3)}
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(ckpt, "wb") as f:
            f.write(flax.serialization.to_bytes(trainer.state(epoch + 1)))
        if progress:
            tqdm.write(f"{cfg['name']} seed {cfg['seed']} epoch {epoch + 1}: "
                       f"train acc {row['train_accuracy']:.4f}, test acc {row['test_accuracy']:.4f}")
    if not row:  # resumed a finished run
        row = {"epoch": cfg["epochs"], **trainer.evaluate(), "train_seconds": round(elapsed, 3)}
    summary = {
        "name": cfg["name"], "method": cfg["method"], "seed": cfg["seed"],
        "dataset": cfg["data"]["name"], "model": cfg["model"]["name"],
        "activation": cfg["model"].get("activation", "relu"), "epochs": cfg["epochs"],
        "test_accuracy": row["test_accuracy"], "test_loss": row["test_loss"],
        "train_accuracy": row.get("train_accuracy"), "train_seconds": row["train_seconds"],
        "run_dir": out,
    }
    if "test_bits_per_char" in row:
        summary["test_bits_per_char"] = row["test_bits_per_char"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Train one LFP or gradient-descent run.")
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optimizer.lr=0.05 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    try:
        summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    except data_lib.DatasetNotFound as e:
        raise SystemExit(f"dataset not available: {e}") from None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
