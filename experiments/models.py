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
======================  ===========================================================================

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

from lfp_jax.nn import torch_bias_init, torch_kernel_init


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


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A model of the zoo by name; ``kwargs`` are its fields (``activation``, ``hidden``, ...)."""
    if name == "toy_mlp":
        return MLP(hidden=(32, 16), num_classes=num_classes, **kwargs)
    for field in ("hidden", "widths", "blocks"):
        if isinstance(kwargs.get(field), list):
            kwargs[field] = tuple(kwargs[field])
    if name == "resnet18":
        return ResNet(num_classes=num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), **kwargs)
    zoo = {"mlp": MLP, "lenet": LeNet, "cifar_vgg": CifarVGGLike, "resnet": ResNet}
    if name not in zoo:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(zoo) + ['toy_mlp', 'resnet18']}")
    return zoo[name](num_classes=num_classes, **kwargs)
