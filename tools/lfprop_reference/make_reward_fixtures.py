"""Reference numbers for the rewards and the spiking (LIF) LFP rule, from ``lfprop`` itself.

Like ``make_fixtures.py`` (same environment, same torchvision stand-in) this script is not part of
lfp_jax and is never imported by it or by the tests; only the ``.npz`` files it writes are used
(``tests/test_lfprop_rewards.py``). The spiking part also needs ``snntorch`` (lfprop's ``[snn]``
extra)::

    /tmp/vref/bin/pip install --no-deps snntorch
    /tmp/vref/bin/python tools/lfprop_reference/make_reward_fixtures.py [OUTDIR]

Everything is float64 (``torch.set_default_dtype``), seeded with ``torch.manual_seed(0)``.

``rewards.npz``: every reward class of ``lfprop.rewards.reward_functions`` on fixed random logits
``z`` (batch 7, 4 classes; row 5 has a tie for the largest output at its label, row 6 an exact zero)
and labels ``y``, and the spike rewards on a random binary spike train ``spikes`` (T = 6, batch 5,
4 classes). Name mapping, lfprop (``rewards.REWARD_MAP`` key) → lfp_jax.rewards:

============================================================  =========================================
``SoftmaxLossReward`` (``softmaxlossreward``)                  ``softmax_loss(z, y)``
``SigmoidLossReward`` (``sigmoidlossreward``, ``correct-class``) ``sigmoid_loss(z, y)``
``BinarySigmoidLossReward`` (``binarysigmoidlossreward``)      ``sigmoid_loss(z1, y1[:, None])`` (one output,
                                                               0/1 targets shaped like it)
``BoundedSoftmaxReward(lower, higher, logit_sign_only)``       ``bounded_softmax(z, y, lower=, upper=,
(``boundedsoftmaxreward``)                                     sign_only=)``
``CorrectclassificationReward`` (``correctclassification``)    ``correct_class(z, y)``
``MisclassificationReward`` (``misclassificationreward``)      ``misclassification(z, y)``
``MaximizeSingleNeuron`` (``maximizesingleneuronreward``)      ``maximize_neuron(z)``
``MinimizeSingleNeuron`` (``minimizesingleneuronreward``)      ``minimize_neuron(z)``
``SnnCorrectClassRewardSpikesRateCoded`` (``snnratecodedreward``)  ``spike_rate_coded(spikes, y)``
(no lfprop counterpart)                                        ``spike_count_softmax_loss(spikes, y)``:
                                                               the file holds ``SoftmaxLossReward`` at the
                                                               spike counts, which its sum over time equals
============================================================  =========================================

Keys: ``z``, ``y``, ``z1``, ``y1``, ``spikes``, ``spike_y``, ``reward/<name>`` with the lfp_jax name
(bounded ones: ``bounded_softmax/<lower>_<upper>_<sign_only>``), ``spike_counts_softmax_loss``.

``snn_<case>.npz``: lfprop's ``LFPSNNEpsilonComposite`` (ε = 1e-6) on a network of
``lfprop.model.spiking_networks.SpikingLayer`` s (``nn.Linear`` → ``snntorch.Leaky`` with β = 0.9,
threshold 1, reset by subtraction with a one-step delay, lfprop's ``Step`` as the spike function;
``init_hidden=True``, the last one ``output=True``), run step by step over ``T`` input frames as an
SNN training loop does, then one backward pass of the reward through the stacked output spikes:

* ``mlp``: Linear(6, 8) → LIF → Linear(8, 3) → LIF, T = 5, batch 4, reward = lfprop's rate-coded
  reward at the output spikes;
* ``mlp_random_reward``: the same network and frames, a standard-normal reward on every output step
  (silent ones too), so that every path of the rule carries reward;
* ``cnn_pool``: Conv2d(1, 3, 3) → LIF → MaxPool2d(2) → Flatten → Linear(27, 3) → LIF on 8x8 frames
  (NCHW), T = 4, batch 2, the rate-coded reward. The pool is no ``SpikingLayer``: lfprop leaves it to
  autograd, which hands each window's reward to its first maximum among the (binary, mostly tied)
  spikes.

Keys: ``frames`` (T, batch, features or NCHW), ``y``, ``spikes`` (the output spike train), ``reward``,
``param/<key>`` and ``feedback/<key>`` (torch layout, ``param.feedback`` after the backward pass:
positive = strengthen), ``input_relevance`` (the reward at the frames), ``param_keys``, ``beta``,
``threshold``, ``epsilon``, ``hidden_spike_rate``, ``output_spike_rate`` and version strings.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402,F401  (imports lxt, then registers the torchvision stand-in)
import snntorch as snn  # noqa: E402
from lfprop.model.activations import Step  # noqa: E402
from lfprop.model.spiking_networks import SpikingLayer  # noqa: E402
from lfprop.propagation.propagator_snn import LFPSNNEpsilonComposite  # noqa: E402
from lfprop.rewards import reward_functions as rf  # noqa: E402

CPU = torch.device("cpu")
EPSILON = 1e-6
BETA, THRESHOLD = 0.9, 1.0
BOUNDS = ((0.0, 1.0, False), (0.1, 0.6, False), (0.1, 0.6, True), (0.25, 0.5, True))


def _versions():
    return {"lfprop_version": np.str_(md.version("lfprop")), "torch_version": np.str_(torch.__version__),
            "snntorch_version": np.str_(md.version("snntorch"))}


def reward_fixture() -> dict:
    torch.manual_seed(0)
    z = torch.randn(7, 4) * 2
    y = torch.randint(0, 4, (7,))
    z[5] = torch.tensor([1.5, -0.3, 1.5, 0.2])  # tie for the largest output, at the label
    y[5] = 2
    z[6, 1] = 0.0  # sign(0) = 0
    z1 = torch.randn(7, 1) * 2
    y1 = torch.randint(0, 2, (7,))
    spikes = (torch.rand(6, 5, 4) < 0.45).to(torch.get_default_dtype())
    spike_y = torch.randint(0, 4, (5,))

    out = {"z": z, "y": y, "z1": z1, "y1": y1, "spikes": spikes, "spike_y": spike_y}
    out["reward/softmax_loss"] = rf.SoftmaxLossReward(CPU)(z, y)
    out["reward/sigmoid_loss"] = rf.SigmoidLossReward(CPU)(z, y)
    out["reward/binary_sigmoid_loss"] = rf.BinarySigmoidLossReward(CPU)(z1, y1.to(z1.dtype))
    out["reward/correct_class"] = rf.CorrectclassificationReward(CPU)(z, y)
    out["reward/misclassification"] = rf.MisclassificationReward(CPU)(z, y)
    out["reward/maximize_neuron"] = rf.MaximizeSingleNeuron(CPU)(z, y)
    out["reward/minimize_neuron"] = rf.MinimizeSingleNeuron(CPU)(z, y)
    for lower, upper, sign_only in BOUNDS:
        fn = rf.BoundedSoftmaxReward(CPU, lower_bound=lower, higher_bound=upper, logit_sign_only=sign_only)
        out[f"reward/bounded_softmax/{lower}_{upper}_{int(sign_only)}"] = fn(z, y)
    out["reward/spike_rate_coded"] = rf.SnnCorrectClassRewardSpikesRateCoded(CPU)(spikes, spike_y)
    out["spike_counts_softmax_loss"] = rf.SoftmaxLossReward(CPU)(spikes.sum(0), spike_y)
    res = {k: v.detach().numpy() for k, v in out.items()}
    for k in ("y", "y1", "spike_y"):
        res[k] = res[k].astype(np.int64)
    res["bounds"] = np.array(BOUNDS, dtype=np.float64)
    return {**res, **_versions()}


def _lif(output=False):
    return snn.Leaky(beta=BETA, threshold=THRESHOLD, spike_grad=Step(), init_hidden=True, output=output,
                     reset_mechanism="subtract", reset_delay=True)


def _snn(case):
    torch.manual_seed(0)
    if case.startswith("mlp"):
        model = nn.Sequential(SpikingLayer(nn.Linear(6, 8), _lif()),
                              SpikingLayer(nn.Linear(8, 3), _lif(True)))
        gains = ((2.5, 0.2), (3.0, 0.3))
        frames = torch.rand(5, 4, 6) * 2
        y = torch.randint(0, 3, (4,))
    elif case == "cnn_pool":  # max pooling of binary spikes: ties in most windows
        model = nn.Sequential(SpikingLayer(nn.Conv2d(1, 3, 3), _lif()), nn.MaxPool2d(2), nn.Flatten(),
                              SpikingLayer(nn.Linear(27, 3), _lif(True)))
        gains = ((2.0, 0.2), (2.5, 0.3))
        frames = torch.rand(4, 2, 1, 8, 8) * 2
        y = torch.randint(0, 3, (2,))
    else:
        raise ValueError(case)
    spiking = [m for m in model if isinstance(m, SpikingLayer)]
    with torch.no_grad():  # enough drive that both layers fire on some steps and stay silent on others
        for layer, (gain, shift) in zip(spiking, gains):
            layer.parameterized_layer.weight.mul_(gain)
            layer.parameterized_layer.bias.add_(shift)
    return model, frames, y


def _run(model, frames):
    """The SNN loop: one call per time step, hidden states kept by the Leaky modules."""
    snn.Leaky.reset_hidden()
    out, hidden = [], []
    hook = model[0].register_forward_hook(lambda m, i, o: hidden.append(o.detach()))
    for t in range(frames.shape[0]):
        spk, _ = model(frames[t])
        out.append(spk)
    hook.remove()
    return torch.stack(out), torch.stack(hidden)


def snn_fixture(case: str) -> dict:
    model, frames, y = _snn(case)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    composite = LFPSNNEpsilonComposite(epsilon=EPSILON)
    with composite.context(model) as modified:
        inputs = frames.detach().clone().requires_grad_(True)
        spikes, hidden = _run(modified, inputs)
        if case in ("mlp", "cnn_pool"):
            reward = rf.SnnCorrectClassRewardSpikesRateCoded(CPU)(spikes.detach(), y)
        elif case == "mlp_random_reward":
            gen = torch.Generator().manual_seed(1)
            reward = torch.randn(spikes.shape, generator=gen)
        else:
            raise ValueError(case)
        (input_relevance,) = torch.autograd.grad((spikes,), (inputs,), grad_outputs=(reward,))
    feedback = {}
    for name, p in model.named_parameters():
        if not hasattr(p, "feedback"):
            raise RuntimeError(f"lfprop produced no feedback for {name}")
        feedback[name] = p.feedback.detach().clone()
    for name, p in model.named_parameters():  # the composite must not have touched the weights
        assert torch.equal(p.detach(), params[name])
    out = {"frames": frames.numpy(), "y": y.numpy().astype(np.int64), "spikes": spikes.detach().numpy(),
           "reward": reward.detach().numpy(), "input_relevance": input_relevance.detach().numpy(),
           "param_keys": np.array(list(params), dtype=np.str_), "beta": np.float64(BETA),
           "threshold": np.float64(THRESHOLD), "epsilon": np.float64(EPSILON),
           "hidden_spike_rate": np.float64(hidden.mean().item()),
           "output_spike_rate": np.float64(spikes.detach().mean().item()),
           "case": np.str_(case), **_versions()}
    for k in params:
        out[f"param/{k}"] = params[k].numpy()
        out[f"feedback/{k}"] = feedback[k].numpy()
    return out


def main(outdir: str) -> None:
    torch.set_default_dtype(torch.float64)
    os.makedirs(outdir, exist_ok=True)
    files = {"rewards": reward_fixture()}
    for case in ("mlp", "mlp_random_reward", "cnn_pool"):
        files[f"snn_{case}"] = snn_fixture(case)
    for name, data in files.items():
        path = os.path.join(outdir, f"{name}.npz")
        np.savez(path, **data)
        rates = ""
        if "hidden_spike_rate" in data:
            rates = (f" (spike rates: hidden {data['hidden_spike_rate']:.2f}, "
                     f"out {data['output_spike_rate']:.2f})")
        print(f"wrote {path}: {os.path.getsize(path)} bytes{rates}")


if __name__ == "__main__":
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "data", "lfprop")
    main(os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else default))
