"""The faithfulness study: ``python -m experiments.study faithfulness``.

Is LRP a better explanation than the gradient on the models trained here? For each model, and for each
of ``--seeds`` training seeds, a pixel-flipping or token-deletion test is run on held-out examples, with
:func:`lfp_jax.metrics.faithfulness`. Every attribution gets the same examples, the same score and
the same perturbations. The attributions are:

* the LRP presets: AttnLRP (``attn_lrp``: ε everywhere, AttnLRP's rules at softmax and products),
  and, for the LeNet, zennit's ``epsilon_plus`` (z⁺ at convolutions) and ``epsilon_alpha2_beta1``;
* the baselines of :mod:`lfp_jax.metrics`: ε-LRP with the plain gradient at softmax and products
  (``epsilon``), gradient × input, the gradient, and random.

The models are trained by gradient descent with the configs of the other studies, but shorter. On 2
CPU cores that keeps a run under 10 minutes, so three seeds fit:

* LeNet on MNIST and on Fashion-MNIST, 3 epochs;
* the ViT on both, 2 epochs;
* the character decoder on the fortunes text, 1 epoch.

Images are perturbed pixel by pixel (28 steps of 28 pixels). A removed pixel takes the image's mean
value, so a removed stroke disappears into the background. The score is the true class's logit.
Text is held-out windows of 64 characters. The explained score is the logit of the true next
character at the last position. Characters are deleted in 16 steps of 4: a deleted character's
one-hot input becomes all zero, so the model sees no character there.

The areas are in logit units, averaged over ``--examples`` examples per seed. The table gives their
mean and spread over seeds: ``ΔA = A_LeRF − A_MoRF`` (larger is more faithful), and ``A_MoRF``
(smaller is more faithful).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lfp_jax  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments.explain import composite, model_fn, pick_samples  # noqa: E402
from experiments.models import encode_inputs  # noqa: E402
from experiments.train import Trainer  # noqa: E402
from lfp_jax import metrics  # noqa: E402

# (config stem, epochs, LRP presets, perturbation)
MODELS = (
    ("mnist_lenet_gd", 3, ("attn_lrp", "epsilon_plus", "epsilon_alpha2_beta1"), "pixels"),
    ("fashion_mnist_lenet_gd", 3, ("attn_lrp", "epsilon_plus", "epsilon_alpha2_beta1"), "pixels"),
    ("vit_mnist_gd", 2, ("attn_lrp",), "pixels"),
    ("vit_fashion_mnist_gd", 2, ("attn_lrp",), "pixels"),
    ("gpt_text_gd", 1, ("attn_lrp",), "tokens"),
)
LABELS = {"attn_lrp": "AttnLRP", "epsilon_plus": "LRP ε+ (z⁺ conv)", "epsilon_alpha2_beta1": "LRP α2β1",
          "epsilon": "ε-LRP, gradient at softmax/products", "gradient_x_input": "gradient × input",
          "gradient": "gradient", "random": "random"}
TITLES = {"mnist_lenet_gd": "LeNet, MNIST", "fashion_mnist_lenet_gd": "LeNet, Fashion-MNIST",
          "vit_mnist_gd": "ViT, MNIST", "vit_fashion_mnist_gd": "ViT, Fashion-MNIST",
          "gpt_text_gd": "character decoder, fortunes (token deletion)"}


def _trainer(runner, stem: str, epochs: int, seed: int, datasets: dict) -> Trainer | None:
    cfg = runner.cfg(f"{stem}.yaml", {"epochs": epochs, "name": f"faith_{stem}"}, seed)
    if runner.run(cfg) is None:                 # trains the run if it is missing; None: no data here
        return None
    d = cfg["data"]
    key = (d["name"], d.get("root"), str(d.get("options")), d.get("subset"))
    if key not in datasets:
        data = data_lib.load(d["name"], root=d.get("root"), seed=0, **(d.get("options") or {}))
        datasets[key] = data.subset(d["subset"]) if d.get("subset") else data
    trainer = Trainer(cfg, datasets[key], fresh=False)
    trainer.load_checkpoint(os.path.join(config_lib.run_dir(cfg), "checkpoint.msgpack"))
    return trainer


def evaluate(trainer: Trainer, presets, kind: str, n: int, key: jax.Array) -> dict:
    """Per attribution: the mean curves and the mean areas over ``n`` held-out examples."""
    data = trainer.data
    fun = model_fn(trainer)
    if kind == "pixels":
        idx = pick_samples(data.y_test, n)
        x = jnp.asarray(data.x_test[idx], jnp.float32)
        target = jnp.asarray(data.y_test[idx], jnp.int32)
        options = {"group": (1,) * (x.ndim - 2) + (-1,), "steps": 28, "replacement": "mean"}
    else:
        idx = np.linspace(0, len(data.x_test) - 1, n).astype(np.int64)
        ids = jnp.asarray(data.x_test[idx])
        x = encode_inputs(trainer.model, ids, trainer.eval_key)                # (n, T, V) one-hot
        target = lfp_jax.targets.token(fun(trainer.params, x), jnp.asarray(data.y_test[idx, -1]), -1)
        options = {"group": (1, -1), "steps": 16, "replacement": "zero"}
    attributions = {}
    for name in presets:
        _, attributions[name] = jax.jit(lfp_jax.lrp(fun, composite(name, -1.0, 1.0)))(
            trainer.params, x, target=target)
    curves = metrics.faithfulness(fun, trainer.params, x, target, attributions, key=key, **options)
    return {name: {"morf": np.asarray(c.morf.mean(0)).tolist(), "lerf": np.asarray(c.lerf.mean(0)).tolist(),
                   "fractions": np.asarray(c.fractions).tolist(), **c.summary()}
            for name, c in curves.items()}


def faithfulness(runner) -> dict:
    """Run the study (see the module docstring); writes ``results/faithfulness/results.json`` and
    ``curves.png``."""
    from experiments.study import _save

    n = getattr(runner.args, "examples", None) or (16 if runner.args.quick else 128)
    datasets: dict = {}
    results: dict = {"examples": n, "models": {}}
    for stem, epochs, presets, kind in MODELS:
        per_seed = []
        for seed in range(runner.args.seeds):
            trainer = _trainer(runner, stem, epochs, seed, datasets)
            if trainer is None:
                break
            per_seed.append(evaluate(trainer, presets, kind, n, jax.random.key(seed)))
            print(f"faithfulness {stem} seed {seed}: "
                  + ", ".join(f"{k} ΔA {v['area_between']:.3f}" for k, v in per_seed[-1].items()), flush=True)
        if not per_seed:
            continue
        summary = {}
        for name in per_seed[0]:
            between = np.array([s[name]["area_between"] for s in per_seed])
            morf = np.array([s[name]["auc_morf"] for s in per_seed])
            summary[name] = {"area_between": float(between.mean()), "area_between_std": float(between.std()),
                             "auc_morf": float(morf.mean()), "auc_morf_std": float(morf.std()),
                             "auc_lerf": float(np.mean([s[name]["auc_lerf"] for s in per_seed])),
                             "seeds": len(per_seed), "curves_seed0": per_seed[0][name]}
        results["models"][stem] = {"epochs": epochs, "perturbation": kind, "attributions": summary}
    folder = _save(results, "faithfulness", runner.args)
    plot_curves(results, os.path.join(folder, "curves.png"))
    return results


def plot_curves(results: dict, path: str) -> None:
    """One panel per model: the mean MoRF (solid) and LeRF (dashed) curves of seed 0 per attribution."""
    models = list(results["models"].items())
    if not models:
        return
    cols = min(3, len(models))
    rows = -(-len(models) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.9 * rows), squeeze=False)
    seeds = max(a["seeds"] if isinstance(a["seeds"], int) else len(a["seeds"])
                for _, e in models for a in e["attributions"].values())
    colours = dict(zip(LABELS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (stem, entry) in zip(axes.flat, models):
        for name, a in entry["attributions"].items():
            c = a["curves_seed0"]
            f = 100 * np.asarray(c["fractions"])
            ax.plot(f, c["morf"], color=colours.get(name), lw=1.5,
                    label=f"{LABELS.get(name, name)}: ΔA {a['area_between']:.2f}")
            ax.plot(f, c["lerf"], color=colours.get(name), lw=1.2, ls="--")
        ax.set_title(TITLES.get(stem, stem), fontsize=9)
        removed = "pixels" if entry["perturbation"] == "pixels" else "characters"
        ax.set_xlabel(f"% of {removed} removed")
        ax.set_ylabel("explained logit (mean)")
        # below the panel, so that no curve is hidden
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False,
                  title=f"solid: most relevant first, dashed: least (seed 0); "
                        f"ΔA: mean of {seeds or 1} seed{'s' if seeds != 1 else ''}", title_fontsize=6.5)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
