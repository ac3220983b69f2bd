"""Theorem 1 of the LFP paper: on ReLU networks with the softmax-loss reward and ε → 0,
LFP feedback equals ``-|θ| ⊙ ∇_θ Σ_batch CE``. The reference side is jax.grad of the cross-entropy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _helpers import assert_theorem1, to64
from flax import nnx

import lfp_jax


def _data(shape, classes, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape, jnp.float64), jax.random.randint(ky, shape[:1], 0, classes)


def _init(model, x, seed=1, **kw):
    variables = model.init(jax.random.key(seed), x, **kw)
    params = lfp_jax.nn.torch_init(jax.random.key(seed + 1), variables["params"])
    return to64(params), variables


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(5)(x)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(10)(x))
        for _ in range(2):
            h = nn.relu(h + nn.Dense(10)(nn.relu(nn.Dense(10)(h))))
        return nn.Dense(3)(h)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(5, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


def _assert_linen_theorem1(model, shape, classes):
    x, y = _data(shape, classes)
    params, _ = _init(model, x)
    assert_theorem1(lambda p, x: model.apply({"params": p}, x), params, x, labels=y)


def _perturb_batchnorm(params):
    """Non-trivial BatchNorm scales and offsets (PyTorch's defaults 1 and 0 would hide errors)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 * jax.random.normal(jax.random.key(len(str(path))), a.shape, a.dtype)
        if "BatchNorm" in jax.tree_util.keystr(path) else a, params)


def test_theorem1_linen_mlp():
    _assert_linen_theorem1(MLP(), (8, 6), 4)


def test_theorem1_linen_cnn_with_max_and_average_pooling():
    _assert_linen_theorem1(CNN(), (4, 8, 8, 2), 5)


def test_theorem1_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 16, rngs=rngs, param_dtype=jnp.float64)
            self.l2 = nnx.Linear(16, 4, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    state = lfp_jax.nn.torch_init(jax.random.key(3), state)
    x, y = _data((8, 6), 4)
    assert_theorem1(lambda s, x: nnx.merge(graphdef, s)(x), state, x, labels=y)


def test_theorem1_plain_function_with_leaky_relu():
    k = jax.random.split(jax.random.key(4), 4)
    params = {
        "w1": jax.random.normal(k[0], (6, 9), jnp.float64), "b1": jax.random.normal(k[1], (9,), jnp.float64),
        "w2": jax.random.normal(k[2], (9, 3), jnp.float64), "b2": jax.random.normal(k[3], (3,), jnp.float64),
    }

    def fun(p, x):
        return jax.nn.leaky_relu(x @ p["w1"] + p["b1"], 0.1) @ p["w2"] + p["b2"]

    x, y = _data((7, 6), 3)
    assert_theorem1(fun, params, x, labels=y)


def test_theorem1_residual_network():
    _assert_linen_theorem1(ResNet(), (6, 5), 3)


def test_theorem1_batchnorm_in_train_mode():
    x, y = _data((6, 6, 6, 2), 3)
    params, variables = _init(BNNet(), x)
    params = _perturb_batchnorm(params)
    stats = variables["batch_stats"]

    def fun(p, x):
        return BNNet().apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

    # The biases of Conv_0 and Dense_0 feed a BatchNorm on batch statistics, which subtracts them again:
    # their exact gradient is 0 (rounding noise, < 1e-15 of the largest gradient) and their LFP feedback
    # is ε's residue alone (ε = 1e-12: about 3e-10 of the largest feedback).
    assert_theorem1(fun, params, x, labels=y, has_aux=True, allow_frozen=True,
                    zero_gradient=("['Conv_0']['bias']", "['Dense_0']['bias']"))


def test_theorem1_batchnorm_in_eval_mode():
    x, y = _data((6, 6, 6, 2), 3)
    params, variables = _init(BNNet(), x, train=False)
    params = _perturb_batchnorm(params)
    stats = jax.tree.map(lambda a: a + 0.5, to64(variables["batch_stats"]))  # non-trivial statistics

    def fun(p, x):
        return BNNet().apply({"params": p, "batch_stats": stats}, x, train=False)

    assert_theorem1(fun, params, x, labels=y)


def test_theorem1_with_stack_tile_concat_and_a_padding_mask():
    """Structural primitives and masked scaling by a constant mask are not activations or dropout."""
    k = jax.random.split(jax.random.key(7), 3)
    params = {"w1": jax.random.normal(k[0], (6, 4), jnp.float64),
              "w2": jax.random.normal(k[1], (4, 8), jnp.float64),
              "w3": jax.random.normal(k[2], (16, 3), jnp.float64)}
    pad = jnp.array([True, False, True, True] * 2)

    def fun(p, x):
        h = jax.nn.relu(x @ p["w1"])
        h = jnp.stack([h, jnp.tile(h[:, :2], (1, 2))], axis=1).reshape(x.shape[0], -1)
        h = jnp.where(pad, h * jnp.sqrt(8.0), 0.0)
        h = jnp.concatenate([h, jax.nn.relu(h @ jnp.ones((8, 8)) * 0.1 @ p["w2"].T @ p["w2"])], -1)
        return h @ p["w3"]

    x, y = _data((5, 6), 3)
    assert_theorem1(fun, params, x, labels=y)


class AttentionBlock(nn.Module):
    """Single-head causal self-attention, a ReLU-gated MLP, residual sums, a linear head."""

    @nn.compact
    def __call__(self, x):                      # x: (batch, T, d)
        q, k, v = nn.Dense(6)(x), nn.Dense(6)(x), nn.Dense(6)(x)
        t = x.shape[1]
        scores = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(6.0)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
        h = nn.Dense(x.shape[-1])(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores, -1), v)) + x
        gate = nn.relu(nn.Dense(8)(h)) * nn.Dense(8)(h)        # a product of two input-dependent values
        h = h + nn.Dense(x.shape[-1])(gate)
        return nn.Dense(3)(h[:, -1])


def test_theorem1_with_the_gradient_at_products():
    """``lfp_epsilon(products="gradient")``: every rule is the gradient in normalised form, so the
    feedback of an attention model with a gate is ``-|θ| ⊙ ∇_θ Σ CE`` (jax.grad)."""
    x, y = _data((5, 4, 7), 3)
    params, _ = _init(AttentionBlock(), x)
    fun = lambda p, x: AttentionBlock().apply({"params": p}, x)  # noqa: E731
    # the key projection's bias adds q·b to a whole row of scores, which the softmax removes: gradient 0
    assert_theorem1(fun, params, x, labels=y, composite=lfp_jax.lfp_epsilon(1e-12, products="gradient"),
                    zero_gradient=("['Dense_1']['bias']",))


def test_uniform_products_halve_the_feedback_of_a_factor():
    """The default (AttnLRP's uniform rule) hands each factor of a product half the reward: on a model
    whose only path to a parameter runs through one factor of a product, its feedback is half of
    ``-|θ| ⊙ ∇_θ Σ CE``."""
    class Gated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.Dense(8, name="a")(x) * nn.Dense(8, name="b")(x))

    x, y = _data((6, 5), 3)
    params, _ = _init(Gated(), x)
    fun = lambda p, x: Gated().apply({"params": p}, x)  # noqa: E731
    g = lfp_jax.lfp_value_and_feedback(fun, lfp_jax.rewards.softmax_loss,
                                       composite=lfp_jax.lfp_epsilon(1e-12), reward_argnums=(2,))
    got = jax.jit(g)(params, x, y)[1]

    def ce(p):
        z = fun(p, x)
        return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    grad = jax.grad(ce)(params)
    for layer in ("a", "b"):
        for leaf in ("kernel", "bias"):
            want = -0.5 * jnp.abs(params[layer][leaf]) * grad[layer][leaf]
            np.testing.assert_allclose(got[layer][leaf], want, rtol=1e-7, atol=1e-12)
    want = -jnp.abs(params["out"]["kernel"]) * grad["out"]["kernel"]     # after the product: the whole
    np.testing.assert_allclose(got["out"]["kernel"], want, rtol=1e-7, atol=1e-12)
