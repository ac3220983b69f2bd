"""Integer and boolean values carry no reward: indices, lengths, masks and predicates computed from the
input select as constants would; sorting and top_k are permutations; max/min of two input-dependent
values routes reward to the winner. References: Theorem 1 on piecewise-linear (ReLU, max, sort) models,
the branch taken, and hand-computed values."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import assert_theorem1, rel_err

import lfp_jax
from lfp_jax import rewards
from lfp_jax.nn import run_lif_layers


def _params(seed, shapes):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {name: jax.random.normal(k, shape, jnp.float64) / np.sqrt(shape[0])
            for k, (name, shape) in zip(keys, shapes.items())}


def _data(n=6, d=5, classes=4, seed=11):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d), jnp.float64), jax.random.randint(ky, (n,), 0, classes)


P = _params(0, {"w1": (5, 7), "a": (7, 7), "w2": (7, 4), "b1": (7,)})


def test_gather_at_an_argmax_index_computed_from_the_input():
    def fun(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        idx = jnp.argmax(h @ p["a"], axis=-1)                   # an integer computed from the input
        picked = jnp.take_along_axis(h, idx[:, None], axis=1)   # gather with that index
        return h @ p["w2"] + picked * jnp.arange(1.0, 5.0)

    x, y = _data()
    assert_theorem1(fun, P, x, labels=y, rtol=1e-6)


@pytest.mark.parametrize("select", ["sort", "top_k", "argsort"])
def test_sorting_and_top_k_route_reward_as_a_permutation(select):
    pick = {
        "sort": lambda h: jnp.sort(h, axis=-1),
        "top_k": lambda h: jax.lax.top_k(h, 4)[0],
        "argsort": lambda h: jnp.take_along_axis(h, jnp.argsort(-h, axis=-1), axis=-1),
    }[select]

    def fun(p, x):
        h = pick(jax.nn.relu(x @ p["w1"] + p["b1"]))
        return h[:, :4] @ p["a"][:4, :4]

    x, y = _data()
    assert_theorem1(fun, P, x, labels=y, rtol=1e-6)
    kinds = [s.kind for s in lfp_jax.find_sites(fun, P, x)]
    assert kinds == ["linear", "activation", "linear"]


def test_comparison_mask_of_another_value_is_a_constant_selector():
    """``where(g > 0, h, 0)`` with ``g`` and ``h`` from different layers gates ``h``: no site."""

    def fun(p, x):
        g = x @ p["w1"]
        h = jax.nn.relu(x @ p["a"][:5] + p["b1"])
        return jnp.where(g > 0, h, 0.0) @ p["w2"]

    x, y = _data()
    assert_theorem1(fun, P, x, labels=y, rtol=1e-6)
    assert [s.kind for s in lfp_jax.find_sites(fun, P, x)] == ["linear", "activation", "linear"]


def test_heaviside_written_as_a_comparison_is_still_an_activation():
    """Step nets train as before: (x > 0).astype(f) passes reward where it fires (identity rule)."""

    def fun(p, x):
        return (x @ p["w1"] > 0).astype(x.dtype) @ p["w2"]

    x = _data()[0]
    reward = jnp.ones((6, 4))
    out, fb_fn = lfp_jax.lfp_vjp(fun, P, x, composite=lfp_jax.lfp_epsilon(0.0))
    fb, _ = fb_fn(reward)
    z = x @ P["w1"]
    step = (z > 0).astype(z.dtype)
    r_step = step * ((reward / out) @ P["w2"].T)     # ε rule of the output layer at ε = 0
    np.testing.assert_allclose(fb["w1"], np.abs(P["w1"]) * (x.T @ (r_step / z)), rtol=1e-9)


@pytest.mark.parametrize("pattern", ["reshaped", "stacked_by_scan", "combined_with_an_index"])
def test_a_comparison_that_is_moved_before_its_cast_is_refused_not_detached(pattern):
    """Converted to float right away a comparison is a step activation; moved, stacked or combined
    with an index first it is neither an activation nor a selection the engine can tell: refused."""

    def step(p, x):
        h = x @ p["w1"] + p["b1"]
        if pattern == "reshaped":
            return (h > 0).reshape(6, 7, 1).reshape(6, 7).astype(x.dtype)
        if pattern == "combined_with_an_index":
            return ((h > 0) & (jnp.arange(7) < jnp.argmax(x, -1)[:, None])).astype(x.dtype)
        _, spikes = jax.lax.scan(lambda c, _: (c, h > c), jnp.zeros_like(h), None, length=2)
        return spikes.astype(x.dtype).sum(0)

    x, y = _data()
    fun = lambda p, x: step(p, x) @ p["w2"] + x @ p["w1"] @ p["w2"]  # noqa: E731
    with pytest.raises(lfp_jax.errors.NoRuleError, match="bool_to_float") as info:
        lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,))(P, x, y)
    assert "convert where you compare" in str(info.value)


def test_an_activation_written_with_jnp_select_is_refused_not_given_the_gradient():
    """jnp.select picks by an arg-max over stacked comparisons of the value it selects from."""

    def fun(p, x):
        h = x @ p["w1"] + p["b1"]
        return jnp.select([h < -1, h > 1], [-jnp.ones_like(h), jnp.ones_like(h)], h) @ p["w2"]

    x, y = _data()
    with pytest.raises(lfp_jax.errors.NoRuleError, match="nonlinear"):
        lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,))(P, x, y)


# the preset's other entries (spiking, pooling, ...) select no site of this model: expected
@pytest.mark.filterwarnings("ignore::lfp_jax.errors.UnmatchedRuleWarning")
def test_a_float_mask_of_another_value_is_a_product_and_without_its_rule_the_error_says_how_to_mask():
    def fun(p, x):
        return (x @ p["w1"]) * (x @ p["a"][:5] > 0).astype(x.dtype) @ p["w2"]

    x, y = _data()
    kinds = [(s.kind, s.label) for s in lfp_jax.find_sites(fun, P, x)]
    assert ("bilinear", "mul") in kinds and ("activation", "step") in kinds
    no_products = lfp_jax.Composite(tuple(e for e in lfp_jax.lfp_epsilon().entries
                                          if e[0].kind != "bilinear"))
    with pytest.raises(lfp_jax.errors.NoRuleError, match="bilinear") as info:
        lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,),
                                       composite=no_products)(P, x, y)
    assert "jnp.where(mask, x, 0)" in str(info.value)


def test_one_hot_of_an_argmax_in_a_scan_carry_is_a_constant_input_of_the_next_step():
    """A greedy decoder feeding one_hot(argmax(logits)) back (Flax's seq2seq decoder pattern)."""
    p = _params(3, {"w": (5, 6), "e": (4, 6), "v": (6, 4)})

    def fun(p, x):
        def step(prev, _):
            h = jax.nn.relu(x @ p["w"] + prev @ p["e"])
            logits = h @ p["v"]
            return jax.nn.one_hot(jnp.argmax(logits, -1), 4, dtype=x.dtype), logits

        _, logits = jax.lax.scan(step, jnp.zeros((x.shape[0], 4)), None, length=3)
        return logits.sum(0)

    x, y = _data()
    assert_theorem1(fun, p, x, labels=y, rtol=1e-6)


@pytest.mark.parametrize("taken", [True, False])
def test_cond_with_an_input_dependent_predicate_applies_the_branch_taken(taken):
    """The predicate is an integer: a constant selector. Feedback = that of the branch taken."""
    x, y = _data()
    x = x.at[0, 0].set(1.0 if taken else -1.0)

    def first(h):
        return jax.nn.relu(h) @ P["a"]

    def second(h):
        return jnp.tanh(h) * 2.0

    def fun(p, x):
        h = x @ p["w1"] + p["b1"]
        return jax.lax.cond(x[0, 0] > 0, first, second, h) @ p["w2"]

    def branch_inlined(p, x):
        h = x @ p["w1"] + p["b1"]
        return (first(h) if taken else second(h)) @ p["w2"]

    params = {k: P[k] for k in ("w1", "b1", "w2")}
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,))
    ref = lfp_jax.lfp_value_and_feedback(branch_inlined, rewards.softmax_loss, reward_argnums=(2,))
    got, want = g(params, x, y)[1], ref(params, x, y)[1]
    for k in params:
        assert rel_err(got[k], want[k]) < 1e-9, k
    jitted = jax.jit(g)(params, x, y)[1]
    for k in params:
        assert rel_err(jitted[k], want[k]) < 1e-9, k


def test_maxout_is_a_max_site_and_satisfies_theorem_1():
    p = _params(5, {"a": (5, 7), "b": (5, 7), "w2": (7, 4)})

    def fun(p, x):
        return jnp.maximum(x @ p["a"], x @ p["b"]) @ p["w2"]     # maxout of two linear pieces

    x, y = _data()
    sites = lfp_jax.find_sites(fun, p, x)
    assert [(s.kind, s.label, type(s.rule).__name__) for s in sites] == [
        ("linear", "dense", "Epsilon"), ("linear", "dense", "Epsilon"),
        ("max", "maximum", "WinnerTakeAll"), ("linear", "dense", "Epsilon")]
    assert re.search(r"\n2\s+max\s+maximum\s+WinnerTakeAll\(\)", lfp_jax.describe(fun, p, x))
    assert_theorem1(fun, p, x, labels=y, rtol=1e-6)
    assert_theorem1(lambda p, x: jnp.minimum(x @ p["a"], x @ p["b"]) @ p["w2"], p, x, labels=y, rtol=1e-6)


def test_maxout_written_with_where_is_a_max_site():
    p = _params(5, {"a": (5, 7), "b": (5, 7), "w2": (7, 4)})

    def fun(p, x):
        u, v = x @ p["a"], x @ p["b"]
        return jnp.where(u > v, u, v) @ p["w2"]

    x, y = _data()
    kinds = [(s.kind, s.label) for s in lfp_jax.find_sites(fun, p, x)]
    assert kinds == [("linear", "dense"), ("linear", "dense"), ("max", "where_max"), ("linear", "dense")]
    assert_theorem1(fun, p, x, labels=y, rtol=1e-6)


def test_max_of_two_values_gives_the_winner_all_reward_and_splits_ties():
    """Hand-computed: y = max(a, b) with a = x·wa, b = x·wb; at ε = 0 the reward of y goes to the
    larger operand, and half to each where they are equal."""
    x = jnp.array([[1.0], [2.0], [3.0]])
    p = {"wa": jnp.array([[2.0]]), "wb": jnp.array([[3.0]])}
    a, b = x * 2.0, x * 3.0
    b = b.at[1].set(a[1])  # a tie in the second sample: wb is applied through a mask

    def fun(p, x):
        return jnp.maximum(x @ p["wa"], (x @ p["wb"]) * jnp.array([[1.0], [2 / 3], [1.0]]))

    reward = jnp.array([[1.0], [4.0], [-2.0]])
    _, fb_fn = lfp_jax.lfp_vjp(fun, p, x, composite=lfp_jax.lfp_epsilon(0.0))
    fb, _ = fb_fn(reward)
    # sample 0: b wins (3 > 2): R_b = 1; sample 1: tie (4 = 4): 2 each; sample 2: b wins: R_b = -2.
    # A one-weight dense layer's feedback is |w| · Σ R / w (= R at ε = 0 since R_w = w c_w).
    np.testing.assert_allclose(fb["wa"], [[2.0]], rtol=1e-9)
    np.testing.assert_allclose(fb["wb"], [[1.0 + 2.0 - 2.0]], rtol=1e-9)


def test_max_of_zero_stays_a_relu_activation():
    kinds = [(s.kind, s.label) for s in lfp_jax.find_sites(
        lambda p, x: jnp.maximum(x @ p["w1"], 0.0) @ p["w2"], P, _data()[0])]
    assert kinds == [("linear", "dense"), ("activation", "relu"), ("linear", "dense")]


def test_max_of_two_spike_trains_splits_reward_between_identical_branches():
    """The reference's spiking residual max(x, x_skip): with two identical LIF branches every spike
    ties, so each branch earns half of the feedback a single branch earns."""
    k = jax.random.split(jax.random.key(8), 2)
    w = jax.random.normal(k[0], (6, 5), jnp.float64)
    x = jax.random.uniform(k[1], (4, 6), jnp.float64) * 2.0

    def single(p, x):
        return run_lif_layers([lambda h: h @ p["w"]], x, steps=6)

    def twin(p, x):
        s1 = run_lif_layers([lambda h: h @ p["w"]], x, steps=6)
        s2 = run_lif_layers([lambda h: h @ p["w_copy"]], x, steps=6)
        return jnp.maximum(s1, s2)

    reward = jax.random.normal(jax.random.key(9), (6, 4, 5), jnp.float64)
    _, fb_single = lfp_jax.lfp_vjp(single, {"w": w}, x)
    _, fb_twin = lfp_jax.lfp_vjp(twin, {"w": w, "w_copy": w}, x)
    assert "max" in [s.kind for s in lfp_jax.find_sites(twin, {"w": w, "w_copy": w}, x)]
    one, two = fb_single(reward)[0]["w"], fb_twin(reward)[0]
    np.testing.assert_allclose(two["w"], one / 2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two["w_copy"], one / 2, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_flax_rnn_with_sequence_lengths_computed_from_its_input():
    """nn.RNN masks its carries with the lengths (an integer computed from the input)."""

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            lengths = jnp.sum(jnp.any(x != 0, axis=-1), axis=-1)
            h = nn.RNN(nn.SimpleCell(6, activation_fn=nn.relu, param_dtype=jnp.float64),
                       return_carry=True)(x, seq_lengths=lengths)[0]
            return nn.Dense(3, param_dtype=jnp.float64)(h)

    x = jax.random.normal(jax.random.key(4), (4, 5, 3), jnp.float64)
    x = x * (jnp.arange(5)[None, :, None] < jnp.array([5, 3, 4, 2])[:, None, None])
    y = jnp.array([0, 1, 2, 0])
    params = lfp_jax.nn.torch_init(jax.random.key(2), Classifier().init(jax.random.key(1), x)["params"])
    assert_theorem1(lambda p, x: Classifier().apply({"params": p}, x), params, x, labels=y, rtol=1e-6)
