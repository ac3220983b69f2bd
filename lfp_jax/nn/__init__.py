"""Neural-network helpers for LFP: PyTorch-style initialisation."""

from lfp_jax.nn.initializers import torch_bias_init, torch_init, torch_kernel_init

__all__ = ["torch_bias_init", "torch_init", "torch_kernel_init"]
