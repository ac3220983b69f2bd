"""PyTorch-style initialisation: U(±1/√fan_in) for kernels and biases, nothing left at zero."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lfp_jax
from lfp_jax.nn import torch_bias_init, torch_init, torch_kernel_init


def _check_uniform(a, bound):
    a = np.asarray(a)
    assert np.all(np.abs(a) <= bound)
    assert np.abs(a).max() > 0.8 * bound  # spreads over the whole interval
    np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.1)


def test_kernel_init_bound_is_one_over_sqrt_fan_in():
    _check_uniform(torch_kernel_init()(jax.random.key(0), (784, 120)), 1 / np.sqrt(784))
    _check_uniform(torch_kernel_init()(jax.random.key(1), (5, 5, 6, 16)), 1 / np.sqrt(150))


def test_bias_init_bound():
    _check_uniform(torch_bias_init(100)(jax.random.key(0), (5000,)), 0.1)
    with pytest.raises(ValueError):
        torch_bias_init(0)


def test_torch_init_on_linen_params_keeps_normalisation_parameters():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(16, (5, 5))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(300)(x.reshape(x.shape[0], -1))

    params = Net().init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))["params"]
    new = torch_init(jax.random.key(1), params)
    _check_uniform(new["Conv_0"]["bias"], 1 / np.sqrt(75))
    _check_uniform(new["Dense_0"]["kernel"], 1 / np.sqrt(256))
    _check_uniform(new["Dense_0"]["bias"], 1 / np.sqrt(256))
    np.testing.assert_array_equal(new["BatchNorm_0"]["scale"], 1.0)
    np.testing.assert_array_equal(new["BatchNorm_0"]["bias"], 0.0)


def test_torch_init_on_nnx_state_leaves_no_zero_bias():
    model = nnx.Linear(400, 300, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = torch_init(jax.random.key(1), state)
    model = nnx.merge(graphdef, state)
    _check_uniform(model.bias[...], 1 / np.sqrt(400))
    lfp_jax.check_params(state)  # nothing frozen


def test_check_params_names_zero_arrays():
    with pytest.raises(lfp_jax.errors.FrozenParameterError, match="Dense_0"):
        lfp_jax.check_params({"Dense_0": {"bias": jnp.zeros(3), "kernel": jnp.ones((2, 3))}})


def test_torch_init_sets_zero_normalisation_scales_to_one_and_keeps_the_others():
    """Flax's ResNets start the last BatchNorm scale of a residual block at zero (frozen under LFP)."""
    params = {"bn_last": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
              "ln": {"scale": jnp.full((4,), 0.5)}, "temperature": {"scale": jnp.zeros(())}}
    new = torch_init(jax.random.key(0), params)
    np.testing.assert_array_equal(new["bn_last"]["scale"], 1.0)
    np.testing.assert_array_equal(new["bn_last"]["bias"], 0.0)   # offsets stay 0, as in PyTorch
    np.testing.assert_array_equal(new["ln"]["scale"], 0.5)       # a deliberate scale is kept
    np.testing.assert_array_equal(new["temperature"]["scale"], 0.0)  # not a normalisation scale
