"""Bad arguments to the transformations get an error that says what is wrong and how to fix it, and the
NaN policy is the documented one (README, "Reliability"): NaN propagates as in ``jax.grad``, and
``jax_debug_nans`` and ``checkify`` find where it starts."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import theorem1_expected
from jax.experimental import checkify

import lfp_jax
from lfp_jax import Match, rewards, rules
from lfp_jax.errors import UnmatchedRuleWarning


def f(p, x):
    return jax.nn.relu(x @ p["w"] + p["b"]) @ p["v"]


def _setup(dtype=jnp.float64):
    k = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(k[0], (3, 4), dtype), "b": jnp.full((4,), 0.1, dtype),
         "v": jax.random.normal(k[1], (4, 2), dtype)}
    return p, jax.random.normal(k[2], (5, 3), dtype), jnp.array([0, 1, 0, 1, 1])


def _grad(**kw):
    return lfp_jax.lfp_grad(f, rewards.softmax_loss, **{"reward_argnums": (2,), **kw})


# -- argument positions --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, error, message", [
    ({"argnums": 5}, ValueError, r"argnums=5 does not fit a call with 3 positional arguments: position 5 is "
                                 r"out of range \(valid: -3 to 2\)"),
    ({"argnums": -4}, ValueError, "position -4 is out of range"),
    ({"argnums": 1.0}, TypeError, r"argnums must be an int or a tuple of ints .*got 1.0 \(float\)"),
    ({"argnums": True}, TypeError, r"argnums must be an int .*got True \(bool\)"),
    ({"argnums": (0, 0)}, ValueError, "names an argument twice"),
    ({"argnums": "0"}, TypeError, "argnums must be an int"),
    ({"reward_argnums": (7,)}, ValueError, "reward_argnums=.*position 7 is out of range"),
    ({"reward_argnums": True}, TypeError, r"reward_argnums must be an int .*\(bool\)"),
    ({"reward_argnums": (2.0,)}, TypeError, "reward_argnums must be an int"),
    ({"input_argnums": 9}, ValueError, "input_argnums=9 does not fit"),
    ({"input_argnums": (1, "x")}, TypeError, "input_argnums must be an int"),
    ({"argnums": 2}, ValueError, "argnums .* and reward_argnums .* overlap"),
])
def test_argument_positions_are_checked_before_use(kw, error, message):
    """An out-of-range position is an error, never wrapped around onto another argument (``argnums=5``
    of 3 arguments used to be taken modulo 3); a bool is not a position."""
    p, x, y = _setup()
    with pytest.raises(error, match=message):
        _grad(**kw)(p, x, y)


def test_lfp_vjp_and_lrp_check_their_argument_positions():
    p, x, _ = _setup()
    with pytest.raises(ValueError, match="position 2 is out of range"):
        lfp_jax.lfp_vjp(f, p, x, argnums=2)
    with pytest.raises(TypeError, match="argnums must be an int"):
        lfp_jax.lrp(f, argnums=[1.5])(p, x, target=jnp.zeros(5, int))


def test_negative_positions_count_from_the_end_as_in_jax_grad():
    p, x, y = _setup()
    got = _grad(argnums=-3)(p, x, y)
    want = _grad(argnums=0)(p, x, y)
    for k in p:
        np.testing.assert_array_equal(got[k], want[k])


# -- composites ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite, message", [
    ("lfp_epsilon", r"got the string 'lfp_epsilon': call lfp_jax.composites.lfp_epsilon\(\)"),
    ("epsilon", "got the string 'epsilon': call a preset such as lfp_jax.lfp_epsilon"),
    (lfp_jax.lfp_epsilon, r"got the function lfp_epsilon: call it, composite=lfp_epsilon\(\)"),
    (rules.ZPlus(), r"got the rule ZPlus.*with_rules\(\(Match\(kind=\.\.\.\), ZPlus"),
    ([(Match(kind="linear"), rules.Epsilon())], r"got a list: wrap the pairs, .*with_rules\(\*pairs\)"),
    (3, r"composite must be a Composite \(e.g. lfp_jax.lfp_epsilon\(\)\), got 3 \(int\)"),
])
def test_a_composite_of_the_wrong_type_says_how_to_make_one(composite, message):
    p, x, y = _setup()
    with pytest.raises(TypeError, match=message):
        _grad(composite=composite)(p, x, y)


@pytest.mark.parametrize("pair, message", [
    ((rules.Gradient(), Match(kind="activation")), r"got \(Gradient\(\), Match\(kind='activation'\)\): the "
                                                    r"order is \(Match, Rule\), swap the two"),
    ((Match(kind="linear"), rules.ZPlus),
     r"got the class ZPlus in \(Match\(kind=.linear.\), ZPlus\): pass an instance, ZPlus\(\)"),
    (Match(kind="linear"), r"takes \(Match\(\.\.\.\), Rule\) pairs such as \(Match\(kind='linear'\), "
                           r"rules.ZPlus\(\)\); got Match"),
    ((Match(kind="linear"), rules.ZPlus(), 1), "takes .* pairs"),
])
def test_a_malformed_pair_shows_the_expected_form(pair, message):
    with pytest.raises(TypeError, match=message):
        lfp_jax.lfp_epsilon().with_rules(pair)
    with pytest.raises(TypeError, match=message.replace("with_rules", "Composite")):
        lfp_jax.Composite((pair,))


def test_a_match_that_selects_no_site_warns_and_names_the_models_sites():
    """A misspelt path or kind would leave the preset's rule in place unnoticed; the warning lists what
    the model has, and the feedback is the preset's (the pair has no effect)."""
    p, x, y = _setup()
    typo = lfp_jax.lfp_epsilon().with_rules((Match(path="W"), rules.ZPlus()))
    with pytest.warns(UnmatchedRuleWarning, match=r"Match\(path='W'\) -> ZPlus.* selects no site of this "
                                                  r"model.*activation/relu, linear/dense.*paths: .*w"):
        got = _grad(composite=typo)(p, x, y)
    want = _grad()(p, x, y)
    for k in p:
        np.testing.assert_array_equal(got[k], want[k])


def test_presets_do_not_warn_about_their_own_pairs():
    """``lfp_epsilon`` has rules for spiking, softmax and product sites an MLP does not have; only pairs
    the user adds are checked."""
    p, x, y = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        _grad(composite=lfp_jax.lfp_epsilon().with_rules((Match(label="relu"), rules.Gradient())))(p, x, y)
        lfp_jax.lrp(f, lfp_jax.composites.epsilon_gamma_box(-3.0, 3.0))(p, x, target=jnp.zeros(5, int))


# -- epsilon -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("inf"), ValueError),
                                        (-1.0, ValueError), (-1e-9, ValueError), ("1e-6", TypeError),
                                        (True, TypeError), (jnp.ones(2), TypeError)])
def test_epsilon_must_be_a_finite_non_negative_number(bad, error):
    with pytest.raises(error, match="Epsilon: epsilon must be"):
        lfp_jax.lfp_epsilon(bad)
    with pytest.raises(error, match="epsilon must be"):
        rules.ZPlus(bad)
    with pytest.raises(error, match="SpikingEpsilon: epsilon must be"):
        rules.SpikingEpsilon(bad)


def _with_zero_units(p):
    """Logit 1 of every sample and hidden unit 2 are exactly 0 (zero weights and bias)."""
    return {"w": p["w"].at[:, 2].set(0), "b": p["b"].at[2].set(0), "v": p["v"].at[:, 1].set(0)}


def test_epsilon_zero_keeps_exact_zeros_finite_and_equals_the_small_epsilon_limit():
    """LRP-0 (ε = 0) divides by the layer outputs; a logit or a unit that is exactly 0 gets share 0 (its
    reward ``z ⊙ (onehot − p)`` is 0 there) instead of 0/0 = NaN for the whole network. The limit ε → 0⁺
    (ε = 1e-200 in float64, where ``z / (z + ε) = 1`` at every nonzero ``z``) is the reference."""
    p, x, y = _setup()
    p = _with_zero_units(p)
    zero = jax.jit(_grad(composite=lfp_jax.lfp_epsilon(0.0)))(p, x, y)
    tiny = jax.jit(_grad(composite=lfp_jax.lfp_epsilon(1e-200)))(p, x, y)
    for k in p:
        assert np.all(np.isfinite(zero[k])), k
        np.testing.assert_allclose(zero[k], tiny[k], rtol=1e-12, atol=0)
    assert float(jnp.abs(zero["w"]).max()) > 0  # the other units still learn


def test_float16_zero_logit_with_the_default_epsilon_is_finite_and_matches_float32():
    """ε = 1e-6 is below float16's smallest normal number: ``R / ε`` at a zero logit overflowed to inf
    and the inf met a 0 (NaN). The share is 0 there whatever ε (the reward is 0 at a zero logit)."""
    p, x, y = _setup(jnp.float32)
    p = _with_zero_units(p)
    g = jax.jit(_grad())
    f32 = g(p, x, y)
    f16 = g(jax.tree.map(lambda a: a.astype(jnp.float16), p), x.astype(jnp.float16), y)
    for k in p:
        assert np.all(np.isfinite(np.asarray(f16[k], np.float32))), k
        np.testing.assert_allclose(np.asarray(f16[k], np.float32), f32[k], rtol=2e-2, atol=2e-2)


# -- labels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, message", [
    (jnp.zeros(3, int), r"labels of shape \(3,\) do not fit outputs of shape \(5, 2\): the batch sizes "
                        r"differ"),
    (jnp.zeros((5, 3)), r"labels of shape \(5, 3\) and dtype float.* do not fit outputs of shape \(5, 2\)"),
    (jnp.array([0, 1, 2, 0, 1]), r"labels must be class indices in \[0, 2\) .*got values from 0 to 2"),
    (jnp.array([0, -1, 0, 0, 1]), r"labels must be class indices in \[0, 2\)"),
])
def test_labels_that_do_not_fit_the_outputs_are_named(labels, message):
    p, x, _ = _setup()
    with pytest.raises(ValueError, match=message):
        _grad()(p, x, labels)


# -- NaN policy ----------------------------------------------------------------------------------------


def _nan_input(x):
    x = np.array(x)
    x[0, 0] = np.nan  # made with numpy: under jax_debug_nans, jnp's .at[].set(nan) raises itself
    return x


def test_nan_in_an_input_gives_nan_feedback_as_jax_grad_does():
    """NaN is never masked: one NaN input value makes the feedback NaN wherever that sample's reward
    reaches (the feedback is a batch sum; here every leaf), and jax.grad of the loss is NaN too (in fewer
    entries: ReLU's derivative at NaN is 0, while LFP's share ``x ⊙ c`` carries the NaN)."""
    p, x, y = _setup()
    xn = _nan_input(x)
    fb = jax.jit(_grad())(p, xn, y)
    grads = theorem1_expected(f, p, xn, labels=y)
    assert all(np.isnan(fb[k]).any() for k in p)
    assert np.isnan(grads["w"]).any() and np.isnan(grads["v"]).any()
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(jax.jit(_grad())(p, x, y)))


def test_checkify_reports_where_a_nan_is_made_inside_the_feedback_step():
    p, x, y = _setup()
    checked = checkify.checkify(jax.jit(_grad()), errors=checkify.float_checks)
    err, _ = checked(p, _nan_input(x), y)
    assert err.get() is not None and "nan generated by primitive" in err.get()
    err, _ = checked(p, x, y)
    assert err.get() is None


def test_jax_debug_nans_raises_at_the_primitive_that_makes_the_nan():
    p, x, y = _setup()
    xi = np.array(x)
    xi[0, 0] = np.inf  # inf − inf inside the network: a NaN is generated, not passed in
    g = jax.jit(_grad())
    with jax.debug_nans(True):
        g(p, x, y)  # clean inputs: no error
        with pytest.raises(FloatingPointError, match="invalid value \\(nan\\) encountered in"):
            g(p, xi, y)


def test_labels_closed_over_by_a_jitted_reward_are_checked_without_tracing():
    """Concrete labels inside a jit trace (a closure) are range-checked on the host; the reward equals
    its formula ``z ⊙ (onehot(y) − softmax(z))``."""
    z = jax.random.normal(jax.random.key(3), (4, 3))
    y = jnp.array([0, 2, 1, 2])
    got = jax.jit(lambda z: rewards.softmax_loss(z, y))(z)
    np.testing.assert_allclose(got, z * (jax.nn.one_hot(y, 3) - jax.nn.softmax(z)), rtol=1e-12)
    bad = y + 1  # computed outside the trace: concrete
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        jax.jit(lambda z: rewards.softmax_loss(z, bad))(z)


def test_conservation_checks_its_composite_and_argnums_as_the_transformations_do():
    p, x, _ = _setup()
    with pytest.raises(TypeError, match="got the string 'attn_lrp': call lfp_jax.composites.attn_lrp"):
        lfp_jax.conservation(f, p, x, target=jnp.zeros(5, int), composite="attn_lrp")
    with pytest.raises(TypeError, match="argnums must be an int"):
        lfp_jax.conservation(f, p, x, target=jnp.zeros(5, int), argnums=1.0)
