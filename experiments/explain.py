"""LRP heatmaps of an MNIST LeNet for several presets, or next-character explanations of the
character language model: ``python -m experiments.explain``.

    python -m experiments.explain [--config configs/mnist_lenet_gd.yaml] [--epochs N] [--samples 8]
                                  [--presets attn_lrp,epsilon_plus,...] [--out results/explain]

1. The model: the run of ``--config`` trained by :func:`experiments.train.train`. If the run as
   configured has finished (``runs/<name>/seed<seed>/summary.json``), its checkpoint is used; otherwise
   a short run of ``--epochs`` epochs (default 1; run name ``<name>_<N>ep``) is reused if it exists or
   trained now (with the trainer's progress bars). ``--epochs N`` asks for that run only, ``--retrain``
   trains it again.
2. The samples: ``--samples`` test images, the first of each class in turn (0, 1, 2, ...).
3. The explanations: for each preset, ``lfp_jax.lrp(model, composite)`` jitted, with the true labels as
   targets (output relevance ``one_hot(label) ⊙ logits``); ``--target prediction`` explains the
   predicted class instead.
4. The outputs, in ``--out``: ``heatmaps.png`` (rows: samples; columns: the input, then one heatmap per
   preset, relevance summed over channels and divided by its maximum magnitude per image, see
   :mod:`lfp_jax.plot`) and ``results.json`` (per preset and sample: Σ relevance, the target logit and
   their ratio, which is 1 for a conservative composite without biases or stabilisers).

With the language model's config (``--config configs/gpt_text_gd.yaml``): ``--samples`` held-out
windows of the test text, each ending inside a sentence. For each, the relevance of every character for
the logit of the predicted next character is coloured on the text (:func:`lfp_jax.plot.tokens`),
under the AttnLRP preset unless ``--presets`` says otherwise. The outputs are ``tokens.html``,
``tokens_<preset>.png`` and ``results.json``.

Presets (:mod:`lfp_jax.composites`): ``attn_lrp`` (ε everywhere) and zennit's ``epsilon_plus``,
``epsilon_plus_flat``, ``epsilon_alpha2_beta1``, ``epsilon_alpha2_beta1_flat`` and
``epsilon_gamma_box`` (z^B at the first convolution, bounded by the range the loaders scale images to,
``[-1, 1]``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import lfp_jax
from experiments import config as config_lib
from experiments import data as data_lib
from experiments.train import Trainer, train
from lfp_jax import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "mnist_lenet_gd.yaml")
PRESETS = ("attn_lrp", "epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1",
           "epsilon_alpha2_beta1_flat", "epsilon_gamma_box")


def composite(name: str, low: float, high: float) -> lfp_jax.Composite:
    """The preset ``name`` of :mod:`lfp_jax.composites`; ``epsilon_gamma_box`` bounded by ``[low, high]``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    factory = getattr(lfp_jax.composites, name, None)
    if factory is None:
        raise ValueError(f"preset {name!r} is not in this version of lfp_jax.composites")
    if name == "epsilon_gamma_box":
        return factory(low=low, high=high)
    return factory()


def available_presets() -> list[str]:
    """The presets of :data:`PRESETS` that :mod:`lfp_jax.composites` has."""
    return [p for p in PRESETS if hasattr(lfp_jax.composites, p)]


def pick_samples(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` samples: the first of class 0, of class 1, ..., then the second of each, and so
    on (classes in order of their labels; all of them if fewer)."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [idx[k] for k in range(max(len(i) for i in per_class)) for idx in per_class if k < len(idx)]
    return np.asarray(order[:n], dtype=np.int64)


def _finished(cfg: dict) -> bool:
    out = config_lib.run_dir(cfg)
    return os.path.exists(os.path.join(out, "summary.json")) and os.path.exists(
        os.path.join(out, "checkpoint.msgpack"))


def trained_model(cfg: dict, epochs: int | None, *, retrain: bool = False, progress: bool = True,
                  dataset: data_lib.Dataset | None = None) -> tuple[Trainer, dict]:
    """A trainer holding the trained parameters of ``cfg``'s run (reused or trained), and the run's summary.

    ``epochs=None``: the run as configured if it has finished, else a 1-epoch run. ``epochs=N``: the
    run with ``N`` epochs (named ``<name>_<N>ep`` unless ``N`` is the configured number).
    """
    if dataset is None:
        d = cfg["data"]
        dataset = data_lib.load(d["name"], root=d.get("root"), seed=cfg["seed"], **(d.get("options") or {}))
    if epochs is None and _finished(cfg) and not retrain:
        chosen = dict(cfg)
    else:
        n = 1 if epochs is None else int(epochs)
        chosen = dict(cfg)
        if n != cfg["epochs"]:
            chosen["epochs"], chosen["name"] = n, f"{cfg['name']}_{n}ep"
    out = config_lib.run_dir(chosen)
    if _finished(chosen) and not retrain:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        if progress:
            print(f"reusing {out} (test accuracy {summary['test_accuracy']:.4f})")
    else:
        if progress:
            print(f"training {chosen['name']} ({chosen['method']}, {chosen['epochs']} epochs) into {out}")
        summary = train(chosen, progress=progress, dataset=dataset)
    trainer = Trainer(chosen, dataset, fresh=False)
    trainer.load_checkpoint(os.path.join(out, "checkpoint.msgpack"))
    return trainer, summary


def model_fn(trainer: Trainer):
    """``f(params, x) -> logits`` of the trainer's model in evaluation mode (BatchNorm statistics, if any,
    closed over as constants)."""
    model, batch_stats = trainer.model, trainer.batch_stats

    def f(params, x):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
        return model.apply(variables, x, train=False)

    return f


def explain(trainer: Trainer, x: np.ndarray, y: np.ndarray, presets, target: str = "label",
            low: float = -1.0, high: float = 1.0) -> tuple[np.ndarray, dict, dict]:
    """``(logits, relevance by preset, report)`` of the trainer's model for inputs ``x`` with labels ``y``
    (see :func:`relevance_by_preset`); ``target="prediction"`` explains the predicted classes."""
    if trainer.spiking or trainer.compute_dtype != jnp.float32:
        raise ValueError("explain needs a float32 model with logits outputs (not spiking, not bfloat16)")
    logits = np.asarray(trainer.predict(trainer.params, trainer.batch_stats, jnp.asarray(x, jnp.float32),
                                        trainer.eval_key))
    if target == "label":
        t = np.asarray(y, np.int32)
    elif target == "prediction":
        t = logits.argmax(-1).astype(np.int32)
    else:
        raise ValueError(f"target must be 'label' or 'prediction', got {target!r}")
    relevance, report = relevance_by_preset(model_fn(trainer), trainer.params, x, t, presets, low, high)
    return logits, relevance, report


def relevance_by_preset(fun, params, x: np.ndarray, targets: np.ndarray, presets, low: float = -1.0,
                        high: float = 1.0) -> tuple[dict, dict]:
    """LRP relevance of ``fun(params, x)`` for the classes ``targets``, one jitted
    ``lfp_jax.lrp(fun, composite)`` per preset: ``(relevance by preset, report)``.

    The report holds, per preset: the composite's name, seconds of the first (compiling) and of a second
    call, and per sample Σ relevance, the target logit, their ratio and the positive share of ``Σ|R|``.
    """
    x = jnp.asarray(x, jnp.float32)
    t = np.asarray(targets, np.int32)
    relevance, report = {}, {}
    for name in presets:
        comp = composite(name, low, high)
        g = jax.jit(lfp_jax.lrp(fun, comp, argnums=1))
        t0 = time.perf_counter()
        out, r = jax.block_until_ready(g(params, x, target=jnp.asarray(t)))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(g(params, x, target=jnp.asarray(t)))
        second = time.perf_counter() - t0
        r = np.asarray(r, np.float64)
        flat = r.reshape(len(r), -1)
        total = flat.sum(axis=1)
        logit = np.asarray(out, np.float64)[np.arange(len(t)), t]
        relevance[name] = r
        report[name] = {
            "composite": comp.name,
            "seconds_first_call": round(first, 3),
            "seconds": round(second, 4),
            "relevance_sum": [float(v) for v in total],
            "target_logit": [float(v) for v in logit],
            "sum_over_logit": [float(a / b) if b != 0 else None for a, b in zip(total, logit)],
            "positive_fraction": [float(v) for v in
                                  np.clip(flat, 0, None).sum(1) / np.maximum(np.abs(flat).sum(1), 1e-30)],
        }
    return relevance, report


def pick_sentences(x_test: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` held-out windows that end inside a sentence, after at least 20 characters of it
    (the explained next character then has a sentence to rest on), spread over the test text."""
    texts = [data_lib.decode_text(w) for w in x_test]
    good = [i for i, t in enumerate(texts)
            if len(t.rstrip()) == len(t) and "\n" not in t[-20:] and "." not in t[-20:] and t[-1].isalpha()]
    good = good or list(range(len(texts)))
    return np.asarray([good[k * len(good) // n] for k in range(n)], dtype=np.int64)


def explain_text(trainer: Trainer, summary: dict, samples: int, presets, out_dir: str, cmap: str,
                 level: float | None, progress: bool) -> dict:
    """Next-character explanations of a character language model: for held-out windows, the relevance
    of each character for the logit of the predicted next character (``lfp_jax.targets.token`` at the
    last position), one jitted ``lfp_jax.lrp`` per preset. Writes ``tokens.html`` (every sample and
    preset), ``tokens_<preset>.png`` (the first sample under one preset) and ``results.json``."""
    from experiments.models import encode_inputs

    data = trainer.data
    idx = pick_sentences(data.x_test, samples)
    ids = jnp.asarray(data.x_test[idx])
    x = encode_inputs(trainer.model, ids, trainer.eval_key)            # one-hot characters (B, T, V)
    fun = model_fn(trainer)
    logits = fun(trainer.params, x)
    predicted = jnp.argmax(logits[:, -1], axis=-1)
    target = lfp_jax.targets.token(logits, predicted, position=-1)
    os.makedirs(out_dir, exist_ok=True)
    report, pages = {}, []
    for name in presets:
        _, r = jax.jit(lfp_jax.lrp(fun, composite(name, -1.0, 1.0)))(trainer.params, x, target=target)
        per_char = np.asarray(r, np.float64).sum(-1)                   # (B, T): one value per character
        maps = []
        for b in range(len(idx)):
            chars = list(data_lib.decode_text(np.asarray(ids[b])))
            nxt = data_lib.decode_text([int(predicted[b])])
            truth = data_lib.decode_text([int(data.y_test[idx[b], -1])])
            maps.append(plot.tokens(chars, per_char[b], explained=nxt, cmap=cmap, level=level,
                                    title=f"{name}: why {nxt!r} next? (held-out text; the next character "
                                          f"is {truth!r}; logit {float(logits[b, -1, predicted[b]]):.2f})"))
        png = os.path.join(out_dir, f"tokens_{name}.png")
        maps[0].save(png)
        pages.extend(m.to_html() for m in maps)
        report[name] = {"png": png, "relevance_sum": [float(v) for v in per_char.sum(1)],
                        "target_logit": [float(logits[b, -1, predicted[b]]) for b in range(len(idx))]}
    html_path = os.path.join(out_dir, "tokens.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write('<!DOCTYPE html><html><head><meta charset="utf-8"><title>next-character explanations</title>'
                '</head><body style="max-width:50em;margin:1em auto">'
                + "<hr>".join(pages) + "</body></html>")
    result = {"model": {k: summary[k] for k in ("name", "method", "dataset", "model", "epochs", "run_dir")},
              "samples": [int(i) for i in idx], "predictions": data_lib.decode_text(np.asarray(predicted)),
              "presets": report, "html": html_path}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    if progress:
        for name, rep in report.items():
            print(f"{name}: Σ R / logit = "
                  + ", ".join(f"{a / b:.3f}" for a, b in zip(rep["relevance_sum"], rep["target_logit"])))
        print(f"wrote {html_path} and {', '.join(r['png'] for r in report.values())}")
    print(json.dumps({"html": html_path, "presets": list(report), "samples": len(idx)}))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the training run (a YAML file in configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set seed=1 (repeatable)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train (or reuse) a run of this many epochs; default: the configured run if "
                             "finished, else 1 epoch")
    parser.add_argument("--retrain", action="store_true", help="train the run again even if it exists")
    parser.add_argument("--samples", type=int, default=8, help="number of test images (rows)")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated presets (default all: {','.join(PRESETS)})")
    parser.add_argument("--target", choices=("label", "prediction"), default="label",
                        help="class whose logit is explained")
    parser.add_argument("--cmap", default="bwr", help="colour map: bwr, coldnhot or any matplotlib name")
    parser.add_argument("--level", type=float, default=None,
                        help="normalise by this percentile of |relevance| instead of its maximum")
    parser.add_argument("--out", default=os.path.join("results", "explain"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p not in PRESETS:
            parser.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
        if not hasattr(lfp_jax.composites, p):
            parser.error(f"preset {p!r} is not in this version of lfp_jax.composites; available: "
                         f"{', '.join(available_presets())}")
    progress = not args.no_progress
    cfg = config_lib.load(args.config, args.set)
    try:
        trainer, summary = trained_model(cfg, args.epochs, retrain=args.retrain, progress=progress)
    except data_lib.DatasetNotFound as e:
        raise SystemExit(f"dataset not available: {e}") from None
    if cfg["model"]["name"] == "gpt":    # a character language model: next-character explanations
        text_presets = presets if args.presets != ",".join(PRESETS) else ["attn_lrp"]
        return explain_text(trainer, summary, args.samples, text_presets, args.out, args.cmap, args.level,
                            progress)
    data = trainer.data
    idx = pick_samples(data.y_test, args.samples)
    x, y = data.x_test[idx], data.y_test[idx]
    # z^B's bounds: the range the loaders scale images to, [-1, 1] (widened if the data go beyond it).
    low, high = min(-1.0, float(data.x_test.min())), max(1.0, float(data.x_test.max()))
    logits, relevance, report = explain(trainer, x, y, presets, args.target, low, high)
    pred = logits.argmax(-1)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "heatmaps.png")
    plot.grid(x, relevance, png, titles=[f"label {a} · pred {b}" for a, b in zip(y, pred)], cmap=args.cmap,
              level=args.level,
              title=f"LRP of the {args.target} logit: {cfg['model']['name']} trained by {summary['method']} "
                    f"({summary['epochs']} ep, test acc {100 * summary['test_accuracy']:.2f} %)")
    result = {
        "model": {k: summary[k] for k in ("name", "method", "dataset", "model", "epochs", "test_accuracy",
                                          "run_dir")},
        "target": args.target,
        "samples": [int(i) for i in idx],
        "labels": [int(v) for v in y],
        "predictions": [int(v) for v in pred],
        "input_bounds": [low, high],
        "presets": report,
        "heatmaps": png,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    if progress:
        print(f"\n{'preset':<28} {'Σ R / logit (mean, min..max)':>32} {'seconds':>8}")
        for name, rep in report.items():
            ratios = np.array([v for v in rep["sum_over_logit"] if v is not None])
            stats = f"{ratios.mean():.4f} ({ratios.min():.3f}..{ratios.max():.3f})" if ratios.size else "-"
            print(f"{name:<28} {stats:>32} {rep['seconds']:>8.4f}")
        print(f"wrote {png}")
    print(json.dumps({"heatmaps": png, "presets": list(report), "samples": len(idx)}))
    return result


if __name__ == "__main__":
    main()
