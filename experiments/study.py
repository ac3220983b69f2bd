"""Studies: LFP against gradient descent, one command each.

    python -m experiments.study compare       # toy data, digits, MNIST (MLP, LeNet), Fashion-MNIST
    python -m experiments.study activations   # relu, tanh, silu, elu, sigmoid, step (+ input noise)
    python -m experiments.study pruning       # Gini of |w| per layer, global/per-layer pruning curves
    python -m experiments.study rewards       # non-differentiable rewards (misclassification, ...)
    python -m experiments.study snn           # spiking (LIF) networks: LFP vs surrogate gradients
    python -m experiments.study transformers  # ViT (MNIST, Fashion-MNIST) and a character-level decoder
    python -m experiments.study faithfulness  # perturbation curves: LRP presets against baselines
    python -m experiments.study gaps          # where LFP trails GD: one setting at a time (--tasks)
    python -m experiments.study transfer      # LeNet pretrained on digits 0-4, fine-tuned on 5-9
    python -m experiments.study all

Options: ``--seeds N`` (default 3), ``--force`` (retrain runs that already have a summary),
``--set key=value`` (applied to every run, e.g. ``data.root`` for a directory of idx files),
``--quick`` (tiny subsets and one epoch: a smoke test), ``--out-dir`` for run folders (``runs``) and
``--results`` for the study outputs (``results``). Each study writes ``<results>/<study>/results.json``
and PNG plots; runs already finished are reused, so an interrupted study continues where it stopped.
``python -m experiments.results`` turns the results into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models, pruning  # noqa: E402
from experiments.train import Trainer, train  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TOY = ("blobs", "circles", "swirls")
TOY_LRS = {"lfp": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), "gd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}


class Runner:
    """Runs (or reuses) training runs and collects their summaries."""

    def __init__(self, args):
        self.args = args
        self.missing: list[str] = []

    def cfg(self, config_file: str, overrides: dict | None = None, seed: int = 0) -> dict:
        base = dict(overrides or {})
        base["seed"] = seed
        base["out_dir"] = self.args.out_dir
        cfg = config_lib.load(os.path.join(CONFIGS, config_file), self.args.set, base=base)
        if self.args.quick:
            cfg["epochs"] = 1
            cfg["data"]["subset"] = 256
            cfg["batch_size"] = min(cfg["batch_size"], 64)
        return config_lib.validate(cfg)  # load validated the file, base= and --set; this the quick changes

    def run(self, cfg: dict) -> dict | None:
        path = os.path.join(config_lib.run_dir(cfg), "summary.json")
        if os.path.exists(path) and not self.args.force:
            with open(path) as f:
                return json.load(f)
        try:
            return train(cfg, progress=not self.args.quiet)
        except data_lib.DatasetNotFound as e:
            self.missing.append(f"{cfg['name']}: {e}")
            print(f"skipping {cfg['name']}: {e}")
            return None

    def seeds(self, config_file: str, overrides: dict | None = None) -> list[dict]:
        runs = [self.run(self.cfg(config_file, overrides, s)) for s in range(self.args.seeds)]
        return [r for r in runs if r is not None]


def aggregate(runs: list[dict]) -> dict:
    acc = np.array([r["test_accuracy"] for r in runs])
    return {"mean": float(acc.mean()), "std": float(acc.std()), "n": len(acc),
            "values": acc.tolist(), "train_seconds": float(np.mean([r["train_seconds"] for r in runs]))}


def _save(results: dict, study: str, args) -> str:
    folder = os.path.join(args.results, study)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return folder


def _pair(runner: Runner, stem: str, overrides: dict | None = None, name: str | None = None) -> dict:
    out = {}
    for method in ("lfp", "gd"):
        over = dict(overrides or {})
        if name:
            over["name"] = f"{name}_{method}"
        runs = runner.seeds(f"{stem}_{method}.yaml", over)
        if runs:
            out[method] = aggregate(runs)
    return out


# --- compare ------------------------------------------------------------------------------------


def compare(runner: Runner) -> dict:
    args = runner.args
    results: dict = {"benchmarks": {}, "lr_sweep": {}}
    for ds in TOY:
        results["benchmarks"][f"{ds} (toy MLP)"] = _pair(
            runner, "toy_mlp", {"data": {"name": ds}}, name=f"toy_{ds}")
    for label, stem in (("digits (MLP)", "digits_mlp"), ("MNIST (MLP 784-120-84-10)", "mnist_mlp"),
                        ("MNIST (LeNet)", "mnist_lenet"), ("Fashion-MNIST (MLP)", "fashion_mnist_mlp"),
                        ("Fashion-MNIST (LeNet)", "fashion_mnist_lenet")):
        results["benchmarks"][label] = _pair(runner, stem)
    for ds in TOY:
        sweep = {}
        for method, lrs in TOY_LRS.items():
            sweep[method] = {}
            for lr in lrs:
                runs = runner.seeds(f"toy_mlp_{method}.yaml", {
                    "data": {"name": ds}, "optimizer": {"lr": lr},
                    "name": f"toy_{ds}_{method}_lr{lr:g}"})
                if runs:
                    sweep[method][f"{lr:g}"] = aggregate(runs)
        results["lr_sweep"][ds] = sweep
    folder = _save(results, "compare", args)
    _plot_lr_sweep(results["lr_sweep"], os.path.join(folder, "toy_lr_sweep.png"))
    _plot_boundaries(runner, os.path.join(folder, "toy_decision_boundaries.png"))
    return results


def _plot_lr_sweep(sweep: dict, path: str) -> None:
    fig, axes = plt.subplots(1, len(sweep), figsize=(4 * len(sweep), 3.2), squeeze=False)
    for ax, (ds, methods) in zip(axes[0], sweep.items()):
        for method, points in methods.items():
            lrs = [float(k) for k in points]
            means = [v["mean"] for v in points.values()]
            stds = [v["std"] for v in points.values()]
            ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=method.upper())
        ax.set_xscale("log")
        ax.set_title(ds)
        ax.set_xlabel("learning rate")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_boundaries(runner: Runner, path: str) -> None:
    fig, axes = plt.subplots(2, len(TOY), figsize=(4 * len(TOY), 7.5), squeeze=False)
    for col, ds in enumerate(TOY):
        for row, method in enumerate(("lfp", "gd")):
            cfg = runner.cfg(f"toy_mlp_{method}.yaml", {"data": {"name": ds}, "name": f"toy_{ds}_{method}"})
            trainer = Trainer(cfg)
            ckpt = os.path.join(config_lib.run_dir(cfg), "checkpoint.msgpack")
            ax = axes[row][col]
            if not os.path.exists(ckpt):
                ax.set_visible(False)
                continue
            trainer.load_checkpoint(ckpt)
            x, y = trainer.data.x_test, trainer.data.y_test
            lo, hi = x.min(0) - 0.5, x.max(0) + 0.5
            gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
            grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
            logits = trainer.predict(trainer.params, trainer.batch_stats, grid, trainer.eval_key)
            pred = np.asarray(jnp.argmax(logits, -1))
            ax.contourf(gx, gy, pred.reshape(gx.shape), alpha=0.3, cmap="viridis")
            ax.scatter(x[:, 0], x[:, 1], c=y, s=6, cmap="viridis", edgecolors="none")
            acc = trainer.evaluate()["test_accuracy"]
            ax.set_title(f"{ds}, {method.upper()}: {acc:.3f}")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- activations -------------------------------------------------------------------------------

ACTIVATION_RUNS = ("relu", "tanh", "silu", "elu", "sigmoid", "step")


def activations(runner: Runner) -> dict:
    results = {}
    for act in ACTIVATION_RUNS:
        results[act] = _pair(runner, "mnist_mlp", {"model": {"activation": act}}, name=f"act_{act}")
    results["step + input noise σ=0.1"] = _pair(runner, "mnist_mlp_step_noise")
    folder = _save(results, "activations", runner.args)
    _plot_bars(results, os.path.join(folder, "activations.png"), "MNIST MLP 784-120-84-10: test accuracy")
    _plot_curves(runner, os.path.join(folder, "step_noise_curves.png"))
    return results


def _plot_bars(results: dict, path: str, title: str) -> None:
    labels = list(results)
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 3.5))
    for k, method in enumerate(("lfp", "gd")):
        means = [results[lab].get(method, {}).get("mean", np.nan) for lab in labels]
        stds = [results[lab].get(method, {}).get("std", 0) for lab in labels]
        ax.bar(np.arange(len(labels)) + 0.4 * k - 0.2, means, 0.4, yerr=stds, capsize=3, label=method.upper())
    ax.set_xticks(np.arange(len(labels)), labels, rotation=15)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot_curves(runner: Runner, path: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method in ("lfp", "gd"):
        rows = _curves(config_lib.run_dir(runner.cfg(f"mnist_mlp_step_noise_{method}.yaml")))
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["test_accuracy"] for r in rows], label=method.upper())
    ax.axhline(0.70, color="gray", ls="--", lw=1, label="reference LFP ≈ 0.70")
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
    ax.set_ylabel("test accuracy")
    ax.set_title("step MLP with input noise, MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- pruning -----------------------------------------------------------------------------------


def pruning_study(runner: Runner) -> dict:
    results = {}
    for label, stem in (("MNIST MLP", "mnist_mlp"), ("MNIST LeNet", "mnist_lenet"),
                        ("Fashion-MNIST LeNet", "fashion_mnist_lenet")):
        entry = {}
        for method in ("lfp", "gd"):
            cfg = runner.cfg(f"{stem}_{method}.yaml")
            if runner.run(cfg) is None:
                continue
            trainer = Trainer(cfg, fresh=False)
            trainer.load_checkpoint(os.path.join(config_lib.run_dir(cfg), "checkpoint.msgpack"))
            evaluate = lambda p, t=trainer: t.evaluate(p)["test_accuracy"]  # noqa: E731
            entry[method] = {
                "gini": pruning.layer_gini(trainer.params),
                "global": pruning.pruning_curve(trainer.params, evaluate, scope="global"),
                "per_layer": pruning.pruning_curve(trainer.params, evaluate, scope="per_layer"),
            }
        if entry:
            results[label] = entry
    folder = _save(results, "pruning", runner.args)
    _plot_pruning(results, os.path.join(folder, "pruning.png"))
    _plot_gini(results, os.path.join(folder, "gini.png"))
    return results


def _plot_pruning(results: dict, path: str) -> None:
    fig, axes = plt.subplots(2, max(len(results), 1), figsize=(4.2 * max(len(results), 1), 6.5),
                             squeeze=False)
    for col, (label, entry) in enumerate(results.items()):
        for row, scope in enumerate(("global", "per_layer")):
            ax = axes[row][col]
            for method, data in entry.items():
                ax.plot([p["fraction"] * 100 for p in data[scope]], [p["accuracy"] for p in data[scope]],
                        marker=".", label=method.upper())
            ax.set_title(f"{label}, {scope.replace('_', '-')}")
            ax.set_xlabel("weights pruned (%)")
            ax.set_ylim(0, 1.02)
            ax.legend()
        axes[0][col].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_gini(results: dict, path: str) -> None:
    fig, axes = plt.subplots(1, max(len(results), 1), figsize=(4.2 * max(len(results), 1), 3.3),
                             squeeze=False)
    for ax, (label, entry) in zip(axes[0], results.items()):
        for k, (method, data) in enumerate(entry.items()):
            values = list(data["gini"].values())
            ax.bar(np.arange(len(values)) + 0.4 * k - 0.2, values, 0.4, label=method.upper())
        ax.set_title(f"{label}: Gini of |w|")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- rewards -----------------------------------------------------------------------------------


def rewards(runner: Runner) -> dict:
    results = {}
    for reward in ("softmax_loss", "misclassification", "correct_class"):
        runs = runner.seeds("mnist_mlp_lfp.yaml", {"reward": {"name": reward},
                                                    "name": f"reward_{reward}_lfp"})
        if runs:
            results[reward] = {"lfp": aggregate(runs)}
    folder = _save(results, "rewards", runner.args)
    _plot_bars(results, os.path.join(folder, "rewards.png"), "MNIST MLP trained by LFP with each reward")
    return results


# --- spiking networks ----------------------------------------------------------------------------

SNN_MLP = ("snn_mnist_lfp", "snn_mnist_surrogate", "snn_mnist_heaviside")
SNN_CNN = ("snn_cnn_mnist_lfp", "snn_cnn_mnist_surrogate", "snn_cnn_fashion_mnist_lfp",
           "snn_cnn_fashion_mnist_surrogate")


def _spike_stats(runner: Runner, config_file: str, seed: int = 0, n: int = 1000) -> list[float] | None:
    """Mean firing rate per LIF layer of a trained run on ``n`` test images."""
    cfg = runner.cfg(config_file, seed=seed)
    ckpt = os.path.join(config_lib.run_dir(cfg), "checkpoint.msgpack")
    if not os.path.exists(ckpt):
        return None
    trainer = Trainer(cfg, fresh=False)
    trainer.load_checkpoint(ckpt)
    return models.spike_rates(trainer.model, trainer.params, trainer.data.x_test[:n],
                              jax.random.key(cfg["seed"]))


def snn(runner: Runner) -> dict:
    """The LIF-MLP (3 seeds) and the LIF CNN on MNIST and Fashion-MNIST (seed 0: 2 epochs of a
    15-step convolutional network take ~15 minutes per method on 2 CPU cores)."""
    results: dict = {"mlp": {}, "cnn": {}}
    for stem in SNN_MLP:
        runs = runner.seeds(f"{stem}.yaml")
        if runs:
            results["mlp"][stem] = {**aggregate(runs), "curves": [
                [r["test_accuracy"] for r in _curves(config_lib.run_dir(runner.cfg(f"{stem}.yaml", seed=s)))]
                for s in range(runner.args.seeds)], "spike_rates": _spike_stats(runner, f"{stem}.yaml")}
    for stem in SNN_CNN:
        run = runner.run(runner.cfg(f"{stem}.yaml", seed=0))
        if run:
            results["cnn"][stem] = {**aggregate([run]), "curves": [
                [r["test_accuracy"] for r in _curves(config_lib.run_dir(runner.cfg(f"{stem}.yaml")))]],
                "spike_rates": _spike_stats(runner, f"{stem}.yaml")}
    folder = _save(results, "snn", runner.args)
    _plot_snn(results, os.path.join(folder, "snn_curves.png"))
    return results


def _plot_snn(results: dict, path: str) -> None:
    """Test accuracy per epoch: the mean over seeds, with a band from the lowest to the highest seed
    where there are several; legends name the data set and the method."""
    methods = {"lfp": "LFP", "surrogate": "surrogate-gradient descent",
               "heaviside": "gradient descent through the Heaviside"}
    datasets = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}

    def label(stem: str, group: str) -> str:   # snn_cnn_fashion_mnist_lfp -> "Fashion-MNIST, LFP"
        data, _, method = stem.removeprefix("snn_cnn_" if group == "cnn" else "snn_").rpartition("_")
        method = methods.get(method, method)
        return method if group == "mlp" else f"{datasets.get(data, data)}, {method}"

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (group, title) in zip(axes, (("mlp", "LIF-MLP 784-1000-10, MNIST"), ("cnn", "LIF CNN"))):
        banded = False
        for stem, entry in results[group].items():
            curves = [c for c in entry["curves"] if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
            line, = ax.plot(x, arr.mean(0), marker="o", label=f"{label(stem, group)} ({seeds})")
            if len(curves) > 1:
                ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.2, lw=0)
                banded = True
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend(fontsize=8, title="mean over seeds; band: lowest to highest" if banded else None,
                  title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- transformers -------------------------------------------------------------------------------

VIT = ("vit_mnist", "vit_fashion_mnist")
VIT_METHODS = ("lfp", "gd", "lfp_reference")
LM_METHODS = ("lfp", "gd")


def _curve(run_dir: str, key: str) -> list[float]:
    return [r[key] for r in _curves(run_dir) if key in r]


def transformers(runner: Runner) -> dict:
    """ViT from scratch on MNIST (``--seeds`` seeds) and Fashion-MNIST (seed 0): LFP with the AttnLRP
    rules (default composite), gradient descent, and LFP as the reference trains transformers
    (``reference_vit``). The GPT-style decoder as a character-level language model (seed 0), LFP vs
    gradient descent, in bits per character on held-out text. On 2 CPU cores a ViT epoch takes 1 to 1.5
    minutes, a decoder epoch about 3."""
    results: dict = {"vit": {}, "lm": {}}
    for stem in VIT:
        n_seeds = runner.args.seeds if stem == "vit_mnist" else 1
        entry = {}
        for method in VIT_METHODS:
            cfgs = [runner.cfg(f"{stem}_{method}.yaml", seed=s) for s in range(n_seeds)]
            pairs = [(c, runner.run(c)) for c in cfgs]
            pairs = [(c, r) for c, r in pairs if r is not None]
            if pairs:
                entry[method] = {**aggregate([r for _, r in pairs]), "curves": [
                    _curve(config_lib.run_dir(c), "test_accuracy") for c, _ in pairs]}
        results["vit"][stem] = entry
    for method in LM_METHODS:
        cfg = runner.cfg(f"gpt_text_{method}.yaml", seed=0)
        run = runner.run(cfg)
        if run is not None:
            results["lm"][method] = {
                "test_bits_per_char": run["test_bits_per_char"], "test_accuracy": run["test_accuracy"],
                "train_seconds": run["train_seconds"],
                "curve": _curve(config_lib.run_dir(cfg), "test_bits_per_char")}
    folder = _save(results, "transformers", runner.args)
    _plot_transformers(results, os.path.join(folder, "transformers.png"))
    return results


def _plot_transformers(results: dict, path: str) -> None:
    names = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
    panels = [(stem, f"ViT, {names.get(stem[4:], stem[4:])}") for stem in VIT]
    panels.append(("lm", "decoder, fortunes"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4))
    labels = {"lfp": "LFP (AttnLRP rules)", "gd": "gradient descent", "lfp_reference": "LFP (reference ViT)"}
    for ax, (key, title) in zip(axes, panels):
        if key == "lm":
            for method, entry in results["lm"].items():
                c = entry["curve"]
                ax.plot(np.arange(1, len(c) + 1), c, marker="o", label=labels[method])
            ax.set_ylabel("test bits per character")
        else:
            for method, entry in results["vit"].get(key, {}).items():
                curves = [c for c in entry["curves"] if c]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                arr = np.array([c[:n] for c in curves])
                x = np.arange(1, n + 1)
                seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
                ax.plot(x, arr.mean(0), marker="o", label=f"{labels[method]} ({seeds})")
                if len(curves) > 1:
                    ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.2)
            ax.set_ylabel("test accuracy")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def faithfulness(runner: Runner) -> dict:
    """Perturbation curves of LRP and baseline attributions (see :mod:`experiments.faithfulness`)."""
    from experiments import faithfulness as study

    return study.faithfulness(runner)


from experiments.gaps import gaps, transfer  # noqa: E402

STUDIES = {"compare": compare, "activations": activations, "pruning": pruning_study, "rewards": rewards,
           "snn": snn, "transformers": transformers, "faithfulness": faithfulness, "gaps": gaps,
           "transfer": transfer}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run an LFP study.")
    parser.add_argument("study", choices=sorted(STUDIES) + ["all"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--examples", type=int, default=None,
                        help="faithfulness: held-out examples per model and seed (default 128)")
    parser.add_argument("--tasks", default="swirls",
                        help="gaps: comma-separated, from swirls, fashion_lenet, char_lm (default swirls)")
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--results", default="results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key in every run, e.g. --set data.root=/path/to/idx")
    args = parser.parse_args(argv)
    runner = Runner(args)
    for name in (sorted(STUDIES) if args.study == "all" else [args.study]):
        print(f"== study {name}")
        try:  # every run's config (with --set) is validated before it trains: stop with the key named
            STUDIES[name](runner)
        except config_lib.ConfigError as e:
            raise SystemExit(f"invalid config in study {name} (--set {args.set}):\n{e}") from None
    if runner.missing:
        print("datasets missing, runs skipped:\n  " + "\n  ".join(runner.missing))


if __name__ == "__main__":
    main()
