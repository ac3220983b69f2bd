"""Constant arguments (``input_argnums``): running statistics, masks and states passed to the model are
constants; only the named inputs carry reward. References: Theorem 1 (jax.grad), conservation of the
ε rule at ε = 0, and the messages a user reads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_theorem1, rel_err, theorem1_expected

import lfp_jax
from lfp_jax import errors, rewards


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(nn.relu(x))


def _bn_setup():
    x = jax.random.normal(jax.random.key(0), (6, 4), jnp.float64)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    v = BNNet().init(jax.random.key(1), x, False)
    params = lfp_jax.nn.torch_init(jax.random.key(2), v["params"])
    params["BatchNorm_0"]["scale"] = params["BatchNorm_0"]["scale"] + 0.3
    params["BatchNorm_0"]["bias"] = params["BatchNorm_0"]["bias"] + 0.2
    stats = {"mean": jnp.linspace(-0.5, 0.5, 8), "var": jnp.linspace(0.5, 2.0, 8)}
    return params, x, {"BatchNorm_0": stats}, y


def _eval(p, x, stats):
    return BNNet().apply({"params": p, "batch_stats": stats}, x, False)


def test_running_statistics_passed_as_an_argument_are_constants_with_input_argnums():
    params, x, stats, y = _bn_setup()
    assert_theorem1(_eval, params, x, stats, labels=y, input_argnums=(1,), rtol=1e-6)


def test_without_input_argnums_the_error_names_the_argument_and_the_keyword():
    params, x, stats, y = _bn_setup()
    g = lfp_jax.lfp_value_and_feedback(_eval, rewards.softmax_loss, reward_argnums=(3,))
    with pytest.raises(errors.NoRuleError) as info:
        g(params, x, stats, y)
    msg = str(info.value)
    assert "argument 2 (BatchNorm_0/mean, BatchNorm_0/var)" in msg
    assert "input_argnums=(1,)" in msg


def test_train_mode_with_statistics_passed_in_needs_no_input_argnums():
    """In train mode the running statistics only feed the updated statistics (aux), no output."""
    params, x, stats, y = _bn_setup()

    def train(p, x, stats):
        return BNNet().apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])

    # the Dense bias before a train-mode BatchNorm has zero gradient; its feedback is ~1e-10 of the
    # largest (the ε = 1e-12 stabilisers), hence the looser floor-relative tolerance
    assert_theorem1(train, params, x, stats, labels=y, has_aux=True, rtol=1e-4)


def test_constant_arguments_get_no_relevance_and_inputs_conserve_reward():
    """At ε → 0 without biases the ε rule conserves reward: Σ R_x = Σ reward; a float mask passed
    in is a constant, and its entry in the result is None."""
    w = jax.random.normal(jax.random.key(3), (4, 5), jnp.float64)
    x = jax.random.normal(jax.random.key(4), (3, 4), jnp.float64)
    mask = jnp.array([[1.0, 0.0, 1.0, 1.0, 0.0]])

    def fun(w, x, mask):
        return (x @ w) * mask / 0.6    # a dropout-style mask passed in

    reward = jax.random.normal(jax.random.key(5), (3, 5), jnp.float64) * mask
    _, fb_fn = lfp_jax.lfp_vjp(fun, w, x, mask, input_argnums=1, composite=lfp_jax.lfp_epsilon(1e-12))
    fb, relevance, mask_relevance = fb_fn(reward)
    assert mask_relevance is None
    np.testing.assert_allclose(relevance.sum(), reward.sum(), rtol=1e-6)
    # ε rule at ε → 0 by hand: s = R / y (masked entries carry no reward), F = |w| ⊙ xᵀ (s·mask/0.6)
    y = (x @ w) * mask / 0.6
    s = jnp.where(mask > 0, reward / jnp.where(mask > 0, y, 1.0), 0.0)
    np.testing.assert_allclose(fb, jnp.abs(w) * (x.T @ (s * mask / 0.6)), rtol=1e-6)


def test_input_argnums_under_jit_and_vmap():
    params, x, stats, y = _bn_setup()
    g = lfp_jax.lfp_value_and_feedback(_eval, rewards.softmax_loss, input_argnums=(1,),
                                       reward_argnums=(3,), allow_frozen=True)
    want = theorem1_expected(_eval, params, x, stats, labels=y)
    lfp12 = lfp_jax.lfp_value_and_feedback(_eval, rewards.softmax_loss, input_argnums=(1,),
                                           reward_argnums=(3,), composite=lfp_jax.lfp_epsilon(1e-12))
    got = jax.jit(lfp12)(params, x, stats, y)[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) < 1e-6
    per_example = jax.vmap(lambda xi, yi: g(params, xi[None], stats, yi[None])[1])(x, y)
    batch = g(params, x, stats, y)[1]
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(batch)):
        np.testing.assert_allclose(a.sum(0), b, rtol=1e-9, atol=1e-12)


def test_input_argnums_is_checked():
    params, x, stats, _ = _bn_setup()
    with pytest.raises(ValueError, match="overlap"):
        lfp_jax.lfp_vjp(_eval, params, x, stats, input_argnums=(0,))
    with pytest.raises(ValueError, match="input_argnums"):
        lfp_jax.lfp_vjp(_eval, params, x, stats, input_argnums=(3,))
    g = lfp_jax.lfp_value_and_feedback(_eval, rewards.softmax_loss, input_argnums=(3,),
                                       reward_argnums=(3,))
    with pytest.raises(ValueError, match="overlap"):
        g(params, x, stats, jnp.zeros(6, jnp.int32))
    with pytest.raises(errors.LFPError, match="input_argnums=\\(2,\\)"):  # the input named reaches nothing
        lfp_jax.lfp_vjp(lambda w, x, m: x @ w, jnp.ones((4, 2)), x, jnp.ones(3), input_argnums=(2,))


def test_naming_both_arguments_as_inputs_gives_their_product_its_rule():
    """The error's other fix: the statistics are an input too, and the product gets AttnLRP's rule."""
    params, x, stats, y = _bn_setup()
    kinds = {(s.kind, type(s.rule).__name__) for s in
             lfp_jax.find_sites(_eval, params, x, stats, input_argnums=(1, 2))}
    assert ("bilinear", "UniformProduct") in kinds
    eps = lfp_jax.lfp_epsilon(1e-12)  # the ε of the sum and product sites would blur the halves by ~1e-5
    both, const = (jax.jit(lfp_jax.lfp_grad(_eval, rewards.softmax_loss, input_argnums=k, reward_argnums=(3,),
                                            composite=eps))(params, x, stats, y) for k in ((1, 2), (1,)))
    # The uniform rule hands each of the two factors of (h − μ) · rsqrt(σ² + ε) half of the product's
    # reward. With the statistics constant the product is a linear map of h (its exact Jacobian), so
    # everything reached through the (h − μ) factor (BatchNorm's scale, the first Dense layer) gets
    # exactly half; what lies after the product (the offset, the last Dense layer) is unchanged.
    for path in (("BatchNorm_0", "scale"), ("Dense_0", "kernel"), ("Dense_0", "bias")):
        np.testing.assert_allclose(both[path[0]][path[1]], 0.5 * const[path[0]][path[1]], rtol=1e-9)
    for path in (("BatchNorm_0", "bias"), ("Dense_1", "kernel"), ("Dense_1", "bias")):
        np.testing.assert_allclose(both[path[0]][path[1]], const[path[0]][path[1]], rtol=1e-12)
    assert float(jnp.abs(const["Dense_0"]["kernel"]).max()) > 0
