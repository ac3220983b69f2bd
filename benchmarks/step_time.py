"""LFP step against gradient step: median step time, first call, peak memory.

    python -m benchmarks.step_time [--models mlp,lenet,cifar_vgg,resnet18,snn_mlp,snn_cnn,vit,gpt,
        llama,gemma,bert,llama_bf16,gemma_bf16,bert_bf16]
        [--batch 128] [--steps 30] [--min-seconds 10] [--max-seconds 240] [--json out.json]
        [--reference-python /path/to/python]

For each model, a jitted LFP training step (``lfp_jax.lfp_value_and_grad`` + optax SGD with momentum)
and a jitted ``jax.grad`` step of the batch-mean cross-entropy with the same optimiser (spiking
models: surrogate-gradient descent, see :func:`_steps`) are timed *alternately* in one process (so
both see the same machine state), ``--steps`` times each and for at least ``--min-seconds`` (fast
models: many more steps), at most ``--max-seconds`` (at least 5 each). The table shows:

* the median step times and their ratio LFP / grad;
* the first call (trace + lower + compile + one run), measured twice per method in the order
  LFP, grad, grad, LFP on fresh functions, keeping each method's faster one;
* memory: arguments + outputs + temporaries of each compiled executable (XLA's memory analysis);
* with ``--reference-python``, the reference implementation's (lfprop, PyTorch) LFP and gradient step
  on the same shapes, run by ``tools/lfprop_reference/step_time.py`` in that interpreter.

Language models as people write them (:mod:`benchmarks.language_models`: token ids looked up in an
``nn.Embed`` table): ``llama``, ``gemma`` and ``bert``, width 256, 4 layers, 8 heads, sequence 128,
vocabulary 1024, at their own batch of 16; ``_bf16`` after the name computes in
bfloat16 with bfloat16 parameters. The reward and the loss cover every position (next token for the
decoders, the token itself for BERT's masked-language-model head).

The transformers (``vit``: MNIST-sized ViT; ``gpt``: the character decoder with context 64 over 96
symbols) and the language models get a second table: ``lfp_jax.lrp`` (AttnLRP relevance of the input,
per token for token ids) against ``jax.grad`` of the target logits with respect to the input (for
token ids: with respect to the token embedding table alone, the input's only differentiable
representation).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lfp_jax
from benchmarks import language_models
from experiments import models

SHAPES = {"mlp": (28, 28, 1), "lenet": (28, 28, 1), "cifar_vgg": (32, 32, 3), "resnet": (32, 32, 3),
          "resnet18": (32, 32, 3), "snn_mlp": (28, 28, 1), "snn_cnn": (28, 28, 1), "vit": (28, 28, 1),
          "gpt": (64,)}
CLASSES = {"gpt": 96}  # the GPT decoder's vocabulary; every other model: 10 classes
REFERENCE_MODELS = {"mlp", "lenet"}
LANGUAGE_MODELS = tuple(n + dt for n in language_models.MODELS for dt in ("", "_bf16"))
SHAPES.update({name: (language_models.SIZE["seq"],) for name in LANGUAGE_MODELS})


def _language_model(name: str):
    """The language model of a row name (``llama``, ``gemma_bf16``, ...), its ``fun(params, ids)``,
    parameters, inputs and labels."""
    base, _, dtype = name.partition("_")
    model = language_models.build(base, jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    ids = language_models.batch(jax.random.key(2))
    x, y = ids[:, :-1], (ids[:, :-1] if base == "bert" else ids[:, 1:])
    params = language_models.init(model, jax.random.key(0), x)
    return (lambda p, x: model.apply({"params": p}, x)), params, x, y


def _steps(name: str, batch: int):
    """Parameters, optimiser state, a batch, and the LFP and gradient training steps of one model.

    Spiking models (T = 15): the LFP step uses the true Heaviside and the reference's rate-coded
    reward; the gradient step the same network with the arc-tangent surrogate and the cross-entropy
    rate loss (surrogate-gradient descent, the baseline LFP is compared with).
    """
    if name in LANGUAGE_MODELS:
        return _language_model_steps(name)
    spiking = name in models.SPIKING
    model = models.build(name, CLASSES.get(name, 10))
    grad_model = models.build(name, 10, surrogate="atan") if spiking else model
    x, y = _batch(name, model, batch)
    variables = model.init(jax.random.key(0), x)
    params, stats = variables["params"], variables.get("batch_stats")
    opt = optax.sgd(0.01, momentum=0.9)
    key = jax.random.key(1)

    def apply(m, p, x):
        v = {"params": p} if stats is None else {"params": p, "batch_stats": stats}
        kw = {"mutable": ["batch_stats"]} if stats is not None else {}
        return m.apply(v, x, train=True, rngs={"dropout": key}, **kw)

    fun = functools.partial(apply, model)
    has_aux = stats is not None
    reward = lfp_jax.rewards.spike_rate_coded if spiking else lfp_jax.rewards.softmax_loss
    lfp = lfp_jax.lfp_value_and_grad(fun, reward, reward_argnums=(2,), has_aux=has_aux, allow_frozen=True)

    def loss(p, x, y):
        out = apply(grad_model, p, x)
        z = out[0] if has_aux else out
        if spiking:
            return models.ce_rate_loss(z, y)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    return (params, opt.init(params), x, y) + _optimiser_steps(opt, lambda p, x, y: lfp(p, x, y)[1],
                                                                jax.grad(loss))


def _optimiser_steps(opt, lfp_direction, grad):
    """The LFP and gradient training steps ``(p, s, x, y) -> (p, s)``: the same optimiser applied to
    ``lfp_direction(p, x, y)`` (``-feedback``) and to ``grad(p, x, y)``."""

    def lfp_step(p, s, x, y):
        u, s = opt.update(lfp_direction(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    def grad_step(p, s, x, y):
        u, s = opt.update(grad(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    return lfp_step, grad_step


def _language_model_steps(name: str):
    """:func:`_steps` for a language model: LFP against the mean cross-entropy over every position."""
    fun, params, x, y = _language_model(name)
    opt = optax.sgd(0.01, momentum=0.9)
    lfp = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                     allow_frozen=True)

    def loss(p, x, y):
        z = fun(p, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    return (params, opt.init(params), x, y) + _optimiser_steps(opt, lambda p, x, y: lfp(p, x, y)[1],
                                                                jax.grad(loss))


def _batch(name: str, model, batch: int):
    """Inputs and labels of one batch: images and class labels, or one-hot text and next characters."""
    if name == "gpt":
        tokens = jax.random.randint(jax.random.key(2), (batch, *SHAPES[name]), 0, CLASSES[name])
        return models.encode_inputs(model, tokens, None), tokens
    return jnp.ones((batch, *SHAPES[name]), jnp.float32), jnp.zeros((batch,), jnp.int32)


def bench_lrp(name: str, batch: int, steps: int) -> dict:
    """``lfp_jax.lrp`` (AttnLRP input relevance, one backward pass) against ``jax.grad`` of the target
    logits with respect to the input, both jitted, timed alternately."""
    table = None
    if name in LANGUAGE_MODELS:
        fun, params, x, y = _language_model(name)
        batch = x.shape[0]
        table = language_models.TOKEN_TABLES[name.partition("_")[0]]
    else:
        model = models.build(name, CLASSES.get(name, 10))
        x, y = _batch(name, model, batch)
        params = model.init(jax.random.key(0), x)["params"]
        fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    explain = jax.jit(lambda p, x, y: lfp_jax.lrp(fun)(p, x, target=y)[1])

    def target_logits(p, x, y):
        z = fun(p, x)
        return jnp.sum(jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) * z)

    if table is not None:  # token ids have no gradient: the gradient with respect to the token embedding
        # table stands in (the input's representation; the other parameters' gradients are not computed)
        def of_table(embedding, p, x, y):
            return target_logits({**p, table: {"embedding": embedding}}, x, y)

        table_grad = jax.jit(jax.grad(of_table))
        grad = lambda p, x, y: table_grad(p[table]["embedding"], p, x, y)  # noqa: E731
    else:
        grad = jax.jit(jax.grad(target_logits, argnums=1))
    times = {"lrp": [], "grad": []}
    for fn in (explain, grad):
        jax.block_until_ready(fn(params, x, y))
    for _ in range(max(steps, 5)):
        for label, fn in (("lrp", explain), ("grad", grad)):
            t = time.perf_counter()
            jax.block_until_ready(fn(params, x, y))
            times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"model": name, "batch": batch, "lrp_ms": 1e3 * med["lrp"], "grad_ms": 1e3 * med["grad"],
            "ratio": med["lrp"] / med["grad"]}


LRP_MODELS = ("vit", "gpt") + LANGUAGE_MODELS


def _first_call(step, *args):
    t = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return compiled, time.perf_counter() - t


def _peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # pragma: no cover - backend dependent
        return None


def bench(name: str, batch: int, steps: int, max_seconds: float = float("inf"),
          min_seconds: float = 0.0) -> dict:
    first: dict[str, list[float]] = {"lfp": [], "grad": []}
    compiled = {}
    for label in ("lfp", "grad", "grad", "lfp"):
        p, s, x, y, lfp_step, grad_step = _steps(name, batch)  # fresh functions: nothing cached
        compiled[label], seconds = _first_call(lfp_step if label == "lfp" else grad_step, p, s, x, y)
        first[label].append(seconds)
    lfp_first, grad_first = min(first["lfp"]), min(first["grad"])
    lfp_c, grad_c = compiled["lfp"], compiled["grad"]
    times = {"lfp": [], "grad": []}
    start = time.perf_counter()
    i = 0
    while True:  # `steps` pairs, more while under `min_seconds` (sub-millisecond steps are noisy)
        elapsed = time.perf_counter() - start
        if i >= 5 and (elapsed > max_seconds or (i >= steps and elapsed > min_seconds)):
            break
        i += 1
        for label, c in (("lfp", lfp_c), ("grad", grad_c)):
            t = time.perf_counter()
            jax.block_until_ready(c(p, s, x, y))
            times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    mem = {"lfp": _peak_bytes(lfp_c), "grad": _peak_bytes(grad_c)}
    return {
        "model": name, "batch": int(x.shape[0]), "device": jax.devices()[0].device_kind,
        "steps": len(times["lfp"]),
        "lfp_ms": 1e3 * med["lfp"], "grad_ms": 1e3 * med["grad"], "ratio": med["lfp"] / med["grad"],
        "lfp_first_s": lfp_first, "grad_first_s": grad_first, "first_ratio": lfp_first / grad_first,
        "lfp_bytes": mem["lfp"], "grad_bytes": mem["grad"],
        "memory_ratio": (mem["lfp"] / mem["grad"]) if mem["lfp"] and mem["grad"] else None,
    }


def environment() -> dict:
    """Where a benchmark ran: the JAX version, backend and device, the CPU count, the date."""
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "date": datetime.date.today().isoformat()}


def reference(python: str, models: list[str], batch: int, steps: int) -> dict[str, dict]:
    """The reference implementation's step times, from ``tools/lfprop_reference/step_time.py``."""
    wanted = [m for m in models if m in REFERENCE_MODELS]
    if not wanted:
        return {}
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "tools", "lfprop_reference", "step_time.py")
    done = subprocess.run([python, script, "--models", ",".join(wanted), "--batch", str(batch),
                           "--steps", str(steps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the reference run failed ({python} {script}):\n{done.stderr[-2000:]}")
    return {r["model"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (what the README shows)."""
    has_ref = any("ref_lfp_ms" in r for r in rows)
    head = ("| model | batch | LFP ms | grad ms | LFP/grad | first call LFP s | first call grad s | first "
            "ratio | memory ratio |")
    if has_ref:
        head += " reference LFP ms | reference grad ms | reference LFP/grad |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] else "n/a"
        line = (f"| {r['model']} | {r['batch']} | {r['lfp_ms']:.2f} | {r['grad_ms']:.2f} | "
                f"{r['ratio']:.2f} | {r['lfp_first_s']:.2f} | {r['grad_first_s']:.2f} | "
                f"{r['first_ratio']:.2f} | {mem} |")
        if has_ref:
            if "ref_lfp_ms" in r:
                line += (f" {r['ref_lfp_ms']:.2f} | {r['ref_grad_ms']:.2f} | "
                         f"{r['ref_lfp_ms'] / r['ref_grad_ms']:.2f} |")
            else:
                line += " – | – | – |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet,cifar_vgg,resnet18,snn_mlp,snn_cnn,vit,gpt," +
                        ",".join(LANGUAGE_MODELS),
                        help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (at least)")
    parser.add_argument("--max-seconds", type=float, default=240.0,
                        help="stop timing a model after this long (at least 5 steps each)")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="time fast models for at least this long (more than --steps pairs)")
    parser.add_argument("--json", default=None, help="write the rows (and the environment) here")
    parser.add_argument("--reference-python", default=None,
                        help="python of an environment with torch and lfprop: also time the reference")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(SHAPES)}")
    rows = []
    for m in models:
        rows.append(bench(m, args.batch, args.steps, args.max_seconds, args.min_seconds))
        print(f"{m}: LFP {rows[-1]['lfp_ms']:.2f} ms, grad {rows[-1]['grad_ms']:.2f} ms", flush=True)
    if args.reference_python:
        ref = reference(args.reference_python, models, args.batch, args.steps)
        for r in rows:
            r.update({k: v for k, v in ref.get(r["model"], {}).items() if k.startswith("ref_") or k in
                      ("torch", "threads")})
    print(table(rows))
    lrp_rows = [bench_lrp(m, args.batch, args.steps) for m in models if m in LRP_MODELS]
    if lrp_rows:
        print("\n| model | batch | lrp ms | jax.grad (input) ms | lrp/grad |\n|---|---|---|---|---|")
        for r in lrp_rows:
            print(f"| {r['model']} | {r['batch']} | {r['lrp_ms']:.2f} | {r['grad_ms']:.2f} | "
                  f"{r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows, "lrp_rows": lrp_rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
