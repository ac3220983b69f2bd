"""Where LFP trails gradient descent, one factor at a time, and transfer learning.

    python -m experiments.study gaps [--tasks swirls,fashion_lenet,char_lm]
    python -m experiments.study transfer

**gaps.** For each task, a base pair of runs (LFP and gradient descent, each at the learning rate of
its sweep; on at least 3 seeds) and variations of one setting at a time, every one on ``--seeds`` seeds
and for both methods where the setting exists for both: the learning rate (SGD with momentum), Adam
and its learning rate, the initial scale of the parameters (``init.scale``: LFP's feedback is
``|θ| ⊙ …``, so the scale sets how fast a weight can move), the width, the number of epochs (does LFP
learn slower, or stop lower?), and for LFP alone ε and the reward. Results go to
``<results>/gaps/results.json`` and one figure per task (``gaps_<task>.png``): a panel per setting,
the test accuracy (or bits per character) of both methods against its values, mean and standard
deviation over the seeds.

**transfer.** The paper's application, pretrained here (no weights can be downloaded): a LeNet trained
by gradient descent on MNIST digits 0–4 (``configs/transfer_pretrain_gd.yaml``), then fine-tuned on
digits 5–9 (``configs/transfer_finetune_*.yaml``: ``init.from`` points at the pretraining run's folder,
the classifier is re-initialised with ``init.reset``) by LFP and by gradient descent, against both
trained from scratch on digits 5–9 for the same epochs; and LFP fine-tuning with the discrete rewards
``correct_class`` and ``misclassification``, which stay at chance from a random start.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import config as config_lib  # noqa: E402

# task → (config stem, base overrides per method, metric)
TASKS = {
    "swirls": ("toy_mlp", {"lfp": {"data": {"name": "swirls"}, "optimizer": {"lr": 3e-3}},
                           "gd": {"data": {"name": "swirls"}, "optimizer": {"lr": 1e-2}}},
               "test_accuracy"),
    "fashion_lenet": ("fashion_mnist_lenet", {"lfp": {}, "gd": {}}, "test_accuracy"),
    "char_lm": ("gpt_text", {"lfp": {}, "gd": {}}, "test_bits_per_char"),
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
            "width (hidden layers)": [("32-16", {}, {})] + [
                (f"{a}-{b}", m, m) for a, b in ((64, 32), (128, 64), (256, 128))
                for m in [{"model": {"name": "mlp", "hidden": [a, b]}}]],
            "epochs": [(str(e), {"epochs": e}, {"epochs": e}) for e in (10, 30, 100)],
            "ε": [(f"{e:g}", {"epsilon": e}, None) for e in (1e-6, 1e-3, 1e-2, 1e-1)],
            "reward": [(r, {"reward": {"name": r}}, None)
                       for r in ("softmax_loss", "sigmoid_loss", "bounded_softmax")],
            "Adam (lr 3e-3), epochs": [(str(e), m, m) for e in (10, 30, 100)
                                       for m in [{**_adam(3e-3), "epochs": e}]],
            "Adam, 100 epochs, width 128-64": [
                (f"{lr:g}", m, m) for lr in (1e-3, 3e-3, 1e-2)
                for m in [{**_adam(lr), "epochs": 100, "model": {"name": "mlp", "hidden": [128, 64]}}]],
        }
    if task == "fashion_lenet":  # 15 epochs take about 3.5 minutes per run on 2 CPU cores
        return {
            "Adam, learning rate": [(f"{lr:g}", m, m) for lr in (1e-3, 3e-4)
                                    for m in [{"optimizer": {"name": "adam", "lr": lr, "momentum": None,
                                                             "clip_norm": None, "schedule": "cosine"}}]],
            "epochs (OneCycle over all of them)": [("30", {"epochs": 30}, {"epochs": 30})],
            # LFP's rate against gradient descent's own (0.1)
            "LFP learning rate (SGD, OneCycle)": [("0.1", {"optimizer": {"lr": 0.1}}, None)],
        }
    if task == "char_lm":  # 3 epochs take 4 to 6 minutes per run on 2 CPU cores; 1-epoch probes a third
        one = {"epochs": 1}
        return {
            "rules at attention and gates (1 epoch)": [
                ("AttnLRP (default)", one, one),
                ("gradient (reference_vit)", {**one, "composite": "reference_vit"}, None)],
            "rules at attention and gates (3 epochs)": [
                ("gradient (reference_vit)", {"composite": "reference_vit"}, None)],
            "Adam lr 3e-3 (3 epochs)": [
                ("AttnLRP (default)", {"optimizer": {"lr": 3e-3}}, {"optimizer": {"lr": 3e-3}}),
                ("gradient at products", {"optimizer": {"lr": 3e-3}, "products": "gradient"}, None),
                ("gradient everywhere (control)",
                 {"optimizer": {"lr": 3e-3}, "composite": "gradient_control"}, None)],
            "Adam lr 3e-3, no clipping (3 epochs)": [
                ("gradient everywhere (control)",
                 {"optimizer": {"lr": 3e-3, "clip_norm": None}, "composite": "gradient_control"},
                 {"optimizer": {"lr": 3e-3, "clip_norm": None}})],
            # Adam's second-moment memory, about 1 / (1 - β₂) steps (1000 at the default 0.999); the
            # default rules at 0.95 only (the product rule's cost is measured there and at 0.999)
            **{f"Adam lr 3e-3, β₂ {b2:g} (3 epochs)": [
                ("AttnLRP (default)", m if b2 == 0.95 else None, m),
                ("gradient at products", {**m, "products": "gradient"}, None),
                ("gradient everywhere (control)", {**m, "composite": "gradient_control"}, None)]
               for b2 in (0.95, 0.9) for m in [{"optimizer": {"lr": 3e-3, "beta2": b2}}]},
            "Adam lr 3e-3, β₂ 0.99 (3 epochs)": [
                ("AttnLRP (default)", None, {"optimizer": {"lr": 3e-3, "beta2": 0.99}})],
            "Adam, learning rate (1 epoch)": [
                (f"{lr:g}", m, m) for lr in (1e-3, 3e-3)
                for m in [{**one, "optimizer": {"lr": lr}}]],
        }
    raise ValueError(f"unknown gap task {task!r}; choose from {sorted(TASKS)}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _run_name(runner, file: str, overrides: dict, name: str) -> str:
    """The name runs of this setting are trained under: ``name``, or the name of an identical setting
    already met (the base's own value of a factor), so that each setting is trained once."""
    def plain(v):  # 1 and 1.0 are one setting
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    cfg = runner.cfg(file, {**overrides, "name": "_"})
    key = json.dumps(plain({k: v for k, v in cfg.items() if k != "name"}), sort_keys=True, default=str)
    return runner.__dict__.setdefault("_gap_names", {}).setdefault(key, name)


BASE_SEEDS = 3  # the base pair of every task is compared on at least this many seeds


def _summaries(runner, stem: str, method: str, overrides: dict, name: str, metric: str,
               seeds: int | None = None) -> dict | None:
    """The runs of one setting on seeds ``0 … seeds - 1`` (default ``--seeds``), trained where missing,
    plus any later seed already finished (``n`` in the result says how many)."""
    from experiments.study import aggregate

    file = f"{stem}_{method}.yaml"
    over = {**overrides, "name": _run_name(runner, file, overrides, name)}
    count = seeds or runner.args.seeds
    runs = [runner.run(runner.cfg(file, over, seed)) for seed in range(count)]
    for seed in range(count, count + 10):
        done = os.path.join(config_lib.run_dir(runner.cfg(file, over, seed)), "summary.json")
        if os.path.exists(done):
            with open(done) as f:
                runs.append(json.load(f))
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    out = aggregate(runs)
    values = np.array([r.get(metric, np.nan) if r.get(metric) is not None else np.nan for r in runs], float)
    out.update(metric=metric, metric_mean=float(np.nanmean(values)), metric_std=float(np.nanstd(values)),
               metric_values=values.tolist())
    if all(r.get("train_accuracy") is not None for r in runs):   # the last epoch's, with dropout on
        out["train_accuracy_mean"] = float(np.mean([r["train_accuracy"] for r in runs]))
    return out


def gap_task(runner, task: str) -> dict:
    """Every factor of ``task`` for both methods; ``{factor: {value: {lfp: …, gd: …}}}``."""
    stem, base, metric = TASKS[task]
    results: dict = {"metric": metric, "base": {}, "factors": {}}
    for method in ("lfp", "gd"):
        got = _summaries(runner, stem, method, base[method], f"gap_{task}_base_{method}", metric,
                         seeds=max(runner.args.seeds, BASE_SEEDS))
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
                got = _summaries(runner, stem, method, config_lib.merge(base[method], over), name, metric)
                if got:
                    cell[method] = got
            results["factors"][factor][label] = cell
    return results


def _setting(runner, task: str, method: str, factor: str | None, value: str | None) -> tuple[str, dict]:
    """The config file and overrides (run name included, as :func:`gap_task` trains it) of one cell of
    :func:`factors`, or of the task's base run where ``factor`` is None."""
    stem, base, _ = TASKS[task]
    if factor is None:
        overrides, name = base[method], f"gap_{task}_base_{method}"
    else:
        lfp_over, gd_over = next((lo, go) for v, lo, go in factors(task)[factor] if v == value)
        overrides = config_lib.merge(base[method], lfp_over if method == "lfp" else gd_over)
        name = f"gap_{task}_{_slug(factor)}_{_slug(value)}_{method}"
    file = f"{stem}_{method}.yaml"
    return file, {**overrides, "name": _run_name(runner, file, overrides, name)}


# the runs whose training dynamics the swirls diagnosis compares: (label, method, factor, value)
DYNAMICS = (("LFP, SGD", "lfp", "epochs", "100"), ("GD, SGD", "gd", "epochs", "100"),
            ("LFP, Adam", "lfp", "Adam (lr 3e-3), epochs", "100"),
            ("GD, Adam", "gd", "Adam (lr 3e-3), epochs", "100"))


def dynamics(runner, task: str) -> dict:
    """What training does to the weights, for the 100-epoch runs of :data:`DYNAMICS`: test accuracy
    per epoch, and, per seed, from the initial parameters (the trainer's own initialisation of the
    run's config) to the final checkpoint: the share of kernel entries whose sign flipped (nonzero at
    both ends), the decades their magnitudes span (:func:`_log_range`), the share below 1e-3, the
    largest |w|, and the dead units of each hidden layer."""
    from experiments import train as train_lib

    out = {}
    for label, method, factor, value in DYNAMICS:
        file, overrides = _setting(runner, task, method, factor, value)
        rows = []
        for seed in range(runner.args.seeds):
            cfg = runner.cfg(file, overrides, seed)
            folder = config_lib.run_dir(cfg)
            path = os.path.join(folder, train_lib.CHECKPOINT)
            if not os.path.exists(path):
                continue
            trainer = train_lib.Trainer(cfg)   # its parameters: the run's initialisation
            start = trainer.params
            end = train_lib.read_checkpoint(path)["params"]
            w0 = np.concatenate([np.ravel(np.asarray(start[k]["kernel"])) for k in sorted(start)])
            w1 = np.concatenate([np.ravel(np.asarray(end[k]["kernel"])) for k in sorted(start)])
            curve = _epoch_accuracies(folder)
            both = (w0 != 0) & (w1 != 0)   # an exact 0 has no sign
            rows.append({"sign_flips": float(np.mean(np.sign(w0[both]) != np.sign(w1[both]))),
                         "dead_units": _dead_units(trainer, end),
                         "near_zero": float(np.mean(np.abs(w1) < 1e-3)),
                         "log10_spread_start": _log_range(w0), "log10_spread_end": _log_range(w1),
                         "max_abs_start": float(np.abs(w0).max()), "max_abs_end": float(np.abs(w1).max()),
                         "curve": curve})
        if rows:
            out[label] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]
                          if k not in ("curve", "dead_units")}
            out[label]["dead_units"] = [r["dead_units"] for r in rows]
            out[label]["curves"] = [r["curve"] for r in rows]
    return out


# the runs whose final weights the diagnosis compares, per task: (title, [(label, method, factor,
# value)]), factor None for the task's base pair
WEIGHT_RUNS = {
    "char_lm": ("character LM after 3 epochs at Adam 3e-3", (
        ("GD", "gd", "Adam lr 3e-3 (3 epochs)", "AttnLRP (default)"),
        ("LFP", "lfp", "Adam lr 3e-3 (3 epochs)", "AttnLRP (default)"),
        ("LFP control (−|θ| ⊙ ∇)", "lfp", "Adam lr 3e-3 (3 epochs)", "gradient everywhere (control)"),
        ("LFP, β₂ 0.95", "lfp", "Adam lr 3e-3, β₂ 0.95 (3 epochs)", "AttnLRP (default)"),
        ("LFP, gradient at products, β₂ 0.95", "lfp", "Adam lr 3e-3, β₂ 0.95 (3 epochs)",
         "gradient at products"),
        ("LFP control, β₂ 0.95", "lfp", "Adam lr 3e-3, β₂ 0.95 (3 epochs)",
         "gradient everywhere (control)"),
        ("LFP control, β₂ 0.9", "lfp", "Adam lr 3e-3, β₂ 0.9 (3 epochs)", "gradient everywhere (control)"))),
    "fashion_lenet": ("Fashion-MNIST LeNet after 15 epochs", (
        ("GD, SGD", "gd", None, None), ("LFP, SGD", "lfp", None, None),
        ("GD, Adam 1e-3", "gd", "Adam, learning rate", "0.001"),
        ("LFP, Adam 1e-3", "lfp", "Adam, learning rate", "0.001"))),
}

LOG_BINS = np.linspace(-7, 0.5, 61)   # log10 |θ| histogram bins of the weight diagnosis
KINDS = ("kernels", "biases", "embeddings", "norm scales")


def _kind(path: str) -> str:
    """The kind of a parameter from its path: normalisation scale, bias, embedding or kernel."""
    if "scale" in path:
        return "norm scales"
    if "bias" in path:
        return "biases"
    if "embed" in path or "position" in path:
        return "embeddings"
    return "kernels"


def final_weights(runner, task: str) -> dict:
    """Where a task's parameters end, for the runs of :data:`WEIGHT_RUNS` (every finished seed): per
    parameter kind (:func:`_kind`; the kinds the model has) the share of entries whose magnitude ends
    below 1e-3 and below a tenth of its initial value, and the histogram of ``log10 |θ|`` at the start
    and at the end (bins :data:`LOG_BINS`, exact zeros in the lowest)."""
    import jax

    from experiments import train as train_lib

    metric = TASKS[task][2]

    def flat(params):
        return {jax.tree_util.keystr(p): np.ravel(np.asarray(v))
                for p, v in jax.tree_util.tree_leaves_with_path(params)}

    def hist(w):
        logs = np.log10(np.maximum(np.abs(w), 10.0 ** LOG_BINS[0]))
        return np.histogram(np.clip(logs, LOG_BINS[0], LOG_BINS[-1]), LOG_BINS)[0].tolist()

    out = {}
    for label, method, factor, value in WEIGHT_RUNS[task][1]:
        file, overrides = _setting(runner, task, method, factor, value)
        rows = []
        for seed in range(max(runner.args.seeds, BASE_SEEDS) + 10):   # every finished seed, as _summaries
            cfg = runner.cfg(file, overrides, seed)
            folder = config_lib.run_dir(cfg)
            done = [os.path.join(folder, f) for f in ("summary.json", train_lib.CHECKPOINT)]
            if not all(os.path.exists(f) for f in done):
                continue
            start = flat(train_lib.Trainer(cfg).params)
            end = flat(train_lib.read_checkpoint(os.path.join(folder, train_lib.CHECKPOINT))["params"])
            row = {}
            for kind in KINDS:
                keys = [k for k in start if _kind(k) == kind]
                if not keys:
                    continue
                w0 = np.concatenate([start[k] for k in keys])
                w1 = np.concatenate([end[k] for k in keys])
                row[kind] = {"below_1e-3": float(np.mean(np.abs(w1) < 1e-3)),
                             "below_tenth_of_start": float(np.mean(np.abs(w1) < 0.1 * np.abs(w0))),
                             "median_start": float(np.median(np.abs(w0))),
                             "median_end": float(np.median(np.abs(w1)))}
            every1 = np.concatenate([end[k] for k in start])
            row["all"] = {"below_1e-3": float(np.mean(np.abs(every1) < 1e-3))}
            row["hist_start"], row["hist_end"] = hist(np.concatenate(list(start.values()))), hist(every1)
            with open(done[0]) as f:
                row["metric"] = json.load(f).get(metric, float("nan"))
            rows.append(row)
        if rows:
            kinds = [k for k in (*KINDS, "all") if k in rows[0]]
            out[label] = {kind: {k: float(np.mean([r[kind][k] for r in rows])) for k in rows[0][kind]}
                          for kind in kinds}
            out[label].update(n=len(rows), metric=float(np.mean([r["metric"] for r in rows])),
                              hist_start=np.mean([r["hist_start"] for r in rows], 0).tolist(),
                              hist_end=np.mean([r["hist_end"] for r in rows], 0).tolist())
    return out


def plot_weights(task: str, result: dict, path: str) -> None:
    """The distribution of ``log10 |θ|`` over all parameters at the end of each run (and at the
    start), and the share of each kind of parameter that ends below 1e-3."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4))
    centres = (LOG_BINS[1:] + LOG_BINS[:-1]) / 2
    first = next(iter(result.values()))
    a.plot(centres, first["hist_start"], color="k", ls=":", label="initialisation")
    unit = "bits/char" if TASKS[task][2] == "test_bits_per_char" else "test accuracy"
    for i, (label, r) in enumerate(result.items()):
        shown = f"{r['metric']:.3f}" if unit == "bits/char" else f"{100 * r['metric']:.2f} %"
        a.plot(centres, r["hist_end"], color=f"C{i}", label=f"{label} ({shown} {unit})")
    a.set_yscale("log")
    a.set_xlabel("log10 |θ| (entries below 1e-7 in the first bin)")
    a.set_ylabel("parameter entries")
    a.set_title(f"{WEIGHT_RUNS[task][0]} (mean of seeds)", fontsize=9)
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    kinds = [k for k in KINDS if k in first]
    x = np.arange(len(kinds))
    w = 0.8 / len(result)
    for i, (label, r) in enumerate(result.items()):
        b.bar(x + (i - (len(result) - 1) / 2) * w, [100 * r[k]["below_1e-3"] for k in kinds], w,
              color=f"C{i}", label=label)
    b.set_xticks(x, kinds)
    b.set_ylabel("entries with |θ| < 1e-3 at the end (%)")
    b.grid(alpha=0.3, axis="y")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_range(w: np.ndarray) -> float:
    """How many decades the magnitudes of the nonzero entries span: the 95th minus the 5th percentile
    of ``log10 |w|`` (no floor decides it)."""
    logs = np.log10(np.abs(w[w != 0]))
    return float(np.percentile(logs, 95) - np.percentile(logs, 5))


def _dead_units(trainer, params: dict) -> list[float]:
    """Per hidden layer of a ReLU MLP (``trainer``'s model, on its test set), the share of units that
    are 0 on every test example (a dead unit passes no reward back, so under LFP its incoming weights
    never change again)."""
    _, state = trainer.model.apply({"params": params}, trainer.data.x_test, capture_intermediates=True)
    pre = state["intermediates"]
    hidden = sorted(k for k in pre if k.startswith("Dense_"))[:-1]   # the last Dense is the classifier
    return [float(np.mean(np.asarray(pre[k]["__call__"][0]).max(0) <= 0)) for k in hidden]


def plot_dynamics(result: dict, path: str) -> None:
    """Test accuracy per epoch (mean over seeds) and the weights' sign flips and magnitude spread."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 3.9))
    for i, (label, r) in enumerate(result.items()):
        curves = np.array(r["curves"], float) * 100
        a.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), color=f"C{i}", label=label)
    a.set_xlabel("epoch")
    a.set_ylabel("test accuracy (%)")
    a.set_xscale("log")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    a.set_title("swirls, 100 epochs (mean of seeds)", fontsize=9)
    labels = list(result)
    x = np.arange(len(labels))
    b.bar(x - 0.2, [100 * result[k]["sign_flips"] for k in labels], 0.4, label="kernel signs flipped (%)")
    b2 = b.twinx()
    b2.bar(x + 0.2, [result[k]["log10_spread_end"] for k in labels], 0.4, color="C3",
           label="decades spanned by |w| (5th–95th percentile) at the end")
    b2.axhline(np.mean([result[k]["log10_spread_start"] for k in labels]), color="C3", ls=":",
               label="… at initialisation")
    b.set_xticks(x, labels, fontsize=8)
    b.set_ylabel("signs flipped (%)")
    b2.set_ylabel("decades spanned by |w|")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = b2.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    b.set_title("kernels after 100 epochs, from their initialisation", fontsize=9)
    dead = {k: np.mean(np.array(result[k]["dead_units"], float), 0) * 100 for k in labels}
    layers = len(next(iter(dead.values())))
    for j in range(layers):
        w = 0.8 / layers
        c.bar(x + (j - (layers - 1) / 2) * w, [dead[k][j] for k in labels], w, label=f"hidden layer {j + 1}")
    c.set_xticks(x, labels, fontsize=8)
    c.set_ylabel("dead units (%)")
    c.set_title("units that are 0 on every test example, after 100 epochs", fontsize=9)
    c.legend(fontsize=7)
    c.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    if axes.flat[0].get_legend_handles_labels()[0]:
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
        if task == "swirls":
            results[task]["dynamics"] = dynamics(runner, task)
            if results[task]["dynamics"]:
                plot_dynamics(results[task]["dynamics"], os.path.join(folder, "gaps_swirls_dynamics.png"))
        if task in WEIGHT_RUNS:
            results[task]["weights"] = final_weights(runner, task)
            if results[task]["weights"]:
                plot_weights(task, results[task]["weights"], os.path.join(folder, f"gaps_{task}_weights.png"))
    old = os.path.join(folder, "results.json")
    if os.path.exists(old):  # keep the tasks of earlier invocations (--tasks runs one part at a time)
        with open(old) as f:
            results = {**json.load(f), **results}
    _save(results, "gaps", runner.args)
    return results


# --- transfer learning ----------------------------------------------------------------------------

LOW_DATA, LOW_DATA_EPOCHS = 1000, 20   # the low-data rows: 1000 labelled examples of digits 5-9

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
              {"reward": {"name": "misclassification"}, "init": {"from": None, "reset": []}}),
             *((f"{label}, {LOW_DATA} examples", file, {**over, "data": {"train_examples": LOW_DATA},
                                                         "epochs": LOW_DATA_EPOCHS})
               for label, file, over in (
                   ("LFP fine-tuning", "transfer_finetune_lfp.yaml", {}),
                   ("GD fine-tuning", "transfer_finetune_gd.yaml", {}),
                   ("LFP from scratch", "transfer_finetune_lfp.yaml", {"init": {"from": None, "reset": []}}),
                   ("GD from scratch", "transfer_finetune_gd.yaml", {"init": {"from": None, "reset": []}}))),
             # the discrete rewards from a start that already solves the task in part: the LFP run fine-tuned
             # on 1000 examples (head included), trained on all examples; softmax_loss as the control
             *((f"LFP from the {LOW_DATA}-example fine-tuning, {reward} reward", "transfer_finetune_lfp.yaml",
                {"reward": {"name": reward}, "init": {"reset": []},
                 "from_row": f"LFP fine-tuning, {LOW_DATA} examples"})
               for reward in ("softmax_loss", "correct_class", "misclassification")),
             # the same at a 30x smaller, constant learning rate: is the collapse a matter of step size?
             *((f"LFP from the {LOW_DATA}-example fine-tuning, {reward} reward, lr 1e-3 constant",
                "transfer_finetune_lfp.yaml",
                {"reward": {"name": reward}, "optimizer": {"lr": 1e-3, "schedule": "constant"},
                 "init": {"reset": []}, "from_row": f"LFP fine-tuning, {LOW_DATA} examples"})
               for reward in ("softmax_loss", "correct_class", "misclassification")))


def transfer(runner) -> dict:
    """Pretrain (per seed) by GD on digits 0–4, then every row of :data:`FINE_TUNE` on digits 5–9 from
    that seed's pretrained run."""
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
    dirs: dict[str, list[str]] = {}   # row label → its run folder per seed
    for label, file, over in FINE_TUNE:
        runs = []
        over = dict(over)
        from_row = over.pop("from_row", None)   # start from an earlier row's run of the same seed
        if from_row is not None and from_row not in dirs:
            raise ValueError(f"transfer row {label!r} starts from row {from_row!r}, which is not an "
                             f"earlier row")
        scratch = over.get("init", {}).get("from", "") is None
        for seed, pre in enumerate(pre_dirs):
            extra = config_lib.merge({"name": f"transfer_{_slug(label)}"}, over)
            if from_row is not None:
                extra = config_lib.merge(extra, {"init": {"from": dirs[from_row][seed]}})
            elif not scratch:        # from the pretraining run
                extra = config_lib.merge(extra, {"init": {"from": pre}})
            cfg = runner.cfg(file, extra, seed)
            dirs.setdefault(label, []).append(config_lib.run_dir(cfg))
            got = runner.run(cfg)
            if got is not None:
                runs.append(got)
        if runs:
            results["rows"][label] = aggregate(runs)
            results["rows"][label]["curves"] = [_epoch_accuracies(r["run_dir"]) for r in runs]
    folder = _save(results, "transfer", runner.args)
    plot_transfer(results, os.path.join(folder, "transfer.png"))
    return results


def _epoch_accuracies(run_dir: str) -> list[float]:
    """Test accuracy after each epoch of a run, from its ``metrics.jsonl``."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["test_accuracy"] for line in f if line.strip()]


def plot_transfer(results: dict, path: str) -> None:
    """Test accuracy on digits 5–9 per epoch, mean over seeds: the softmax_loss runs on all training
    examples, on :data:`LOW_DATA` examples, and the discrete rewards."""
    from matplotlib.ticker import MaxNLocator

    rows = list(results["rows"])
    discrete = [k for k in rows if "correct_class" in k or "misclassification" in k or "softmax_loss" in k]
    groups = ([k for k in rows if "examples" not in k and k not in discrete],
              [k for k in rows if "examples" in k and k not in discrete], discrete)
    titles = ("all training examples (softmax_loss)", f"{LOW_DATA} training examples (softmax_loss)",
              "the discrete rewards (all examples)")
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    for ax, labels, title in zip(axes, groups, titles):
        for i, label in enumerate(labels):
            row = results["rows"][label]
            curves = np.array(row["curves"], float) * 100
            style = "--" if "scratch" in label else "-"
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), style, marker="o", ms=3,
                    color=f"C{i}", label=f"{label} ({row['mean'] * 100:.1f} %)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy on digits 5–9 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if labels:
            ax.legend(fontsize=6.5)
    fig.suptitle("LeNet pretrained by gradient descent on MNIST digits 0–4, fine-tuned on 5–9 (solid), "
                 "against training from scratch (dashed); mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
