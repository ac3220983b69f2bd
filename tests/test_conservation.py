"""The conservation report: with zero biases and ε = 0 every conservative rule conserves layer by layer
(Σ R in = Σ R out at every site, and the input relevance sums to the output relevance); biases and ε
show up as gaps at the sites that have them; strict mode raises there."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfp_jax
from lfp_jax import Match, composites, rules
from lfp_jax.errors import ConservationError

DATA = pathlib.Path(__file__).parent / "data" / "zennit"


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _softplus_mlp(p, x):
    """Every layer's inputs are positive and every unit has weights of both signs, so the denominators of
    z⁺ and α-β (positive and negative contributions) never vanish."""
    h = jax.nn.softplus(x @ p["w1"])
    h = jax.nn.softplus(h @ p["w2"])
    return h @ p["w3"]


def _softplus_params():
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(6, 7), (7, 5), (5, 3)]
    return {f"w{k + 1}": jax.random.normal(key, shape, jnp.float64)
            for k, (key, shape) in enumerate(zip(keys, shapes))}


CONSERVATIVE = {
    "epsilon": rules.Epsilon(0.0),
    "lrp0": rules.LinearRule(0.0, zero_bias=True),
    "zplus": rules.ZPlus(0.0, zero_bias=True),
    "alpha2_beta1": rules.AlphaBeta(0.0, zero_bias=True, alpha=2.0, beta=1.0),
    "gamma": rules.Gamma(0.0, zero_bias=True, gamma=0.25),
    "gamma_original": rules.Gamma(0.0, zero_bias=True, gamma=0.25, generalized=False),
    "flat": rules.Flat(0.0),
    "wsquare": rules.WSquare(0.0, zero_bias=True),
    "zbox": rules.ZBox(0.0, zero_bias=True, low=-4.0, high=4.0),
}


@pytest.mark.parametrize("name", list(CONSERVATIVE))
def test_every_conservative_rule_conserves_layer_by_layer(name):
    p = _softplus_params()
    x = jax.random.uniform(jax.random.key(1), (4, 6), jnp.float64, -3.0, 3.0)
    target = jax.random.normal(jax.random.key(2), (4, 3), jnp.float64)
    composite = composites.attn_lrp(0.0).with_rules((Match(kind="linear"), CONSERVATIVE[name]))
    report = lfp_jax.conservation(_softplus_mlp, p, x, target=target, composite=composite, strict=True,
                                  tolerance=1e-10)
    assert [s.kind for s in report.sites] == ["linear", "activation"] * 2 + ["linear"]
    total = float(jnp.sum(target))
    for site in report.sites:
        assert site.conservative
        np.testing.assert_allclose(site.relevance_in, total, rtol=1e-10)
        np.testing.assert_allclose(site.relevance_out, total, rtol=1e-10)
    np.testing.assert_allclose(report.input_relevance, total, rtol=1e-10)
    # the report's input relevance is what lrp returns
    _, rel = lfp_jax.lrp(_softplus_mlp, composite)(p, x, target=target)
    np.testing.assert_allclose(float(jnp.sum(rel)), total, rtol=1e-10)


def _bn_net():
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_zennit_reference import bn

    data = np.load(DATA / "bn.npz")
    params = {k: jnp.asarray(data[k]) for k in data.files if k.startswith(("param/", "bn/"))}
    return bn, params, jnp.asarray(data["x"]), jnp.asarray(data["target"])


@pytest.mark.parametrize("name", ["lrp0", "gamma", "flat", "wsquare"])
def test_merged_batch_norm_layers_conserve_without_their_merged_bias(name):
    """The BatchNorm net (ReLU, max pooling, eval-mode BatchNorm merged into each layer): with the merged
    biases left out and ε = 0, rules whose denominators cannot vanish conserve at every site."""
    fun, params, x, target = _bn_net()
    composite = composites.attn_lrp(0.0).with_rules((Match(kind="linear"), CONSERVATIVE[name]))
    report = lfp_jax.conservation(fun, params, x, target=target, composite=composite, strict=True,
                                  tolerance=1e-9)
    np.testing.assert_allclose(report.input_relevance, float(jnp.sum(target)), rtol=1e-9)
    assert max(abs(s.relative_gap) for s in report.sites) < 1e-9


def test_biases_and_epsilon_show_where_they_absorb_and_strict_mode_raises():
    fun, params, x, target = _bn_net()
    report = lfp_jax.conservation(fun, params, x, target=target, composite=composites.epsilon_plus())
    linear = [s for s in report.sites if s.kind == "linear"]
    assert all("bias" in s.absorbed and "ε=1e-06" in s.absorbed for s in linear)
    assert all(abs(s.gap) > 1e-3 for s in linear)  # the merged biases take a share
    assert all(abs(s.relative_gap) < 1e-12 for s in report.sites
               if s.kind in ("activation", "max_pool") and "block" not in s.absorbed)
    # consecutive sites hand over exactly what the next one receives
    by_index = {s.index: s for s in report.sites}
    np.testing.assert_allclose(by_index[len(report.sites) - 1].relevance_in, float(jnp.sum(target)),
                               rtol=1e-12)
    _, rel = lfp_jax.lrp(fun, composites.epsilon_plus())(params, x, target=target)
    np.testing.assert_allclose(report.sites[0].relevance_out, float(jnp.sum(rel)), rtol=1e-10)
    np.testing.assert_allclose(report.input_relevance, float(jnp.sum(rel)), rtol=1e-10)
    text = str(report)
    assert text.startswith("composite: epsilon_plus(") and "R in" in text and "absorbed" in text
    for s in report.sites:   # every number is printed whole on its site's first line (never wrapped)
        row = next(line for line in text.splitlines() if line.split()[:1] == [str(s.index)])
        for number in (f"{s.relevance_in:.6g}", f"{s.relevance_out:.6g}", f"{s.gap:.3g}",
                       f"{100 * s.relative_gap:.3g}"):
            assert f" {number} " in f" {row} ", (number, row)
    assert report.to_dict()["sites"][0]["kind"] == "linear"
    with pytest.raises(ConservationError, match="lose more than 0.001") as err:
        report.check(1e-3)
    assert "zero_bias=True" in str(err.value)
    with pytest.raises(ConservationError):
        lfp_jax.conservation(fun, params, x, target=target, composite=composites.epsilon_plus(), strict=True)
    lfp_jax.conservation(fun, params, x, target=target, strict=True, tolerance=1e-9,
                         composite=composites.epsilon_plus(0.0, 0.0, zero_bias=True).with_rules(
                             (Match(kind="linear", label="conv"), rules.Gamma(0.0, zero_bias=True))))
