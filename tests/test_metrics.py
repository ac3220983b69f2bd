"""Perturbation curves (lfp_jax.metrics) against closed forms, a NumPy loop and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from _helpers import to64

from benchmarks.faithfulness import numpy_curves
from experiments import models
from lfp_jax import metrics


def _linear_curves(r: np.ndarray, counts: np.ndarray):
    """Closed form for ``s(x) = Σ r`` with relevance ``r`` (a linear model, zero replacement, LRP-0):
    removing the ``n`` largest leaves ``Σ r − (sum of the n largest)``."""
    desc = np.sort(r)[::-1]
    asc = np.sort(r)
    total = r.sum()
    cum_d = np.concatenate([[0], np.cumsum(desc)])
    cum_a = np.concatenate([[0], np.cumsum(asc)])
    return total - cum_d[counts], total - cum_a[counts]


def test_hand_computed_linear_model():
    # s(x) = w·x with w = (1, 2, 3, 4), x = 1: relevance w ⊙ x = (1, 2, 3, 4), sum 10.
    w = jnp.array([1.0, 2.0, 3.0, 4.0])
    x = jnp.ones((1, 4))
    c = metrics.perturbation_curves(lambda x: x @ w, x, x * w, steps=4)
    np.testing.assert_allclose(c.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(c.morf[0], [10, 6, 3, 1, 0])      # 4, then 3, then 2, then 1 removed
    np.testing.assert_allclose(c.lerf[0], [10, 9, 7, 4, 0])      # 1, then 2, then 3, then 4 removed
    # trapezoids of width 1/4: (8 + 4.5 + 2 + 0.5)/4 and (9.5 + 8 + 5.5 + 2)/4
    np.testing.assert_allclose(c.auc_morf, [3.75])
    np.testing.assert_allclose(c.auc_lerf, [6.25])
    np.testing.assert_allclose(c.area_between, [2.5])


@pytest.mark.parametrize("steps", [12, 5, 3])
def test_linear_model_closed_form_with_groups(steps):
    rng = np.random.default_rng(0)
    b, n = 3, 24
    w = rng.normal(size=n)
    x = rng.normal(size=(b, n))
    group = (2,)                                  # pairs of features: relevance of a pair is its sum
    c = metrics.perturbation_curves(lambda x: x @ w, x, x * w, steps=steps, group=group)
    counts = np.rint(np.arange(steps + 1) * (n // 2) / steps).astype(int)
    for i in range(b):
        r = (x[i] * w).reshape(-1, 2).sum(1)
        morf, lerf = _linear_curves(r, counts)
        np.testing.assert_allclose(c.morf[i], morf, atol=1e-12)
        np.testing.assert_allclose(c.lerf[i], lerf, atol=1e-12)
        f = np.arange(steps + 1) / steps
        np.testing.assert_allclose(c.area_between[i], np.trapezoid(lerf, f) - np.trapezoid(morf, f),
                                   atol=1e-12)


def _lenet(batch=6):
    model = models.build("lenet", 10)
    x = jax.random.uniform(jax.random.key(1), (batch, 28, 28, 1), jnp.float64, -1, 1)
    params = to64(model.init(jax.random.key(0), x.astype(jnp.float32))["params"])
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return apply, params, x, labels


@pytest.mark.parametrize("group,steps", [((1, 1, 1), 14), ((4, 4, 1), 7), ((7, -1, 1), 4)])
def test_equals_numpy_loop_on_lenet(group, steps):
    apply, params, x, labels = _lenet()
    rows = jnp.arange(x.shape[0])
    score = jax.jit(lambda x: apply(params, x)[rows, labels])
    rel = jax.random.normal(jax.random.key(3), x.shape)
    c = metrics.perturbation_curves(score, x, rel, steps=steps, group=group, chunk=5)
    f, morf, lerf = numpy_curves(score, x, rel, steps, group=group)
    scale = np.abs(morf).max()
    np.testing.assert_allclose(c.fractions, f)
    np.testing.assert_allclose(c.morf, morf, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(c.lerf, lerf, rtol=1e-6, atol=1e-6 * scale)
    assert np.abs(morf[:, 0] - morf[:, -1]).max() > 1e-3      # the perturbation changes the score


def test_jit_equals_eager_and_batch_equals_loop():
    apply, params, x, labels = _lenet(4)
    rows = jnp.arange(x.shape[0])
    score = lambda x: apply(params, x)[rows, labels]  # noqa: E731
    rel = jax.random.normal(jax.random.key(4), x.shape)
    eager = metrics.perturbation_curves(score, x, rel, steps=8, group=(2, 2, 1), replacement="mean")
    jitted = jax.jit(lambda x, r: metrics.perturbation_curves(score, x, r, steps=8, group=(2, 2, 1),
                                                              replacement="mean"))(x, rel)
    np.testing.assert_allclose(jitted.morf, eager.morf, rtol=1e-10)
    np.testing.assert_allclose(jitted.lerf, eager.lerf, rtol=1e-10)
    for i in range(x.shape[0]):
        label = labels[i]
        one = metrics.perturbation_curves(lambda x, c=label: apply(params, x)[:, c], x[i:i + 1], rel[i:i + 1],
                                          steps=8, group=(2, 2, 1), replacement="mean")
        np.testing.assert_allclose(one.morf[0], eager.morf[i], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(one.lerf[0], eager.lerf[i], rtol=1e-9, atol=1e-9)


def test_chunking_does_not_change_curves():
    apply, params, x, labels = _lenet(3)
    rows = jnp.arange(x.shape[0])
    score = jax.jit(lambda x: apply(params, x)[rows, labels])
    rel = jax.random.normal(jax.random.key(5), x.shape)
    a = metrics.perturbation_curves(score, x, rel, steps=6, group=(4, 4, 1), chunk=1)
    b = metrics.perturbation_curves(score, x, rel, steps=6, group=(4, 4, 1), chunk=14)
    np.testing.assert_allclose(a.morf, b.morf, rtol=1e-10)
    np.testing.assert_allclose(a.lerf, b.lerf, rtol=1e-10)


def test_replacements():
    x = jax.random.normal(jax.random.key(0), (2, 10, 12, 3))
    everything = jnp.ones((2, 120), bool)
    mean = metrics.replace_groups(x, everything, group=(1, 1, 3), replacement="mean")
    np.testing.assert_allclose(mean, np.broadcast_to(np.asarray(x).mean(axis=(1, 2), keepdims=True), x.shape))
    blur = metrics.replace_groups(x, everything, group=(1, 1, 3), replacement="blur", sigma=2.0)
    # whole-sample reflection at the edges is scipy's "mirror"; radius 3σ = 6 either way
    expected = scipy.ndimage.gaussian_filter(np.asarray(x), sigma=(0, 2, 2, 0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(blur, expected, rtol=1e-10, atol=1e-12)
    half = jnp.arange(120)[None].repeat(2, 0) < 60                 # the first 5 rows of pixels
    given = metrics.replace_groups(x, half, group=(1, 1, 3), replacement=jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(given[:, :5], np.broadcast_to([1.0, 2.0, 3.0], (2, 5, 12, 3)))
    np.testing.assert_allclose(given[:, 5:], x[:, 5:])
    ids = jnp.array([[5, 6, 7, 8]])
    masked = metrics.replace_groups(ids, jnp.array([[True, False, True, False]]), replacement=99)
    np.testing.assert_array_equal(masked, [[99, 6, 99, 8]])


def _token_model():
    """A language model of token ids: embedding, tanh, mean over positions, dense to the vocabulary."""
    v, d = 11, 6
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"E": jax.random.normal(k1, (v, d)), "W": jax.random.normal(k2, (d, v)) / 3}

    def head(p, e):
        return jnp.mean(jnp.tanh(e), axis=1) @ p["W"]

    fun = lambda p, ids: head(p, p["E"][ids])  # noqa: E731
    return fun, head, params


def test_baselines_against_jax_grad():
    apply, params, x, labels = _lenet(3)
    got = metrics.baseline_attributions(apply, params, x, labels)
    s = lambda x: jnp.sum(apply(params, x)[jnp.arange(3), labels])  # noqa: E731
    g = jax.grad(s)(x)
    np.testing.assert_allclose(got["gradient"], g, rtol=1e-10)
    np.testing.assert_allclose(got["gradient_x_input"], x * g, rtol=1e-10)
    assert got["random"].shape == x.shape and float(got["random"].min()) >= 0
    # ε-LRP of a ReLU network with ε → 0 and no stabiliser at sums is close to gradient × input (LRP-0)
    np.testing.assert_allclose(np.sum(got["epsilon"], axis=(1, 2, 3)),
                               np.sum(x * g, axis=(1, 2, 3)), rtol=2e-2)


def test_token_ids_gradient_x_input_is_embedding_convention():
    fun, head, params = _token_model()
    ids = jnp.array([[1, 4, 4, 9, 2], [3, 0, 7, 7, 10]])
    labels = jnp.array([2, 5])
    got = metrics.baseline_attributions(fun, params, ids, labels, ("random", "gradient_x_input"))
    e = params["E"][ids]
    g = jax.grad(lambda e: jnp.sum(head(params, e)[jnp.arange(2), labels]))(e)
    np.testing.assert_allclose(got["gradient_x_input"], (e * g).sum(-1), rtol=1e-8, atol=1e-12)
    curves = metrics.faithfulness(fun, params, ids, labels, {"mine": (e * g).sum(-1)}, replacement=0,
                                  steps=5)
    assert list(curves) == ["random", "gradient_x_input", "epsilon", "mine"]   # no gradient for ids
    # deleting every token (id 0 everywhere) gives the same score for both orders
    np.testing.assert_allclose(curves["mine"].morf[:, -1], curves["mine"].lerf[:, -1])
    out0 = fun(params, jnp.zeros_like(ids))[jnp.arange(2), labels]
    np.testing.assert_allclose(curves["mine"].morf[:, -1], out0, rtol=1e-10)


def test_faithfulness_score_of_output_relevance_targets():
    """A contrastive target scores z_token − z_foil on every perturbed input."""
    import lfp_jax

    fun, head, params = _token_model()
    ids = jnp.array([[1, 4, 4, 9, 2]])
    seq = lambda p, ids: fun(p, ids)[:, None, :]  # noqa: E731   (batch, 1 position, vocabulary)
    logits = seq(params, ids)
    target = lfp_jax.targets.contrastive(logits, 3, 8)
    curves = metrics.faithfulness(seq, params, ids, target, baselines=("random",), replacement=0, steps=5)
    c = curves["random"]
    z = fun(params, ids)[0]
    np.testing.assert_allclose(c.morf[0, 0], z[3] - z[8], rtol=1e-10)
    z0 = fun(params, jnp.zeros_like(ids))[0]
    np.testing.assert_allclose(c.morf[0, -1], z0[3] - z0[8], rtol=1e-10)


def test_errors_say_what_to_do():
    x = jnp.ones((2, 4, 4, 3))
    score = lambda x: x.sum((1, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match="one size per axis"):
        metrics.perturbation_curves(score, x, x, group=(2, 2))
    with pytest.raises(ValueError, match="not a multiple"):
        metrics.perturbation_curves(score, x, x, group=(3, 1, 3))
    with pytest.raises(ValueError, match="fits neither"):
        metrics.perturbation_curves(score, x, jnp.ones((2, 5)), group=(1, 1, 3))
    with pytest.raises(ValueError, match="mask or pad token"):
        metrics.perturbation_curves(lambda i: i.sum(1) * 1.0, jnp.ones((2, 5), jnp.int32),
                                    jnp.ones((2, 5)), replacement="mean")
    with pytest.raises(ValueError, match="no gradient"):
        fun, _, params = _token_model()
        metrics.baseline_attributions(fun, params, jnp.ones((1, 3), jnp.int32), jnp.array([0]), ("gradient",))
    with pytest.raises(ValueError, match="one value per example"):
        metrics.perturbation_curves(lambda x: x.sum((2, 3)), x, x, group=(1, 1, 3))
