"""Where LFP trails gradient descent, one factor at a time, and transfer learning.

    python -m experiments.study gaps [--tasks swirls,fashion_lenet,char_lm]
    python -m experiments.study transfer

**gaps.** For each task, a base pair of runs (LFP and gradient descent, each at the learning rate of
its sweep) and variations of one setting at a time, every one on ``--seeds`` seeds and for both methods
where the setting exists for both: the learning rate (SGD with momentum), Adam and its learning rate,
the initial scale of the parameters (``init.scale``: LFP's feedback is ``|θ| ⊙ …``, so the scale sets how
fast a weight can move), the width, the number of epochs (does LFP learn slower, or stop lower?), and for
LFP alone ε and the reward. Results go to ``<results>/gaps/results.json`` and one figure per task
(``gaps_<task>.png``): a panel per setting, the test accuracy (or bits per character) of both methods
against its values, mean and standard deviation over the seeds.

**transfer.** The paper's application, pretrained here (no weights can be downloaded): a LeNet trained
by gradient descent on MNIST digits 0–4 (``configs/transfer_pretrain_gd.yaml``), then fine-tuned on
digits 5–9 (``configs/transfer_finetune_*.yaml``: ``init.from`` points at the pretraining run's folder,
the classifier is re-initialised with ``init.reset``) by LFP and by gradient descent, against both
trained from scratch on digits 5–9 for the same epochs; and LFP fine-tuning with the discrete rewards
``correct_class`` and ``misclassification``, which stay at chance from a random start.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# task → (config stem, base overrides per method, metric, lower is better)
TASKS = {
    "swirls": ("toy_mlp", {"lfp": {"data": {"name": "swirls"}, "optimizer": {"lr": 3e-3}},
                           "gd": {"data": {"name": "swirls"}, "optimizer": {"lr": 1e-2}}},
               "test_accuracy", False),
    "fashion_lenet": ("fashion_mnist_lenet", {"lfp": {}, "gd": {}}, "test_accuracy", False),
    "char_lm": ("gpt_text", {"lfp": {}, "gd": {}}, "test_bits_per_char", True),
}


def _adam(lr: float) -> dict:
    return {"optimizer": {"name": "adam", "lr": lr, "momentum": None}}


def factors(task: str) -> dict[str, list[tuple[str, dict | None, dict | None]]]:
    """The settings varied for ``task``: name → [(value label, LFP overrides, GD overrides)], ``None``
    where the setting does not exist for that method."""
    if task == "swirls":
        lrs = (1e-3, 3e-3, 1e-2, 3e-2)
        return {
            "learning rate (SGD, momentum 0.95)": [(f"{lr:g}", {"optimizer": {"lr": lr}},
                                                    {"optimizer": {"lr": lr}}) for lr in lrs],
            "Adam, learning rate": [(f"{lr:g}", _adam(lr), _adam(lr)) for lr in lrs],
            "initial scale": [(f"{s:g}", {"init": {"scale": s}}, {"init": {"scale": s}})
                              for s in (0.5, 1, 2, 4)],
            "width (hidden layers)": [
                (f"{a}-{b}", m, m) for a, b in ((32, 16), (64, 32), (128, 64), (256, 128))
                for m in [{"model": {"name": "mlp", "hidden": [a, b]}}]],
            "epochs": [(str(e), {"epochs": e}, {"epochs": e}) for e in (10, 30, 100)],
            "ε": [(f"{e:g}", {"epsilon": e}, None) for e in (1e-6, 1e-3, 1e-2, 1e-1)],
            "reward": [(r, {"reward": {"name": r}}, None)
                       for r in ("softmax_loss", "sigmoid_loss", "bounded_softmax")],
            "Adam, 100 epochs, width 128-64": [
                (f"{lr:g}", m, m) for lr in (1e-3, 3e-3, 1e-2)
                for m in [{**_adam(lr), "epochs": 100, "model": {"name": "mlp", "hidden": [128, 64]}}]],
        }
    if task == "fashion_lenet":
        return {
            "learning rate (SGD, momentum 0.9)": [(f"{lr:g}", {"optimizer": {"lr": lr}},
                                                   {"optimizer": {"lr": lr}}) for lr in (0.01, 0.03, 0.1)],
            "Adam, learning rate": [(f"{lr:g}", _adam(lr), _adam(lr)) for lr in (3e-4, 1e-3)],
            "epochs": [(str(e), {"epochs": e}, {"epochs": e}) for e in (10, 20)],
            "initial scale": [(f"{s:g}", {"init": {"scale": s}}, {"init": {"scale": s}}) for s in (1, 2)],
            "ε": [(f"{e:g}", {"epsilon": e}, None) for e in (1e-6, 1e-2)],
        }
    if task == "char_lm":
        return {
            "Adam, learning rate": [(f"{lr:g}", _adam(lr), _adam(lr)) for lr in (1e-3, 3e-3)],
            "epochs": [(str(e), {"epochs": e}, {"epochs": e}) for e in (3, 6)],
            "ε": [(f"{e:g}", {"epsilon": e}, None) for e in (1e-6, 1e-2)],
        }
    raise ValueError(f"unknown gap task {task!r}; choose from {sorted(TASKS)}")


def _merge(a: dict, b: dict) -> dict:
    from experiments import config as config_lib
    return config_lib.merge(a, b)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _summaries(runner, stem: str, method: str, overrides: dict, name: str, metric: str) -> dict | None:
    from experiments.study import aggregate

    runs = runner.seeds(f"{stem}_{method}.yaml", {**overrides, "name": name})
    if not runs:
        return None
    out = aggregate(runs)
    values = np.array([r.get(metric, np.nan) if r.get(metric) is not None else np.nan for r in runs], float)
    out.update(metric=metric, metric_mean=float(np.nanmean(values)), metric_std=float(np.nanstd(values)),
               metric_values=values.tolist())
    return out


def gap_task(runner, task: str) -> dict:
    """Every factor of ``task`` for both methods; ``{factor: {value: {lfp: …, gd: …}}}``."""
    stem, base, metric, _ = TASKS[task]
    results: dict = {"metric": metric, "base": {}, "factors": {}}
    for method in ("lfp", "gd"):
        got = _summaries(runner, stem, method, base[method], f"gap_{task}_base_{method}", metric)
        if got:
            results["base"][method] = got
    for factor, values in factors(task).items():
        results["factors"][factor] = {}
        for label, lfp_over, gd_over in values:
            cell = {}
            for method, over in (("lfp", lfp_over), ("gd", gd_over)):
                if over is None:
                    continue
                name = f"gap_{task}_{_slug(factor)}_{_slug(label)}_{method}"
                got = _summaries(runner, stem, method, _merge(base[method], over), name, metric)
                if got:
                    cell[method] = got
            results["factors"][factor][label] = cell
    return results


def plot_task(task: str, result: dict, path: str) -> None:
    """One panel per factor: the metric of LFP and GD against the factor's values (mean ± std)."""
    metric = result["metric"]
    items = list(result["factors"].items())
    cols = min(4, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    scale = 100 if metric == "test_accuracy" else 1
    for ax, (factor, cells) in zip(axes.flat, items):
        labels = list(cells)
        for method, colour in (("lfp", "C0"), ("gd", "C1")):
            xs = [i for i, lab in enumerate(labels) if method in cells[lab]]
            if not xs:
                continue
            m = np.array([cells[labels[i]][method]["metric_mean"] for i in xs]) * scale
            s = np.array([cells[labels[i]][method]["metric_std"] for i in xs]) * scale
            ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, color=colour, label=method.upper())
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_title(factor, fontsize=9)
        ax.set_ylabel("test accuracy (%)" if scale == 100 else "test bits per character")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{task}: one setting varied at a time ({metric.replace('_', ' ')}, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gaps(runner) -> dict:
    from experiments.study import _save

    tasks = getattr(runner.args, "tasks", None) or "swirls"
    results = {}
    folder = os.path.join(runner.args.results, "gaps")
    for task in tasks.split(","):
        results[task] = gap_task(runner, task)
        os.makedirs(folder, exist_ok=True)
        plot_task(task, results[task], os.path.join(folder, f"gaps_{task}.png"))
    old = os.path.join(folder, "results.json")
    if os.path.exists(old):  # keep the tasks of earlier invocations (--tasks runs one part at a time)
        import json
        with open(old) as f:
            results = {**json.load(f), **results}
    _save(results, "gaps", runner.args)
    return results


# --- transfer learning ----------------------------------------------------------------------------

FINE_TUNE = (("LFP fine-tuning", "transfer_finetune_lfp.yaml", {}),
             ("GD fine-tuning", "transfer_finetune_gd.yaml", {}),
             ("LFP from scratch", "transfer_finetune_lfp.yaml", {"init": {"from": None, "reset": []}}),
             ("GD from scratch", "transfer_finetune_gd.yaml", {"init": {"from": None, "reset": []}}),
             ("LFP fine-tuning, correct_class reward", "transfer_finetune_lfp.yaml",
              {"reward": {"name": "correct_class"}}),
             ("LFP fine-tuning, misclassification reward", "transfer_finetune_lfp.yaml",
              {"reward": {"name": "misclassification"}}),
             ("LFP from scratch, correct_class reward", "transfer_finetune_lfp.yaml",
              {"reward": {"name": "correct_class"}, "init": {"from": None, "reset": []}}),
             ("LFP from scratch, misclassification reward", "transfer_finetune_lfp.yaml",
              {"reward": {"name": "misclassification"}, "init": {"from": None, "reset": []}}))


def transfer(runner) -> dict:
    """Pretrain (per seed) by GD on digits 0–4, then every row of :data:`FINE_TUNE` on digits 5–9 from
    that seed's pretrained run."""
    from experiments import config as config_lib
    from experiments.study import _save, aggregate

    results: dict = {"pretrain": None, "rows": {}}
    pre_runs, pre_dirs = [], []
    for seed in range(runner.args.seeds):
        cfg = runner.cfg("transfer_pretrain_gd.yaml", seed=seed)
        pre_dirs.append(config_lib.run_dir(cfg))
        summary = runner.run(cfg)
        if summary is None:
            return results
        pre_runs.append(summary)
    results["pretrain"] = aggregate(pre_runs)
    for label, file, over in FINE_TUNE:
        runs = []
        for seed, pre in enumerate(pre_dirs):
            extra = config_lib.merge({"name": f"transfer_{_slug(label)}"}, over)
            if extra.get("init", {}).get("from", "") is not None:
                extra = config_lib.merge(extra, {"init": {"from": pre}})
            got = runner.run(runner.cfg(file, extra, seed))
            if got is not None:
                runs.append(got)
        if runs:
            results["rows"][label] = aggregate(runs)
            results["rows"][label]["curves"] = [_epoch_accuracies(r["run_dir"]) for r in runs]
    folder = _save(results, "transfer", runner.args)
    plot_transfer(results, os.path.join(folder, "transfer.png"))
    return results


def _epoch_accuracies(run_dir: str) -> list[float]:
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["test_accuracy"] for line in f if line.strip()]


def plot_transfer(results: dict, path: str) -> None:
    """Test accuracy on digits 5–9 per epoch, mean over seeds, every row of the table."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (label, row) in enumerate(results["rows"].items()):
        curves = np.array(row["curves"], float) * 100
        style = "-" if "fine-tuning" in label else "--"
        ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), style, marker="o", color=f"C{i}",
                label=f"{label} ({row['mean'] * 100:.1f} %)")
    ax.set_xlabel("epoch on digits 5–9")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST digits 5–9: LeNet pretrained by GD on digits 0–4, fine-tuned, against scratch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
