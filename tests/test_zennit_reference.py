"""Classic LRP against zennit 0.5.1 (fixtures from tools/zennit_reference/make_fixtures.py).

The same weights and inputs in float64: an MLP, a CNN with max and average pooling, and a CNN with
eval-mode BatchNorms (merged into their layers by zennit's canonizer, by the rules' site here); biases
on, inputs with exact zeros, a random output relevance of both signs. Every rule alone on all linear
layers and every zennit preset must give zennit's input relevance to 1e-6 relative.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lfp_jax
from lfp_jax import Match, composites, rules
from lfp_jax._report import rule_name as _rule_name

DATA = pathlib.Path(__file__).parent / "data" / "zennit"
NCHW = ("NCHW", "OIHW", "NCHW")


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _load(name):
    data = np.load(DATA / f"{name}.npz")
    return {k: data[k] for k in data.files}


def _dense(p, k, x):
    return x @ p[f"param/{k}.weight"].T + p[f"param/{k}.bias"]


def _conv(p, k, x, padding):
    y = lax.conv_general_dilated(x, p[f"param/{k}.weight"], (1, 1), padding, dimension_numbers=NCHW)
    return y + p[f"param/{k}.bias"][None, :, None, None]


def _bn(p, k, x, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = p[f"bn/{k}.running_mean"].reshape(shape), p[f"bn/{k}.running_var"].reshape(shape)
    scale, shift = p[f"param/{k}.weight"].reshape(shape), p[f"param/{k}.bias"].reshape(shape)
    return (x - mean) * (scale * lax.rsqrt(var + eps)) + shift  # flax's eval-mode BatchNorm


def _max_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")


def _avg_pool(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") / 4.0


def mlp(p, x):
    h = jax.nn.relu(_dense(p, 0, x))
    h = jax.nn.relu(_dense(p, 2, h))
    return _dense(p, 4, h)


def cnn(p, x):
    h = _max_pool(jax.nn.relu(_conv(p, 0, x, ((1, 1), (1, 1)))))
    h = _avg_pool(jax.nn.relu(_conv(p, 3, h, "VALID")))
    h = jax.nn.relu(_dense(p, 7, h.reshape(h.shape[0], -1)))
    return _dense(p, 9, h)


BN_EPS = float(np.load(DATA / "bn.npz")["bn_eps"])


def bn(p, x):
    eps = BN_EPS
    h = _max_pool(jax.nn.relu(_bn(p, 1, _conv(p, 0, x, ((1, 1), (1, 1))), eps)))
    h = jax.nn.relu(_bn(p, 5, _conv(p, 4, h, "VALID"), eps))
    h = jax.nn.relu(_bn(p, 9, _dense(p, 8, h.reshape(h.shape[0], -1)), eps))
    return _dense(p, 11, h)


NETS = {"mlp": mlp, "cnn": cnn, "bn": bn}


def _on_linear(rule):
    return composites.attn_lrp(1e-6).with_rules((Match(kind="linear"), rule))


def _cases(low, high):
    return {
        "epsilon": _on_linear(rules.Epsilon(1e-6)),
        "epsilon_nobias": _on_linear(rules.LinearRule(1e-6, zero_bias=True)),
        "zplus": _on_linear(rules.ZPlus(1e-6)),
        "zplus_nobias": _on_linear(rules.ZPlus(1e-6, zero_bias=True)),
        "alpha2_beta1": _on_linear(rules.AlphaBeta(1e-6, alpha=2.0, beta=1.0)),
        "alpha1_beta0": _on_linear(rules.AlphaBeta(1e-6, alpha=1.0, beta=0.0)),
        "gamma": _on_linear(rules.Gamma(1e-6, gamma=0.25)),
        "gamma_nobias": _on_linear(rules.Gamma(1e-6, zero_bias=True, gamma=0.25)),
        "flat": _on_linear(rules.Flat(1e-6)),
        "wsquare": _on_linear(rules.WSquare(1e-6)),
        "zbox": _on_linear(rules.ZBox(1e-6, low=low, high=high)),
        "epsilon_plus": composites.epsilon_plus(),
        "epsilon_plus_flat": composites.epsilon_plus_flat(),
        "epsilon_alpha2_beta1": composites.epsilon_alpha2_beta1(),
        "epsilon_alpha2_beta1_flat": composites.epsilon_alpha2_beta1_flat(),
        "epsilon_gamma_box": composites.epsilon_gamma_box(low, high),
    }


CASES = list(_cases(0.0, 1.0))


@pytest.mark.parametrize("net", list(NETS))
def test_every_rule_and_preset_gives_zennits_relevance(net):
    data = _load(net)
    params = {k: jnp.asarray(v) for k, v in data.items() if k.startswith(("param/", "bn/"))}
    x, target = jnp.asarray(data["x"]), jnp.asarray(data["target"])
    np.testing.assert_allclose(NETS[net](params, x), data["logits"], rtol=1e-10)
    assert sorted(k.removeprefix("relevance/") for k in data if k.startswith("relevance/")) == sorted(CASES)
    cases = _cases(float(data["low"]), float(data["high"]))

    @jax.jit  # all cases in one program: one compile instead of sixteen (half the test's time)
    def explain(params, x, target):
        return {case: lfp_jax.lrp(NETS[net], composite)(params, x, target=target)[1]
                for case, composite in cases.items()}

    failures = []
    for case, relevance in explain(params, x, target).items():
        expected = data[f"relevance/{case}"]
        scale = np.abs(expected).max()
        err = float(np.abs(np.asarray(relevance) - expected).max() / scale)
        if not err <= 1e-6:
            failures.append(f"{case}: max |Δ| / max |R| = {err:.3g}")
    assert not failures, f"{net}: " + "; ".join(failures)


@pytest.mark.parametrize("net", ["mlp", "bn"])
def test_relevance_at_black_pixels_is_kept(net):
    """Flat gives relevance to inputs that are exactly 0 (and to zero activations in between); the input
    relevance conserves the output relevance. (The CNN's average pooling has the ε rule, which by
    definition gives none to zero inputs: there zennit loses the same share.)"""
    data = _load(net)
    params = {k: jnp.asarray(v) for k, v in data.items() if k.startswith(("param/", "bn/"))}
    x, target = jnp.asarray(data["x"]), jnp.asarray(data["target"])
    zeros = np.asarray(x) == 0
    assert zeros.mean() > 0.2
    _, relevance = lfp_jax.lrp(NETS[net], _on_linear(rules.Flat(1e-6)))(params, x, target=target)
    relevance = np.asarray(relevance)
    assert np.abs(relevance[zeros]).sum() > 0.2 * np.abs(relevance).sum()
    np.testing.assert_allclose(relevance.reshape(len(x), -1).sum(1), np.asarray(target).sum(1), rtol=1e-4)


def test_the_two_one_layer_examples_give_zennits_numbers():
    """z⁺ with a bias that nearly cancels the output, and flat with a zero input (issue 11)."""
    dense = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    params = {"w": jnp.array([[1.0], [-1.0]]), "b": jnp.array([-0.5 + 1e-4])}
    _, rel = lfp_jax.lrp(dense, _on_linear(rules.ZPlus()))(params, jnp.array([[1.0, 0.5]]),
                                                         target=jnp.ones((1, 1)))
    np.testing.assert_allclose(rel, [[1 / (1 + 1e-6), 0.0]], rtol=1e-12)  # z⁺ = 1·1 (b⁺ = 0)
    params = {"w": jnp.array([[1.0], [1.0]]), "b": jnp.zeros(1)}
    _, rel = lfp_jax.lrp(dense, _on_linear(rules.Flat()))(params, jnp.array([[0.0, 1.0]]),
                                                        target=jnp.ones((1, 1)))
    np.testing.assert_allclose(rel, [[0.5 / (1 + 0.5e-6), 0.5 / (1 + 0.5e-6)]], rtol=1e-12)


def test_first_layer_selector_needs_no_module_path():
    """Match(first=True): the linear site reading the input, through a reshape and a normalisation."""
    data = _load("cnn")
    params = {k: jnp.asarray(v) for k, v in data.items() if k.startswith("param/")}
    x = jnp.asarray(data["x"])

    def normalised(p, x):
        return cnn(p, ((x - 0.5) / 0.25).reshape(x.shape))

    found = lfp_jax.find_sites(normalised, params, x, composite=composites.epsilon_plus_flat())
    linear = [(s.label, s.first, type(s.rule).__name__) for s in found if s.kind == "linear"]
    assert linear == [("conv", True, "Flat"), ("conv", False, "ZPlus"), ("dense", False, "Epsilon"),
                      ("dense", False, "Epsilon")]
    composite = composites.epsilon_gamma_box(-2.0, 2.0)
    table = lfp_jax.describe(normalised, params, x, composite=composite)
    assert "composite: epsilon_gamma_box(low=-2, high=2, epsilon=1e-06, gamma=0.25" in table
    names = [_rule_name(s.rule) for s in lfp_jax.find_sites(normalised, params, x, composite=composite)
             if s.kind == "linear"]
    assert names == ["ZBox(1e-06, low=-2.0, high=2.0)", "Gamma(1e-06, gamma=0.25)", "Epsilon(1e-06)",
                     "Epsilon(1e-06)"]


def test_rule_parameters_are_validated():
    with pytest.raises(ValueError, match="alpha - beta must be 1"):
        rules.AlphaBeta(alpha=2.0, beta=2.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        rules.AlphaBeta(alpha=-1.0, beta=-2.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        rules.Gamma(gamma=-0.1)
    with pytest.raises(ValueError, match="low must be <= high"):
        rules.ZBox(low=1.0, high=0.0)
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        rules.ZPlus(-1e-6)
    with pytest.raises(TypeError, match="pairs"):
        composites.attn_lrp().with_rules(rules.ZPlus())


def test_with_rules_names_what_changed():
    composite = lfp_jax.lfp_epsilon().with_rules((Match(kind="linear", label="conv"), rules.ZPlus()))
    assert composite.name == ("lfp_epsilon(epsilon=1e-06).with_rules(Match(kind='linear', label='conv') "
                              "-> ZPlus(1e-06))")


def _flat_first():
    return composites.attn_lrp().with_rules((Match(kind="linear", first=True), rules.Flat(0.0)))


def test_a_bias_after_a_transposed_product_is_part_of_the_layer():
    """(Wᵀ xᵀ)ᵀ + b, as equinox's Linear lowers under vmap: z⁺ still puts b⁺ into z⁺ (the issue's example)."""
    fun = lambda p, x: (p["w"].T @ x.T).T + p["b"]  # noqa: E731
    params = {"w": jnp.array([[1.0], [-1.0]]), "b": jnp.array([-0.5 + 1e-4])}
    _, rel = lfp_jax.lrp(fun, _on_linear(rules.ZPlus()))(params, jnp.array([[1.0, 0.5]]),
                                                         target=jnp.ones((1, 1)))
    np.testing.assert_allclose(rel, [[1 / (1 + 1e-6), 0.0]], rtol=1e-12)


@pytest.mark.parametrize("wrap", ["plain", "checkpoint"])
def test_flat_first_layer_after_an_input_normalisation_and_under_remat(wrap):
    """Relevance of the normalised pixels passes to the raw pixels unchanged, zeros included, also when the
    model is wrapped in jax.checkpoint (the first layer is found inside the body)."""
    def fun(w, x):
        return ((x - 0.5) / 0.25) @ w

    fun = jax.checkpoint(fun) if wrap == "checkpoint" else fun
    w, x = jnp.array([[1.0], [-2.0], [3.0]]), jnp.array([[0.0, 0.49, 1.0]])
    found = lfp_jax.find_sites(fun, w, x, composite=_flat_first())
    assert [(s.kind, s.first, type(s.rule).__name__) for s in found] == [("linear", True, "Flat")]
    _, rel = lfp_jax.lrp(fun, _flat_first())(w, x, target=jnp.ones((1, 1)))
    np.testing.assert_allclose(rel, [[1 / 3, 1 / 3, 1 / 3]], rtol=1e-12)


def test_half_precision_zplus_on_a_black_receptive_field_stays_finite():
    fun = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    params = {"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]], jnp.float16),
              "b": jnp.array([-0.5, 0.0], jnp.float16)}
    _, rel = lfp_jax.lrp(fun, _on_linear(rules.ZPlus()))(params, jnp.zeros((1, 2), jnp.float16),
                                                       target=jnp.ones((1, 2), jnp.float16))
    np.testing.assert_array_equal(np.asarray(rel, np.float32), [[0.0, 0.0]])


def test_module_paths_select_sites_in_explanations_of_plain_models():
    """Under lrp the weights are constants; they still name their sites for Match(path=...)."""
    fun = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
    p = {"w1": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "w2": jnp.array([[1.0], [1.0]])}
    x = jnp.array([[0.0, 1.0]])
    composite = _on_linear(rules.Epsilon(1e-6)).with_rules((Match(path="w1"), rules.Flat(0.0)))
    _, rel = lfp_jax.lrp(fun, composite)(p, x, target=jnp.ones((1, 1)))
    # layer 2 (ε): R_h = h ⊙ w2 / stab(z) = [0, 2] / 2 → [0, 1]; flat at layer 1 spreads each R_h over both x
    np.testing.assert_allclose(rel, [[0.5, 0.5]], rtol=1e-5)


def test_lfp_vjp_returns_the_same_input_relevance_at_zero_inputs():
    """lfp_vjp (training: parameter feedback too) hands the flat rule's R to the zero input as lrp does;
    the feedback of W is 0 (z = f(1, 1) does not depend on W) and that of b is |b|·∂z/∂b = 0 (flat has
    no bias term)."""
    fun = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    params = {"w": jnp.array([[1.0], [1.0]]), "b": jnp.array([0.3])}
    composite = lfp_jax.lfp_epsilon().with_rules((Match(kind="linear"), rules.Flat(0.0)))
    out, feedback_fn = lfp_jax.lfp_vjp(fun, params, jnp.array([[0.0, 1.0]]), composite=composite)
    feedback, rel = feedback_fn(jnp.ones_like(out))
    np.testing.assert_allclose(rel, [[0.5, 0.5]], rtol=1e-12)
    np.testing.assert_allclose(feedback["w"], 0.0)
    np.testing.assert_allclose(feedback["b"], 0.0)
