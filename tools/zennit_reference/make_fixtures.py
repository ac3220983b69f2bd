"""Generate reference LRP input relevance with zennit 0.5.1 (PyTorch), the classic-LRP library.

This script is NOT part of lfp_jax and is never imported by it or by the test suite. It needs a
separate virtual environment with CPU PyTorch and zennit; neither is a dependency of lfp_jax. Only the
``.npz`` files it writes are used by the tests (``tests/data/zennit/<net>.npz``).

Recreate the environment and run it (from the repository root)::

    python3.11 -m venv /tmp/vref
    /tmp/vref/bin/pip install torch==2.13.0 "zennit>=0.5.1,<0.6"     # CPU wheel
    /tmp/vref/bin/python tools/zennit_reference/make_fixtures.py [OUTDIR]

Three small float64 networks (``torch.manual_seed``, PyTorch's default initialisation, biases on):

* ``mlp``: Linear 12→10, ReLU, Linear 10→8, ReLU, Linear 8→4; inputs of both signs, a third of them
  exactly 0.
* ``cnn``: Conv 2→4 3x3 (padding 1), ReLU, 2x2 max pooling, Conv 4→6 3x3, ReLU, 2x2 average pooling,
  flatten, Linear 24→10, ReLU, Linear 10→3; images in [0, 1] with 40 % black pixels (exact 0).
* ``bn``: Conv 2→4 3x3 (padding 1), BatchNorm, ReLU, 2x2 max pooling, Conv 4→5 3x3, BatchNorm, ReLU,
  flatten, Linear 80→8, BatchNorm1d, ReLU, Linear 8→3, in eval mode with random running statistics
  and affine parameters (some scales negative). zennit merges each BatchNorm into the layer before it
  (``SequentialMergeBatchNorm``); after merging, its BatchNorm modules still divide by
  ``sqrt(1 + eps)``, so the nets use ``eps = 1e-10`` to keep that artefact below the tolerance.

For every net, relevance is computed with ``zennit.attribution.Gradient`` for a random output
relevance (both signs) under (a) every rule alone on all linear layers (``Linear`` and ``Conv``),
with ``Pass`` at activations and ``Norm`` at average pooling, and (b) zennit's presets
``EpsilonPlus``, ``EpsilonPlusFlat``, ``EpsilonAlpha2Beta1``, ``EpsilonAlpha2Beta1Flat`` and
``EpsilonGammaBox``. Written per net: ``x``, ``target`` (output relevance), ``logits``,
``param/<module>.<name>`` (torch layouts: Linear ``(out, in)``, Conv ``OIHW``), ``bn/<module>.<name>``
(running statistics), ``bn_eps``, ``relevance/<case>``, ``low``, ``high`` (z^B bounds), versions.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import types

import numpy as np
import torch
from torch import nn


def _stub_torchvision() -> None:
    """zennit imports torchvision at start-up for its ResNet canonizers only (unused here); PyPI's
    torchvision wheels do not load next to the CPU build of torch, so stand in for the two classes."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    models = types.ModuleType("torchvision.models")
    models.resnet = resnet
    root = types.ModuleType("torchvision")
    root.models = models
    sys.modules.update({"torchvision": root, "torchvision.models": models,
                        "torchvision.models.resnet": resnet})


_stub_torchvision()

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
)
from zennit.layer import Sum  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus  # noqa: E402
from zennit.types import Activation, AvgPool, BatchNorm, Linear  # noqa: E402

DTYPE = torch.float64
BN_EPS = 1e-10


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 3))


def bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, eps=BN_EPS), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, eps=BN_EPS), nn.ReLU(),
        nn.Flatten(), nn.Linear(80, 8), nn.BatchNorm1d(8, eps=BN_EPS), nn.ReLU(), nn.Linear(8, 3))


def inputs(name: str, gen: torch.Generator) -> torch.Tensor:
    if name == "mlp":
        x = torch.randn(5, 12, generator=gen, dtype=DTYPE)
        x[torch.rand(5, 12, generator=gen) < 1 / 3] = 0.0
        return x
    x = torch.rand(3, 2, 12, 12, generator=gen, dtype=DTYPE)
    x[torch.rand(3, 2, 12, 12, generator=gen) < 0.4] = 0.0
    return x


def randomise_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.3 * torch.randn(n, generator=gen, dtype=DTYPE))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen, dtype=DTYPE))
            sign = torch.where(torch.rand(n, generator=gen) < 0.25, -1.0, 1.0).to(DTYPE)
            module.weight.data.copy_(sign * (0.5 + torch.rand(n, generator=gen, dtype=DTYPE)))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=gen, dtype=DTYPE))


def rule_composite(rule) -> LayerMapComposite:
    """``rule`` on every linear layer; the base layer map of zennit's presets elsewhere."""
    return LayerMapComposite(
        layer_map=[(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()), (BatchNorm, Pass()),
                   (Linear, rule)],
        canonizers=[SequentialMergeBatchNorm()])


def cases(low: torch.Tensor, high: torch.Tensor, low_value: float, high_value: float) -> dict:
    canon = [SequentialMergeBatchNorm()]
    return {
        "epsilon": rule_composite(Epsilon(epsilon=1e-6)),
        "epsilon_nobias": rule_composite(Epsilon(epsilon=1e-6, zero_params="bias")),
        "zplus": rule_composite(ZPlus(stabilizer=1e-6)),
        "zplus_nobias": rule_composite(ZPlus(stabilizer=1e-6, zero_params="bias")),
        "alpha2_beta1": rule_composite(AlphaBeta(alpha=2.0, beta=1.0, stabilizer=1e-6)),
        "alpha1_beta0": rule_composite(AlphaBeta(alpha=1.0, beta=0.0, stabilizer=1e-6)),
        "gamma": rule_composite(Gamma(gamma=0.25, stabilizer=1e-6)),
        "gamma_nobias": rule_composite(Gamma(gamma=0.25, stabilizer=1e-6, zero_params="bias")),
        "flat": rule_composite(Flat(stabilizer=1e-6)),
        "wsquare": rule_composite(WSquare(stabilizer=1e-6)),
        "zbox": rule_composite(ZBox(low=low_value, high=high_value, stabilizer=1e-6)),
        "epsilon_plus": EpsilonPlus(canonizers=canon),
        "epsilon_plus_flat": EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]),
        "epsilon_alpha2_beta1": EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()]),
        "epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat(canonizers=[SequentialMergeBatchNorm()]),
        "epsilon_gamma_box": EpsilonGammaBox(low=low, high=high, canonizers=[SequentialMergeBatchNorm()]),
    }


def make(name: str, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    model = {"mlp": mlp, "cnn": cnn, "bn": bn}[name]().to(DTYPE).eval()
    with torch.no_grad():
        randomise_batch_norms(model, gen)
    x = inputs(name, gen)
    with torch.no_grad():
        logits = model(x)
    target = torch.randn(logits.shape, generator=gen, dtype=DTYPE)
    low_value, high_value = (-3.0, 3.0) if name == "mlp" else (0.0, 1.0)
    low, high = torch.full_like(x, low_value), torch.full_like(x, high_value)
    out: dict[str, np.ndarray] = {
        "x": x.numpy(), "target": target.numpy(), "logits": logits.numpy(),
        "bn_eps": np.asarray(BN_EPS), "low": np.asarray(low_value), "high": np.asarray(high_value),
        "zennit_version": np.asarray(md.version("zennit")), "torch_version": np.asarray(torch.__version__),
    }
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix = "bn" if key.endswith(("running_mean", "running_var")) else "param"
        out[f"{prefix}/{key}"] = value.numpy().copy()
    for case, composite in cases(low, high, low_value, high_value).items():
        inp = x.clone().requires_grad_(True)
        with Gradient(model=model, composite=composite) as attributor:
            output, relevance = attributor(inp, target)
        np.testing.assert_allclose(output.detach().numpy(), logits.numpy(), rtol=1e-8)
        out[f"relevance/{case}"] = relevance.detach().numpy()
    return out


def main() -> None:
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "data", "zennit")
    os.makedirs(outdir, exist_ok=True)
    for seed, name in enumerate(("mlp", "cnn", "bn")):
        data = make(name, seed)
        path = os.path.join(outdir, f"{name}.npz")
        np.savez_compressed(path, **data)
        print(f"wrote {path}: {sum(k.startswith('relevance/') for k in data)} cases")


if __name__ == "__main__":
    main()
