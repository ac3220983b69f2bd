"""Generate reference LFP numbers from the authors' PyTorch implementation (``lfprop``).

This script is NOT part of lfp_jax and is never imported by it or by the test suite.
It needs a separate virtual environment that holds CPU PyTorch and the ``lfprop``
package (which in turn needs ``lxt`` 0.6 and ``zennit`` 0.5). Neither torch nor
lfprop is a dependency of lfp_jax. Only the ``.npz`` files it writes are used by
the tests (``tests/data/lfprop/<case>.npz``).

Recreate the environment and run it (from the repository root)::

    python3.11 -m venv /tmp/vref
    /tmp/vref/bin/pip install torch==2.13.0           # CPU wheel
    /tmp/vref/bin/pip install --no-deps lfprop==1.0.0 "lxt>=0.6.1,<0.7" "zennit>=0.5.1,<0.6"
    /tmp/vref/bin/pip install click numpy Pillow tabulate "transformers<5"
    /tmp/vref/bin/python tools/lfprop_reference/make_fixtures.py [OUTDIR]

``--no-deps`` keeps pip from pulling torchvision (and a CUDA torch with it): zennit
and lfprop's ResNet module import ``torchvision`` at import time but do not use it
for anything computed here, so this script registers a tiny in-memory stand-in for
``torchvision`` when the real one is missing (nothing is written to disk).

What is computed, per case (all in float64, ``torch.manual_seed(0)``, PyTorch
default initialisation, batch of 5):

* ``x``, ``y``: inputs (NCHW for images) and integer labels;
* ``logits``: model output in training mode;
* ``reward``: lfprop's softmax-loss reward at the logits,
  ``logits * (onehot(y) - softmax(logits))``;
* ``param/<key>``: every parameter, torch layout, ``<key>`` = state_dict key;
* ``feedback/<key>``: lfprop's LFP feedback (``LFPEpsilonComposite``, eps=1e-6),
  sign convention positive = strengthen (lfprop stores this in ``param.feedback``;
  its training loops then set ``param.grad = -param.feedback``);
* ``grad/<key>``: autograd gradient of the batch *sum* of cross-entropy (context);
* ``input_relevance``: the reward that arrives at the input;
* ``param_keys``: the parameter keys in ``named_parameters`` order;
* ``epsilon``, ``case``, ``lfprop_version``, ``torch_version``: metadata.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import os
import sys
import types
import typing

import numpy as np
import torch
from torch import nn


def _ensure_torchvision() -> None:
    """Register a minimal in-memory ``torchvision`` if the real one is absent.

    zennit (``zennit/torchvision.py``) and lfprop (``lfprop/model/custom_resnet.py``)
    import names from ``torchvision.models.resnet`` at import time; we only need
    those imports to succeed, none of the ResNet code is executed here.
    """
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass

    class _Placeholder(nn.Module):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchvision stand-in: not usable")

    class _Weights:
        IMAGENET1K_V1 = None
        IMAGENET1K_V2 = None

        @staticmethod
        def verify(weights):
            return weights

    def _decorator_factory(*args, **kwargs):
        return lambda fn: fn

    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Any = typing.Any
    resnet.Optional = typing.Optional
    for name in ("BasicBlock", "Bottleneck", "ResNet"):
        setattr(resnet, name, type(name, (_Placeholder,), {}))
    for name in (
        "ResNet18_Weights",
        "ResNet34_Weights",
        "ResNet50_Weights",
        "ResNet101_Weights",
        "ResNet152_Weights",
        "ResNeXt50_32X4D_Weights",
        "ResNeXt101_32X8D_Weights",
        "ResNeXt101_64X4D_Weights",
        "Wide_ResNet50_2_Weights",
        "Wide_ResNet101_2_Weights",
    ):
        setattr(resnet, name, type(name, (_Weights,), {}))
    resnet._ovewrite_named_param = lambda *a, **k: None
    resnet.conv1x1 = lambda *a, **k: None
    resnet.handle_legacy_interface = _decorator_factory
    resnet.register_model = _decorator_factory

    models = types.ModuleType("torchvision.models")
    models.resnet = resnet
    tv = types.ModuleType("torchvision")
    tv.models = models
    tv.__path__ = []  # mark as package
    models.__path__ = []
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.models"] = models
    sys.modules["torchvision.models.resnet"] = resnet


# transformers (imported by lxt) probes for torchvision with importlib.find_spec,
# which fails on a module without a spec: import it before the stand-in exists.
import lxt.core  # noqa: E402,F401

_ensure_torchvision()

from lfprop.model.activations import Step  # noqa: E402
from lfprop.model.custom_resnet import Sum  # noqa: E402
from lfprop.propagation import propagator_lxt  # noqa: E402
from lfprop.rewards.reward_functions import SoftmaxLossReward  # noqa: E402

EPSILON = 1e-6
BATCH = 5
DTYPE = torch.float64


class Residual(nn.Module):
    """h = ReLU(fc_in(x)); h2 = h + fc_b(Tanh(fc_a(h))); out = fc_out(h2).

    The residual addition goes through lfprop's ``Sum`` module, which lfprop's
    ``LFPEpsilonComposite`` treats with the LFP-epsilon rule.
    """

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(6, 8)
        self.act_in = nn.ReLU()
        self.fc_a = nn.Linear(8, 8)
        self.act_a = nn.Tanh()
        self.fc_b = nn.Linear(8, 8)
        self.add = Sum()
        self.fc_out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act_in(self.fc_in(x))
        branch = self.fc_b(self.act_a(self.fc_a(h)))
        h2 = self.add(branch, h)
        return self.fc_out(h2)


def _mlp(act):
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 7), act(), nn.Linear(7, 3))


def _build(case: str):
    """Return (model, x, y, n_classes) for a case, seeded with 0."""
    torch.manual_seed(0)
    if case == "mlp_tanh":
        model, in_shape = _mlp(nn.Tanh), (BATCH, 6)
    elif case == "mlp_silu":
        model, in_shape = _mlp(nn.SiLU), (BATCH, 6)
    elif case == "mlp_relu":
        model, in_shape = _mlp(nn.ReLU), (BATCH, 6)
    elif case == "mlp_step":
        model, in_shape = _mlp(Step), (BATCH, 6)
    elif case == "cnn_pool":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(5 * 2 * 2, 3),
        )
        in_shape = (BATCH, 2, 8, 8)
    elif case == "mlp_bn_train":
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.uniform_(-0.5, 0.5)
        in_shape = (BATCH, 6)
    elif case == "residual":
        model, in_shape = Residual(), (BATCH, 6)
    else:
        raise ValueError(case)
    n_classes = 3
    x = torch.randn(*in_shape)
    y = torch.randint(0, n_classes, (BATCH,))
    model.train()  # dropout active, BatchNorm on batch statistics
    return model, x, y, n_classes


def _lfp(model, x, y):
    """One LFP backward pass exactly as lfprop's training loops do it."""
    composite = propagator_lxt.LFPEpsilonComposite(epsilon=EPSILON)
    reward_fn = SoftmaxLossReward(device=torch.device("cpu"))
    for p in model.parameters():
        if hasattr(p, "feedback"):
            del p.feedback
    with composite.context(model) as modified:
        inputs = x.detach().clone().requires_grad_(True)
        logits = modified(inputs)
        reward = reward_fn(logits, y).detach().clone()
        (input_relevance,) = torch.autograd.grad((logits,), (inputs,), grad_outputs=(reward,), retain_graph=False)
    feedback = {}
    for name, p in model.named_parameters():
        if not hasattr(p, "feedback"):
            raise RuntimeError(f"lfprop produced no feedback for {name}")
        feedback[name] = p.feedback.detach().clone()
    return logits.detach(), reward, input_relevance.detach(), feedback


def _ce_grad(model, x, y):
    model.zero_grad()
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


CASES = ("mlp_tanh", "mlp_silu", "mlp_relu", "mlp_step", "cnn_pool", "mlp_bn_train", "residual")


def main(outdir: str) -> None:
    torch.set_default_dtype(DTYPE)
    os.makedirs(outdir, exist_ok=True)
    for case in CASES:
        model, x, y, _ = _build(case)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state_keys = set(model.state_dict().keys())
        assert set(params) <= state_keys
        gd_model = copy.deepcopy(model)

        logits, reward, input_relevance, feedback = _lfp(model, x, y)
        logits_gd, grads = _ce_grad(gd_model, x, y)
        if not torch.allclose(logits, logits_gd, rtol=1e-12, atol=1e-12):
            raise RuntimeError(f"{case}: forward under the composite differs from the plain forward")

        out = {
            "x": x.numpy(),
            "y": y.numpy().astype(np.int64),
            "logits": logits.numpy(),
            "reward": reward.numpy(),
            "input_relevance": input_relevance.numpy(),
            "param_keys": np.array(list(params), dtype=np.str_),
            "epsilon": np.float64(EPSILON),
            "case": np.str_(case),
            "lfprop_version": np.str_(md.version("lfprop")),
            "torch_version": np.str_(torch.__version__),
        }
        for k in params:
            out[f"param/{k}"] = params[k].numpy()
            out[f"feedback/{k}"] = feedback[k].numpy()
            out[f"grad/{k}"] = grads[k].numpy()
        path = os.path.join(outdir, f"{case}.npz")
        np.savez(path, **out)
        print(f"wrote {path}: {list(params)}")


if __name__ == "__main__":
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data", "lfprop")
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else default))
