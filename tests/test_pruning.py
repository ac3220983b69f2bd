"""Gini index and magnitude pruning against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pruning


def test_gini_hand_values():
    assert pruning.gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert pruning.gini([0, 0, 0, 1]) == pytest.approx(0.75)        # 1 - 1/N
    # sorted [1, 2, 3, 4], sum 10: 2·(0.1·3.5 + 0.2·2.5 + 0.3·1.5 + 0.4·0.5)/4 = 0.75
    assert pruning.gini([4, -2, 3, 1]) == pytest.approx(0.25)
    assert pruning.gini(np.zeros(5)) == 0.0


def test_layer_gini_selects_kernels():
    params = {"Dense_0": {"kernel": jnp.array([[0.0, 0.0], [0.0, 1.0]]), "bias": jnp.ones(2)}}
    assert pruning.layer_gini(params) == {"['Dense_0']['kernel']": pytest.approx(0.75)}


def _params():
    return {"a": {"kernel": jnp.array([1.0, -2.0, 3.0, -4.0])},
            "b": {"kernel": jnp.array([0.5, 5.0]), "bias": jnp.array([0.1, 0.2])}}


def test_global_pruning_removes_the_smallest_magnitudes_over_all_layers():
    out = pruning.prune(_params(), 0.5)  # 3 of 6 weights: 0.5, 1, 2
    np.testing.assert_array_equal(out["a"]["kernel"], [0, 0, 3, -4])
    np.testing.assert_array_equal(out["b"]["kernel"], [0, 5])
    np.testing.assert_array_equal(out["b"]["bias"], [0.1, 0.2])      # biases are kept


def test_per_layer_pruning_removes_the_fraction_in_each_layer():
    out = pruning.prune(_params(), 0.75, scope="per_layer")  # a: 3 of 4, b: round(1.5) = 2 of 2
    np.testing.assert_array_equal(out["a"]["kernel"], [0, 0, 0, -4])
    np.testing.assert_array_equal(out["b"]["kernel"], [0, 0])


def test_pruning_curve_evaluates_each_fraction():
    curve = pruning.pruning_curve(_params(), lambda p: float(jnp.sum(p["a"]["kernel"] != 0)),
                                  fractions=(0.0, 0.5))
    assert curve == [{"fraction": 0.0, "accuracy": 4.0}, {"fraction": 0.5, "accuracy": 2.0}]
    with pytest.raises(ValueError):
        pruning.prune(_params(), 1.5)
