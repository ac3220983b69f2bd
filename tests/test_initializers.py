"""PyTorch-style initialisation: U(±1/√fan_in) for kernels and biases, nothing left at zero."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lfp_jax
from lfp_jax.nn import torch_bias_init, torch_init, torch_kernel_init

ALPHA = 1e-9  # chance that a correct U(±bound) sample fails one of the statistical checks below


def _check_uniform(a, bound, alpha=ALPHA):
    """``a`` is a sample of U(−bound, bound), by checks whose false-alarm rate is at most ``alpha`` each.

    * support: every ``|a_i| <= bound`` (up to the rounding of the dtype);
    * range: ``|a_i| / bound`` is U(0, 1), so ``P(max |a_i| < q · bound) = q^n``; with
      ``q = alpha^(1/n)`` a correct sample falls short with probability ``alpha`` (a smaller bound, as
      from a larger fan-in, fails);
    * shape: the Kolmogorov–Smirnov distance between the empirical CDF and that of U(−bound, bound) is
      at most ``sqrt(ln(2/alpha) / (2n))`` (the Dvoretzky–Kiefer–Wolfowitz inequality with Massart's
      constant, ``P(D_n > t) <= 2 exp(−2 n t²)``), which a normal or triangular sample violates.
    """
    a = np.asarray(a)
    n = a.size
    rounding = 4 * np.finfo(a.dtype).eps
    assert np.all(np.abs(a) <= bound * (1 + rounding)), "sample outside [-bound, bound]"
    q = alpha ** (1 / n)
    assert np.abs(a).max() >= q * bound * (1 - rounding), (
        f"max |a| = {np.abs(a).max():.4g} < {q:.4g} · bound: the support is narrower than ±{bound:.4g}")
    x = np.sort(a.astype(np.float64).ravel())
    cdf = np.clip((x + bound) / (2 * bound), 0.0, 1.0)
    ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    limit = np.sqrt(np.log(2 / alpha) / (2 * n))
    assert ks <= limit, f"Kolmogorov–Smirnov distance {ks:.4f} > {limit:.4f} to U(±{bound:.4g})"


def test_kernel_init_bound_is_one_over_sqrt_fan_in():
    for k in range(3):
        _check_uniform(torch_kernel_init()(jax.random.key(k), (784, 120)), 1 / np.sqrt(784))
        _check_uniform(torch_kernel_init()(jax.random.key(k), (5, 5, 6, 16)), 1 / np.sqrt(150))


def test_bias_init_bound():
    for k in range(5):
        _check_uniform(torch_bias_init(100)(jax.random.key(k), (5000,)), 0.1)
    with pytest.raises(ValueError):
        torch_bias_init(0)


@pytest.mark.parametrize("wrong", ["fan_in 120", "fan_in 90", "normal", "triangular"])
def test_uniform_check_rejects_other_distributions(wrong):
    """The checks above have power: 5000 draws of a neighbouring distribution fail them."""
    key = jax.random.key(11)
    if wrong.startswith("fan_in"):
        a = torch_bias_init(int(wrong.split()[1]))(key, (5000,))
    elif wrong == "normal":  # the same standard deviation as U(±0.1), clipped into the support
        a = jnp.clip(jax.random.normal(key, (5000,)) * 0.1 / np.sqrt(3), -0.1, 0.1)
    else:  # the sum of two U(±0.05): support ±0.1, but a triangular density
        k1, k2 = jax.random.split(key)
        a = jax.random.uniform(k1, (5000,), minval=-0.05, maxval=0.05) + jax.random.uniform(
            k2, (5000,), minval=-0.05, maxval=0.05)
    with pytest.raises(AssertionError):
        _check_uniform(a, 0.1)


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


def test_torch_init_with_the_model_sets_the_scales_lfp_cannot_move_to_one_and_keeps_the_others():
    """A zero scale used as a weight (x̂ · γ, Flax's zero-initialised residual scale) silences its layer
    and never moves under LFP: set to 1. A zero scale used as 1 + s (Gemma's RMSNorm) is the identity,
    and moves: kept, so the model computes what it computed."""
    params = {"bn_last": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
              "gemma_norm": {"scale": jnp.zeros(4)}, "ln": {"scale": jnp.full((4,), 0.5)},
              "out": {"kernel": jnp.ones((4, 2))}}

    def norm(h):
        return (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-6)

    def fun(p, x):
        h = norm(x) * p["bn_last"]["scale"] + p["bn_last"]["bias"]
        h = h + norm(x) * (1 + p["gemma_norm"]["scale"]) + norm(x) * p["ln"]["scale"]
        return h @ p["out"]["kernel"]

    x = jax.random.normal(jax.random.key(3), (5, 4))
    new = torch_init(jax.random.key(0), params, fun, x)
    np.testing.assert_array_equal(new["bn_last"]["scale"], 1.0)
    np.testing.assert_array_equal(new["bn_last"]["bias"], 0.0)       # offsets stay 0, as in PyTorch
    np.testing.assert_array_equal(new["gemma_norm"]["scale"], 0.0)   # 1 + 0: the identity, and it moves
    np.testing.assert_array_equal(new["ln"]["scale"], 0.5)           # a deliberate scale is kept
    without_model = torch_init(jax.random.key(0), params)           # scales are only changed knowingly
    np.testing.assert_array_equal(without_model["bn_last"]["scale"], 0.0)
    with pytest.raises(lfp_jax.errors.FrozenParameterError) as info:
        lfp_jax.check_params(params, fun, x)
    assert "['bn_last']['scale']" in str(info.value) and "gemma_norm" not in str(info.value)


def test_torch_init_can_keep_the_kernels_and_draw_only_the_biases():
    params = {"Dense_0": {"kernel": jnp.full((3, 4), 0.02), "bias": jnp.zeros(4)}}
    new = torch_init(jax.random.key(0), params, keep_kernels=True)
    np.testing.assert_array_equal(new["Dense_0"]["kernel"], 0.02)
    assert np.all(new["Dense_0"]["bias"] != 0) and np.all(np.abs(new["Dense_0"]["bias"]) <= 1 / np.sqrt(3))


def test_torch_init_with_the_model_works_on_traced_parameters():
    """Inside jit or pmap (a model whose BatchNorm averages over a named batch axis is initialised
    there), which scales would freeze comes from the model's analysis and the zero test is traced."""
    params = {"bn_last": {"scale": jnp.zeros(4)}, "ln": {"scale": jnp.full((4,), 0.5)},
              "out": {"kernel": jnp.ones((4, 2))}}

    def fun(p, x):
        h = (x - x.mean(0)) * jax.lax.rsqrt(x.var(0) + 1e-5)
        return (h * p["bn_last"]["scale"] + h * p["ln"]["scale"]) @ p["out"]["kernel"]

    x = jax.random.normal(jax.random.key(4), (6, 4))
    eager = torch_init(jax.random.key(0), params, fun, x)
    traced = jax.jit(lambda p, x: torch_init(jax.random.key(0), p, fun, x))(params, x)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(traced["bn_last"]["scale"], 1.0)
    np.testing.assert_array_equal(traced["ln"]["scale"], 0.5)
