"""The reference's models in Flax linen, with PyTorch-style initialisation and a chosen activation.

======================  ===========================================================================
name                    architecture
======================  ===========================================================================
``toy_mlp``             2-32-16-C (the reference's toy model)
``mlp``                 in-``hidden``-C, default 784-120-84-10
``lenet``               conv16 5x5, pool, conv16 5x5, pool, 120, dropout, 84, dropout, C
``cifar_vgg``           the reference's CifarVGGLike: 6 conv3x3 (32-64-128-128-256-256), 3 max pools,
                        1024, dropout, 512, dropout, C (no BatchNorm)
``resnet``              CIFAR-style ResNet with BatchNorm: conv3x3-16, 3 stages of ``blocks`` basic
                        blocks (16/32/64 channels), global average pooling, C
``resnet18``            ResNet-18 with BatchNorm and a CIFAR stem: conv3x3-64, 4 stages of 2 basic
                        blocks (64/128/256/512 channels, stride 2 from stage 2 on), global average
                        pooling, C (11.2 M parameters)
``snn_mlp``             LIF MLP in-``hidden``-C (default 784-1000-10): Dense → LIF per layer, ``steps``
                        time steps (default 15) in a ``lax.scan``; outputs spikes ``(T, batch, C)``
``snn_cnn``             LIF CNN: conv16 5x5 → LIF → max pool, conv16 5x5 → LIF → max pool, Dense C →
                        LIF, over ``steps`` time steps
``vit``                 Vision Transformer: patches (``patch``, default 7), class token or mean pooling
                        (``pool``), ``depth`` pre-norm blocks of ``heads``-head self-attention and a GELU
                        MLP, width ``width`` (see :mod:`experiments.transformers`)
``gpt``                 GPT-style causal decoder over one-hot tokens: RMSNorm, causal attention, SiLU-gated
                        MLP, position embeddings; logits per position over ``num_classes`` = vocabulary
======================  ===========================================================================

Spiking models (:mod:`lfp_jax.nn.spiking`): leak ``beta`` 0.9, threshold 1, reset by subtraction, a
true Heaviside spike (``surrogate: null``) or snntorch's arc-tangent surrogate for gradient descent
(``surrogate: atan``). ``encoding: direct`` feeds the image as a constant current at every step (the
first layer is then computed once, outside the time loop: the same numbers, and its feedback is the
sum over steps as before); ``encoding: rate`` draws Bernoulli spikes with probability ``(x + 1) / 2``
(inputs are normalised to [-1, 1]), drawn by :func:`encode_inputs` outside the model. Each layer runs
as its own ``lax.scan`` over the steps (unrolled by 3), with the layer applied to all ``T·batch``
inputs at once in between (``run_lif_layers(order="layer")``: same values and feedback as the
reference's loop). Predictions are the arg-max of output spike counts.

Activations: ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``silu``, ``elu``, ``gelu``, ``step``
(Heaviside ``H(x) = 1[x > 0]``, whose derivative is zero: gradient descent cannot train through it).
Every Dense and Conv uses PyTorch's ``U(±1/√fan_in)`` for kernel and bias, so no parameter starts at
exactly 0 (LFP cannot move zeros); BatchNorm scale 1 and offset 0 as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.transformers import GPT, ViT
from lfp_jax.nn import spiking, torch_bias_init, torch_kernel_init


def step(x: jax.Array) -> jax.Array:
    """Heaviside step ``1[x > 0]`` (zero derivative everywhere it is defined)."""
    return (x > 0).astype(x.dtype)


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu, "leaky_relu": nn.leaky_relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
    "silu": nn.silu, "elu": nn.elu, "gelu": nn.gelu, "step": step,
}


def _act(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in),
                    name=name)


def conv(features: int, kernel: int, fan_in: int, padding="VALID", strides=1, use_bias=True,
         name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=strides, padding=padding, use_bias=use_bias,
                   kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in * kernel * kernel),
                   name=name)


def classifier(x, widths: Sequence[int], act: Callable, dropout: float, num_classes: int,
               train: bool) -> jax.Array:
    """Dense layers with activation (and dropout), then the output layer; ``x`` is flattened."""
    x = x.reshape(x.shape[0], -1)
    for width in widths:
        x = act(dense(width, x.shape[-1])(x))
        if dropout:
            x = nn.Dropout(dropout, deterministic=not train)(x)
    return dense(num_classes, x.shape[-1])(x)


class MLP(nn.Module):
    hidden: Sequence[int] = (120, 84)
    num_classes: int = 10
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return classifier(x, self.hidden, _act(self.activation), self.dropout, self.num_classes, train)


class LeNet(nn.Module):
    num_classes: int = 10
    activation: str = "relu"
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = _act(self.activation)
        x = nn.max_pool(act(conv(16, 5, x.shape[-1])(x)), (2, 2), (2, 2))
        x = nn.max_pool(act(conv(16, 5, 16)(x)), (2, 2), (2, 2))
        return classifier(x, (120, 84), act, self.dropout, self.num_classes, train)


class CifarVGGLike(nn.Module):
    num_classes: int = 10
    activation: str = "relu"
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = _act(self.activation)
        for block in ((32, 64), (128, 128), (256, 256)):
            for width in block:
                x = act(conv(width, 3, x.shape[-1], padding=1)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        return classifier(x, (1024, 512), act, self.dropout, self.num_classes, train)


class BasicBlock(nn.Module):
    features: int
    strides: int
    activation: str

    @nn.compact
    def __call__(self, x, train: bool):
        act = _act(self.activation)
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        y = conv(self.features, 3, x.shape[-1], padding=1, strides=self.strides, use_bias=False)(x)
        y = act(norm()(y))
        y = norm()(conv(self.features, 3, self.features, padding=1, use_bias=False)(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = norm()(conv(self.features, 1, x.shape[-1], strides=self.strides, use_bias=False)(x))
        return act(x + y)


class ResNet(nn.Module):
    """Basic-block ResNet: ``widths[i]`` channels and ``blocks`` (per stage, or one count for all)."""

    num_classes: int = 10
    activation: str = "relu"
    blocks: int | Sequence[int] = 1
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = _act(self.activation)
        blocks = (self.blocks,) * len(self.widths) if isinstance(self.blocks, int) else tuple(self.blocks)
        if len(blocks) != len(self.widths):
            raise ValueError(f"ResNet: blocks {self.blocks} does not give one count per stage of widths "
                             f"{tuple(self.widths)}")
        x = conv(self.widths[0], 3, x.shape[-1], padding=1, use_bias=False)(x)
        x = act(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, width in enumerate(self.widths):
            for b in range(blocks[stage]):
                x = BasicBlock(width, 2 if (stage > 0 and b == 0) else 1, self.activation)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return dense(self.num_classes, x.shape[-1])(x)


class _Params(nn.Module):
    """Kernel and bias of a Dense (``kernel=None``) or Conv layer, for use inside ``lax.scan``."""

    features: int
    kernel: int | None = None

    @nn.compact
    def __call__(self, fan_in: int):
        if self.kernel is None:
            shape, bias_fan_in = (fan_in, self.features), fan_in
        else:
            shape, bias_fan_in = (self.kernel, self.kernel, fan_in, self.features), fan_in * self.kernel ** 2
        return (self.param("kernel", torch_kernel_init(), shape),
                self.param("bias", torch_bias_init(bias_fan_in), (self.features,)))


def _conv(x, kernel, bias):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def encode_inputs(model: nn.Module, x: jax.Array, key: jax.Array) -> jax.Array:
    """The input ``model`` takes for data ``x``: rate-coded frames ``(T, batch, ...)`` for a spiking
    model with ``encoding: rate`` (Bernoulli spikes with probability ``(x + 1) / 2``), one-hot tokens
    for the GPT decoder (token ids ``(batch, T)`` in), else ``x``.

    The frames are drawn outside the model so that they are its input: reward reaches the first
    layer through them, as through any input.
    """
    if isinstance(model, GPT):  # token ids (batch, T) -> one-hot (batch, T, vocab)
        return jax.nn.one_hot(x, model.num_classes, dtype=jnp.float32)
    if getattr(model, "encoding", "direct") != "rate":
        return x
    return spiking.rate_encode(key, (x + 1) / 2, model.steps)


def _frames(encoding: str, x: jax.Array, steps: int) -> tuple[jax.Array, jax.Array | None]:
    """(one frame for shapes, all frames or None) for the model input ``x``."""
    if encoding == "direct":
        return x, None
    if encoding != "rate":
        raise ValueError(f"encoding must be 'direct' or 'rate', got {encoding!r}")
    if x.ndim < 3 or x.shape[0] != steps:
        raise ValueError(f"encoding 'rate' takes frames (T={steps}, batch, ...) from "
                         f"models.encode_inputs, got shape {x.shape}")
    return x[0], x


def _run(module: nn.Module, layers, x, frames):
    """The layers, each followed by LIF neurons, over ``module.steps`` steps: one scan per layer (the
    reference's step-by-step loop gives the same values and feedback). Each layer's mean firing rate
    is sown into the ``intermediates`` collection as ``spike_rate_<k>``."""
    kw = dict(beta=module.beta, threshold=module.threshold, surrogate=module.surrogate, order="layer",
              unroll=module.unroll)
    h = None
    for k, layer in enumerate(layers):
        if k == 0 and frames is None:
            h = spiking.run_lif_layers([layer], x, steps=module.steps, **kw)
        else:
            h = spiking.run_lif_layers([layer], frames if k == 0 else h, **kw)
        module.sow("intermediates", f"spike_rate_{k}", jax.lax.stop_gradient(jnp.mean(h)))
    return h


def spike_rates(model: nn.Module, params, x: jax.Array, key: jax.Array) -> list[float]:
    """Mean firing rate (spikes per neuron and step) of each LIF layer of a spiking model on ``x``."""
    _, state = model.apply({"params": params}, encode_inputs(model, x, key), mutable=["intermediates"])
    inter = state["intermediates"]
    return [float(inter[f"spike_rate_{k}"][0]) for k in range(len(inter))]


class _SpikingNet(nn.Module):
    """The fields every spiking model shares (see the module docstring)."""

    num_classes: int = 10
    steps: int = 15
    beta: float = 0.9
    threshold: float = 1.0
    surrogate: str | None = None
    encoding: str = "direct"
    unroll: int | bool = 3  # time-loop unrolling: a CPU speed/memory knob, same numbers (see README)


class SpikingMLP(_SpikingNet):
    hidden: Sequence[int] = (1000,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x, frames = _frames(self.encoding, x, self.steps)
        x = x.reshape(x.shape[0], -1)
        if frames is not None:
            frames = frames.reshape(*frames.shape[:2], -1)
        params, fan_in = [], x.shape[-1]
        for k, width in enumerate((*self.hidden, self.num_classes)):
            params.append(_Params(width, name=f"Dense_{k}")(fan_in))
            fan_in = width
        layers = [lambda h, p=p: h @ p[0] + p[1] for p in params]
        return _run(self, layers, x, frames)


class SpikingCNN(_SpikingNet):
    channels: Sequence[int] = (16, 16)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x, frames = _frames(self.encoding, x, self.steps)
        convs, fan_in = [], x.shape[-1]
        for k, width in enumerate(self.channels):
            convs.append(_Params(width, 5, name=f"Conv_{k}")(fan_in))
            fan_in = width
        size = x.shape[1]
        for _ in self.channels:
            size = (size - 4) // 2
        head = _Params(self.num_classes, name="Dense_0")(size * size * fan_in)
        pool = lambda h: nn.max_pool(h, (2, 2), (2, 2))  # noqa: E731
        layers = [lambda h, p=convs[0]: _conv(h, *p)]
        layers += [lambda h, p=p: _conv(pool(h), *p) for p in convs[1:]]
        layers += [lambda h: pool(h).reshape(h.shape[0], -1) @ head[0] + head[1]]
        return _run(self, layers, x, frames)


SPIKING = ("snn_mlp", "snn_cnn")


def ce_rate_loss(spikes: jax.Array, labels: jax.Array) -> jax.Array:
    """Gradient descent's loss for spiking outputs ``(T, batch, C)``: the cross-entropy of the spikes at
    each step, averaged over steps and batch (snntorch's ``ce_rate_loss``)."""
    logp = jax.nn.log_softmax(spikes, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[None, :, None].astype(jnp.int32), axis=-1))


def logits_of(name: str, out: jax.Array) -> jax.Array:
    """Class scores of a model's output: spike counts for spiking models, the output otherwise."""
    return out.sum(0) if name in SPIKING else out


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A model of the zoo by name; ``kwargs`` are its fields (``activation``, ``hidden``, ...)."""
    if name == "toy_mlp":
        return MLP(hidden=(32, 16), num_classes=num_classes, **kwargs)
    for field in ("hidden", "widths", "blocks", "channels"):
        if isinstance(kwargs.get(field), list):
            kwargs[field] = tuple(kwargs[field])
    if name == "resnet18":
        return ResNet(num_classes=num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), **kwargs)
    zoo = {"mlp": MLP, "lenet": LeNet, "cifar_vgg": CifarVGGLike, "resnet": ResNet, "snn_mlp": SpikingMLP,
           "snn_cnn": SpikingCNN, "vit": ViT, "gpt": GPT}
    if name not in zoo:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(zoo) + ['toy_mlp', 'resnet18']}")
    return zoo[name](num_classes=num_classes, **kwargs)
