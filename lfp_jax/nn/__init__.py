"""Neural-network helpers for LFP: PyTorch-style initialisation, spiking (LIF) neurons."""

from lfp_jax.nn.initializers import torch_bias_init, torch_init, torch_kernel_init
from lfp_jax.nn.spiking import LIF, direct_encode, lif_step, rate_encode, run_lif_layers

__all__ = ["LIF", "direct_encode", "lif_step", "rate_encode", "run_lif_layers", "torch_bias_init",
           "torch_init", "torch_kernel_init"]
