"""Attention scores recomputed in the backward pass (lfp_jax._remat) and the block-output ε factor.

The numbers themselves are checked against values saved before these changes in
``tests/test_lm_fixture.py`` (whose models have score regions, asserted here); these tests check that
the regions are found where they should be, that the compiled step then keeps less, and the factor's
formula at its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfp_jax
from benchmarks import language_models
from lfp_jax import _remat
from lfp_jax._trace import Traced
from lfp_jax.composites import lfp_epsilon
from lfp_jax.rules._base import stabilizer_factor
from tools import lm_feedback_fixture as fixture


def _model(name, dtype=jnp.float32, **size):
    size = dict(fixture.CONFIG, **size)
    size.update(hidden=32) if name == "bert" else size.update(hidden=24)
    if name == "bert":
        size["max_len"] = 16
    model = language_models.build(name, dtype, **size)
    ids = language_models.batch(jax.random.key(3), size["vocab"], fixture.BATCH, fixture.SEQ)
    x, y = ids[:, :-1], (ids[:, :-1] if name == "bert" else ids[:, 1:])
    params = language_models.init(model, jax.random.key(4), x)
    return (lambda p, x: model.apply({"params": p}, x)), params, x, y


@pytest.mark.parametrize("name", ["llama", "gemma", "bert"])
def test_every_attention_layer_of_the_fixture_models_is_a_score_region(name):
    fun, params, x, _ = _model(name)
    plan = Traced(fun, (params, x), lfp_epsilon(), (0,), False, None, None).plan
    regions = list(_remat.score_regions(plan).values())
    assert len(regions) == fixture.CONFIG["depth"]
    g = plan.graph
    for r in regions:
        product, softmax = r.steps[0], r.steps[-1]
        assert (product.kind, softmax.kind) == ("bilinear", "softmax")
        # q and k (and masks) are read from outside, never an array of the scores' size
        scores = g.avals[softmax.output].size
        assert all(g.avals[a].size < scores for a in r.inputs)
        assert len([a for a in r.inputs if jnp.issubdtype(g.avals[a].dtype, jnp.floating)]) >= 2


def test_the_compiled_step_keeps_less_with_the_scores_recomputed(monkeypatch):
    fun, params, x, y = _model("llama", width=32, heads=4)
    x, y = (jnp.tile(a, (1, 8)) for a in (x, y))  # sequence 56: the scores dominate
    lfp = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                     allow_frozen=True)

    def temp():
        c = jax.jit(lambda p, x, y: lfp(p, x, y)[1]).lower(params, x, y).compile()
        return c.memory_analysis().temp_size_in_bytes

    recomputed = temp()
    monkeypatch.setattr(_remat, "score_regions", lambda plan: {})
    kept = temp()
    scores = fixture.BATCH * 4 * x.shape[1] ** 2 * 4  # one layer's f32 scores
    assert kept - recomputed >= scores


def test_recomputed_regions_under_vmap_give_the_per_example_feedback():
    fun, params, x, y = _model("gemma", jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    grad = jax.jit(lfp_jax.lfp_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                    allow_frozen=True))
    batched = jax.vmap(grad, in_axes=(None, 0, 0))(params, x[:, None], y[:, None])
    for k in range(x.shape[0]):
        one = grad(params, x[k:k + 1], y[k:k + 1])
        for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_allclose(b[k], a, rtol=2e-5, atol=1e-7 * float(jnp.abs(a).max()) + 1e-12)


def test_training_through_recomputed_regions_lowers_the_loss():
    """LFP steps on a fixed batch lower the loss with every attention layer a recomputed region, and
    the query and key projections, whose reward crosses only the recomputed scores, get feedback (a
    recomputation that lost the cotangent would leave them at 0)."""
    fun, params, x, y = _model("llama")
    lfp = jax.jit(lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,),
                                             allow_frozen=True))
    opt = optax.adam(1e-2)
    state = opt.init(params)
    losses = []
    for _ in range(6):
        logits, grads = lfp(params, x, y)
        for layer in range(fixture.CONFIG["depth"]):
            for proj in ("query", "key"):
                assert float(jnp.abs(grads[f"layer_{layer}_attn"][proj]["kernel"]).max()) > 0
        losses.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()))
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("eps", [1e-6, 0.25, 0.0])
def test_stabilizer_factor_is_y_over_the_stabilised_y(eps):
    y = np.array([2.0, -3.0, 1e-7, -1e-7, 0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
    c = np.array([1.5, -2.0, 4.0, 3.0, 7.0, 5.0, 2.0, 9.0, 1.0], np.float32)
    got = np.asarray(stabilizer_factor(jnp.asarray(c), jnp.asarray(y), eps))
    with np.errstate(invalid="ignore", divide="ignore"):
        stab = y + np.where(y >= 0, eps, -eps)   # sign(0) = +1
        want = np.where(y == 0, 0.0, c * y / stab)   # LRP-0 at y = 0; 0/ε = 0 for ε > 0
    want[6:8] = c[6:8]  # infinite y: the limit y / (y + ε·sign y) → 1 (the softmax rule zeros masked scores)
    np.testing.assert_allclose(got[:8], want[:8], rtol=1e-6)
    assert np.isnan(got[8])  # a NaN stays NaN, as in jax.grad


def test_stabilizer_factor_has_no_cancellation_for_tiny_y():
    # |y| from far below ε to far above it: float32 within a few ulp of the float64 formula
    y = np.concatenate([np.logspace(-30, 6, 200), -np.logspace(-30, 6, 200)]).astype(np.float32)
    c = np.linspace(-3, 3, y.size).astype(np.float32)
    got = np.asarray(stabilizer_factor(jnp.asarray(c), jnp.asarray(y), 1e-6), np.float64)
    y64 = y.astype(np.float64)
    want = c * y64 / (y64 + np.where(y64 >= 0, 1e-6, -1e-6))
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=1e-37)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stabilizers_round_once_in_16_bit_types(dtype):
    # the factor and the ε division are evaluated in float32 and rounded once to the 16-bit type
    # (per-operation rounding, as before, was correctly rounded for about three inputs in four)
    from lfp_jax.rules._base import stable_divide
    rng = np.random.default_rng(0)
    y = (rng.standard_normal(4096) * np.logspace(-4, 2, 4096)).astype(np.float32)
    c = rng.standard_normal(4096).astype(np.float32)
    y16, c16 = jnp.asarray(y, dtype), jnp.asarray(c, dtype)
    y32, c32 = np.asarray(y16, np.float64), np.asarray(c16, np.float64)
    stab = y32 + np.where(y32 >= 0, 1e-3, -1e-3)
    for got, exact in ((stabilizer_factor(c16, y16, 1e-3), c32 * y32 / stab),
                       (stable_divide(c16, y16, 1e-3), c32 / stab)):
        assert got.dtype == dtype
        # rounded once: the exact value lies between the midpoints to the 16-bit neighbours of the
        # result (correct rounding; float32's own error allowed at ties)
        g = np.asarray(got, np.float64)
        up = np.asarray(jnp.nextafter(got, jnp.asarray(np.inf, dtype)), np.float64)
        down = np.asarray(jnp.nextafter(got, jnp.asarray(-np.inf, dtype)), np.float64)
        slack = 1e-6 * np.abs(exact)
        assert np.all((exact <= (g + up) / 2 + slack) & (exact >= (g + down) / 2 - slack))
