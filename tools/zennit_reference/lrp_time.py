"""LRP explanation time of zennit 0.5.1 (PyTorch) on the CNN of ``benchmarks/lrp_cpu.py``.

NOT part of lfp_jax: it runs in the separate reference environment (CPU PyTorch + zennit 0.5.1, e.g.
``/tmp/vref``; see ``tools/lfprop_reference/make_fixtures.py`` for how it is made, zennit installed
with ``--no-deps``) and writes a JSON file that ``python -m benchmarks.lrp_cpu`` reads, if present,
to print one table with both frameworks::

    /tmp/vref/bin/python tools/zennit_reference/lrp_time.py [--batch 64] [--repeats 30]
        [--json benchmarks/results/lrp_zennit_cpu.json]

The CNN (NCHW, float32): conv 1→16 5x5, ReLU, 2x2 max pool, conv 16→32 5x5, ReLU, 2x2 max pool,
flatten, Linear 512→120, ReLU, Linear 120→10, biases, PyTorch's default initialisation
(``torch.manual_seed(0)``); inputs uniform in [0, 1), 28x28x1; labels uniform over the 10 classes;
``torch.set_num_threads(2)``. Timed alternately, medians of ``--repeats`` calls each (and at least
``--min-seconds`` in all):

* ``forward``: the model under ``torch.no_grad()`` (context);
* ``grad``: forward + ``torch.autograd.grad`` of the target logits with respect to the input (the
  plain input gradient; ``grad_outputs = one_hot(labels)``);
* ``zennit ε``: ``zennit.attribution.Gradient`` with a ``LayerMapComposite`` giving ``Epsilon`` to
  ``Convolution`` and ``Linear`` (and zennit's base map: ``Pass`` on activations), output relevance
  ``one_hot(labels) ⊙ logits`` (what ``lfp_jax.lrp(..., target=labels)`` starts from);
* ``zennit EpsilonPlus``: the same with ``zennit.composites.EpsilonPlus()`` (z⁺ on convolutions, ε on
  linear layers).

Each composite is registered once, on its own copy of the model, for the whole run (as a user
explaining many batches with one ``with attributor:`` block does); max pooling has no rule in zennit,
so its gradient (winner takes all) passes. ``first_ms`` is each method's first call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata as md
import json
import os
import platform
import sys
import time
import types

import numpy as np
import torch
from torch import nn


def _ensure_torchvision() -> None:
    """zennit imports two ResNet blocks from torchvision at import time (``zennit/torchvision.py``) and
    uses them only to canonize ResNets; register a two-name in-memory stand-in when torchvision is
    absent (nothing is written to disk)."""
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass
    resnet = types.ModuleType("torchvision.models.resnet")
    for name in ("BasicBlock", "Bottleneck"):
        setattr(resnet, name, type(name, (nn.Module,), {}))
    models = types.ModuleType("torchvision.models")
    models.resnet = resnet
    models.__path__ = []
    tv = types.ModuleType("torchvision")
    tv.models = models
    tv.__path__ = []
    sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": resnet})


_ensure_torchvision()

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonPlus, LayerMapComposite, layer_map_base  # noqa: E402
from zennit.rules import Epsilon  # noqa: E402
from zennit.types import Convolution  # noqa: E402

METHODS = ("forward", "grad", "zennit_epsilon", "zennit_epsilon_plus")
LABELS = {"forward": "forward (context)", "grad": "torch autograd input gradient",
          "zennit_epsilon": "zennit Gradient, ε everywhere",
          "zennit_epsilon_plus": "zennit Gradient, EpsilonPlus"}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 120), nn.ReLU(), nn.Linear(120, 10))


def epsilon_everywhere(epsilon: float = 1e-6) -> LayerMapComposite:
    """``EpsilonPlus`` with ``Epsilon`` in place of ``ZPlus`` on convolutions."""
    return LayerMapComposite(layer_map_base(epsilon) + [(Convolution, Epsilon(epsilon)),
                                                        (nn.Linear, Epsilon(epsilon))])


def bench(batch: int, repeats: int, min_seconds: float) -> dict:
    torch.manual_seed(0)
    model = cnn().eval()
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    onehot = nn.functional.one_hot(y, 10).to(x.dtype)
    relevance_out = lambda out: onehot * out  # noqa: E731  (what lfp_jax.lrp(target=labels) starts from)
    attributors = {"zennit_epsilon": Gradient(copy.deepcopy(model), epsilon_everywhere()),
                   "zennit_epsilon_plus": Gradient(copy.deepcopy(model), EpsilonPlus())}

    def forward():
        with torch.no_grad():
            return model(x)

    def grad():
        inputs = x.detach().requires_grad_(True)
        out = model(inputs)
        return out, torch.autograd.grad((out,), (inputs,), grad_outputs=(onehot,))[0]

    fns = {"forward": forward, "grad": grad}
    for name, attributor in attributors.items():
        fns[name] = (lambda a: lambda: a(x, relevance_out))(attributor)

    first: dict[str, float] = {}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with contextlib.ExitStack() as stack:
        for attributor in attributors.values():
            stack.enter_context(attributor)  # registers the composite's hooks once
        for m in METHODS:
            t = time.perf_counter()
            fns[m]()
            first[m] = time.perf_counter() - t
        for _ in range(3):
            for m in METHODS:
                fns[m]()
        start = time.perf_counter()
        i = 0
        while i < 5 or i < repeats or time.perf_counter() - start < min_seconds:
            i += 1
            for m in METHODS:
                t = time.perf_counter()
                fns[m]()
                times[m].append(time.perf_counter() - t)
    med = {m: float(np.median(v)) for m, v in times.items()}
    rows = [{"framework": "torch", "method": m, "label": LABELS[m], "batch": batch, "ms": 1e3 * med[m],
             "ratio_to_grad": med[m] / med["grad"], "first_ms": 1e3 * first[m], "repeats": len(times[m]),
             "q25_ms": 1e3 * float(np.quantile(times[m], 0.25)),
             "q75_ms": 1e3 * float(np.quantile(times[m], 0.75))}
            for m in METHODS]
    return {"rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per method (at least)")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="time for at least this long")
    parser.add_argument("--threads", type=int, default=2)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--json", default=os.path.join(root, "benchmarks", "results", "lrp_zennit_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    result = bench(args.batch, args.repeats, args.min_seconds)
    result["environment"] = {
        "torch": torch.__version__, "zennit": md.version("zennit"), "threads": torch.get_num_threads(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
        "date": datetime.date.today().isoformat(), "loadavg_before": load,
        "loadavg_after": os.getloadavg()}
    print("| method | batch | median ms | / torch grad | first call ms |\n|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['label']} | {r['batch']} | {r['ms']:.2f} | {r['ratio_to_grad']:.2f} | "
              f"{r['first_ms']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
