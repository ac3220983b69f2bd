"""Step time of the reference implementation (``lfprop``, PyTorch): LFP step and gradient step.

NOT part of lfp_jax: it runs in the separate reference environment described in
``make_fixtures.py`` (CPU PyTorch + lfprop 1.0), and ``benchmarks/step_time.py --reference-python
/path/to/that/python`` calls it and merges its JSON into its table::

    /tmp/vref/bin/python tools/lfprop_reference/step_time.py --models mlp,lenet --batch 128 --steps 50

Both steps use SGD with momentum 0.9 on copies of the same model and the same batch and are timed alternately:

* LFP: forward through the model with ``LFPEpsilonComposite`` (ε = 1e-6) registered once for the
  whole run, softmax-loss reward, one ``torch.autograd.grad`` with the reward as output gradient
  (which fills ``param.feedback``), ``param.grad = -param.feedback``, ``optimizer.step()``;
* gradient: forward, mean cross-entropy, ``backward()``, ``optimizer.step()``.

Models: the MLP 784-120-84-10 (ReLU) and lfprop's own ``LeNet`` (in training mode: dropout on).
Prints one JSON list with ``model``, ``batch``, ``ref_lfp_ms``, ``ref_grad_ms`` (medians), threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402,F401  (registers the torchvision stand-in lfprop needs)

from lfprop.model.model_definitions import LeNet  # noqa: E402
from lfprop.propagation import propagator_lxt  # noqa: E402
from lfprop.rewards.reward_functions import SoftmaxLossReward  # noqa: E402


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                             nn.Linear(84, 10)), (1, 28, 28)
    if name == "lenet":
        return LeNet(1, 10), (1, 28, 28)
    raise ValueError(f"no reference model {name!r}; choose mlp or lenet")


def bench(name: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, shape = _model(name)
    model.train()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    grad_model = copy.deepcopy(model)  # the composite rewires ``model``: a separate copy for autograd
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    grad_opt = torch.optim.SGD(grad_model.parameters(), lr=1e-3, momentum=0.9)
    reward_fn = SoftmaxLossReward(device=torch.device("cpu"))
    composite = propagator_lxt.LFPEpsilonComposite(epsilon=1e-6)
    times: dict[str, list[float]] = {"lfp": [], "grad": []}
    with composite.context(model) as modified:

        def lfp_step():
            inputs = x.detach().clone().requires_grad_(True)
            logits = modified(inputs)
            reward = reward_fn(logits, y).detach()
            torch.autograd.grad((logits,), (inputs,), grad_outputs=(reward,))
            for p in model.parameters():
                p.grad = -p.feedback
            opt.step()

        def grad_step():
            grad_opt.zero_grad()
            nn.functional.cross_entropy(grad_model(x), y).backward()
            grad_opt.step()

        for _ in range(3):
            lfp_step()
            grad_step()
        for _ in range(steps):
            for label, fn in (("lfp", lfp_step), ("grad", grad_step)):
                t = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t)
    return {"model": name, "batch": batch, "ref_lfp_ms": 1e3 * float(np.median(times["lfp"])),
            "ref_grad_ms": 1e3 * float(np.median(times["grad"])), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps([bench(m, args.batch, args.steps) for m in args.models.split(",")]))


if __name__ == "__main__":
    main()
