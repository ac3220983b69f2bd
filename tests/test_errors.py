"""Every error path says what is wrong, where, and how to fix it."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfp_jax
from lfp_jax import Match, errors, rewards, rules

P = {"w": jnp.ones((3, 2)) * 0.5, "b": jnp.ones((2,)) * 0.1}
X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
Y = jnp.array([0, 1, 0, 1])


def _feedback(fun, params=P, x=X, **kw):
    return lfp_jax.lfp_value_and_feedback(fun, lambda z: rewards.softmax_loss(z, Y), **kw)(params, x)


def test_unknown_input_dependent_primitive_is_named_with_the_users_line():
    def fun(p, x):
        return jax.lax.bessel_i1e(x @ p["w"] + p["b"])  # line of the error

    line = inspect.getsourcelines(fun)[1] + 1
    with pytest.raises(errors.NoRuleError) as info:
        _feedback(fun)
    msg = str(info.value)
    assert "`bessel_i1e`" in msg and f"test_errors.py:{line}" in msg
    assert "register_primitive('bessel_i1e'" in msg


def test_registering_a_primitive_makes_it_an_activation():
    """An elementwise primitive, once declared, is an activation site with the identity rule:
    R_x = R_y, i.e. c_x = c_y · φ(x) / x at ε = 0 (checked on one layer by hand)."""

    def fun(p, x):
        return jax.lax.bessel_i1e(x @ p["w"]) @ jnp.eye(2)

    lfp_jax.sites.register_primitive("bessel_i1e", "elementwise")
    try:
        kinds = [(s.kind, s.label) for s in lfp_jax.find_sites(fun, P, X)]
        assert kinds == [("linear", "dense"), ("activation", "elementwise"), ("linear", "dense")]
        reward = jnp.arange(8.0).reshape(4, 2) - 3.0
        _, fb_fn = lfp_jax.lfp_vjp(fun, P, X, composite=lfp_jax.lfp_epsilon(0.0))
        fb, _ = fb_fn(reward)
        z = X @ P["w"]
        s = reward / z  # R_z = R_y (identity rule), then the ε rule of the dense layer at ε = 0
        np.testing.assert_allclose(fb["w"], np.abs(P["w"]) * (X.T @ s), rtol=1e-6)
    finally:
        lfp_jax.sites.ELEMENTWISE.discard("bessel_i1e")


def test_data_dependent_while_loop_is_refused():
    def fun(p, x):
        h = x @ p["w"] + p["b"]
        return jax.lax.while_loop(lambda h: jnp.sum(h) < 100.0, lambda h: 2.0 * h + 1.0, h)

    with pytest.raises(errors.UnsupportedControlFlowError, match="fori_loop"):
        _feedback(fun)


def test_token_ids_that_index_no_parameter_table_get_a_clear_message():
    """Ids looking up a table that fun closes over (a constant, not a parameter): nothing is trained
    through the lookup, and the error says where reward enters and how to pass the table."""
    table = jnp.ones((10, 3)) * 0.3
    p = {"w": jnp.ones((3, 2))}

    def fun(p, tokens):
        return table[tokens].sum(1) @ p["w"]

    with pytest.raises(errors.LFPError, match=r"the inputs of fun are integers .* no lookup of a "
                                              r"parameter table by them .* pass it in an argument in "
                                              r"argnums"):
        _feedback(fun, p, jnp.array([[1, 2], [3, 4], [5, 6], [7, 8]]))


def test_argnums_naming_every_float_argument_says_so():
    with pytest.raises(errors.LFPError, match=r"every argument of fun holding arrays is a parameter or a "
                                              r"constant \(argnums=\(0, 1\)\), so no input is left"):
        lfp_jax.lfp_vjp(lambda p, x: x @ p["w"], P, X, argnums=(0, 1))


def test_reward_of_the_wrong_shape_is_refused():
    g = lfp_jax.lfp_value_and_feedback(lambda p, x: x @ p["w"], lambda z: z[:, :1])
    with pytest.raises(errors.RewardError, match="shape"):
        g(P, X)


def test_reward_of_the_wrong_structure_is_refused():
    g = lfp_jax.lfp_value_and_feedback(lambda p, x: x @ p["w"], lambda z: (z, z))
    with pytest.raises(errors.RewardError, match="structure"):
        g(P, X)


def test_all_zero_parameters_are_reported_by_path():
    params = {"w": P["w"], "b": jnp.zeros((2,))}
    with pytest.warns(errors.FrozenParameterWarning, match=r"\['b'\]"):
        _feedback(lambda p, x: x @ p["w"] + p["b"], params)
    with pytest.raises(errors.FrozenParameterError, match=r"\['b'\]"):
        lfp_jax.check_params(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, fb = _feedback(lambda p, x: x @ p["w"] + p["b"], params, allow_frozen=True)
    assert jnp.all(fb["b"] == 0)


# the presets without AttnLRP's rules: what a composite that lacks them says. Its other entries (spiking,
# pooling, ...) select no site of these small models, which UnmatchedRuleWarning says each time: expected.
unmatched_entries = pytest.mark.filterwarnings("ignore::lfp_jax.errors.UnmatchedRuleWarning")
NO_ATTENTION = lfp_jax.Composite(tuple(e for e in lfp_jax.lfp_epsilon().entries
                                       if e[0].kind not in ("softmax", "bilinear")), "no attention rules")


@unmatched_entries
def test_a_composite_without_a_product_rule_refuses_products_and_names_the_rule():
    def fun(p, x):
        q, k = x @ p["w"], x @ p["w"] + p["b"]
        return jnp.einsum("bi,bj->bij", q, k).sum(-1)   # attention-like q·kᵀ

    with pytest.raises(errors.NoRuleError, match="0  bilinear  dot_general") as info:
        _feedback(fun, composite=NO_ATTENTION)
    assert "rules.UniformProduct()" in str(info.value)


@unmatched_entries
def test_a_composite_without_a_softmax_rule_refuses_softmax_and_names_the_rule():
    with pytest.raises(errors.NoRuleError, match="0  softmax  softmax") as info:
        _feedback(lambda p, x: jax.nn.softmax(x @ p["w"] + p["b"]) @ jnp.eye(2), composite=NO_ATTENTION)
    assert "rules.SoftmaxTaylor()" in str(info.value)


@unmatched_entries
def test_explicit_gradient_rule_unlocks_a_site():
    """With the plain gradient at the softmax, every rule on the path is gradient-like: as ε → 0 the
    feedback is ``|θ| ⊙ ∇_θ Σ c ⊙ f(θ)`` with the output's share ``c = r / f`` held constant."""
    composite = NO_ATTENTION.with_rules((Match(kind="softmax"), rules.Gradient()))

    def fun(p, x):
        return jax.nn.softmax(x @ p["w"] + p["b"]) @ jnp.diag(jnp.array([1.0, 2.0]))

    _, fb = _feedback(fun, composite=composite)
    out = fun(P, X)
    share = rewards.softmax_loss(out, Y) / out
    grads = jax.grad(lambda p: jnp.sum(share * fun(p, X)))(P)
    for k in P:
        np.testing.assert_allclose(fb[k], jnp.abs(P[k]) * grads[k], rtol=1e-4, atol=1e-9)
    assert float(jnp.abs(fb["w"]).max()) > 1e-3


def test_a_quotient_of_two_input_dependent_values_is_refused():
    with pytest.raises(errors.NoRuleError, match="0  quotient  div") as info:
        _feedback(lambda p, x: (x @ p["w"]) / (x @ p["w"] + 3.0))
    assert "stop_gradient" in str(info.value)


def test_an_attention_kernel_the_engine_cannot_see_into_says_which_implementation_to_use():
    from jax.extend.core import Primitive

    fused = Primitive("cudnn_dot_product_attention")   # as a fused GPU kernel appears in a jaxpr
    fused.def_abstract_eval(lambda q: q)
    fused.def_impl(lambda q: q)
    with pytest.raises(errors.NoRuleError, match="implementation='xla'"):
        _feedback(lambda p, x: fused.bind(x @ p["w"]))


def test_rule_for_the_wrong_site_kind_is_refused():
    composite = lfp_jax.lfp_epsilon().with_rules((Match(), rules.Identity()))
    with pytest.raises(errors.NoRuleError, match="only applies to"):
        _feedback(lambda p, x: jnp.tanh(x @ p["w"]), composite=composite)


def test_integer_parameters_are_refused():
    with pytest.raises(errors.LFPError, match="floating-point parameters"):
        _feedback(lambda p, x: x @ p["w"] * p["n"], {"w": P["w"], "n": jnp.array(2)})


def test_bad_argnums_and_has_aux_are_refused():
    with pytest.raises(ValueError, match="argnums"):
        lfp_jax.lfp_vjp(lambda p, x: x @ p["w"], P, X, argnums=5)
    with pytest.raises(errors.LFPError, match="has_aux"):
        lfp_jax.lfp_vjp(lambda p, x: x @ p["w"], P, X, has_aux=True)
    with pytest.raises(TypeError, match="callable"):
        lfp_jax.lfp_vjp("not a function", P, X)


def test_bad_labels_for_a_reward_are_refused():
    with pytest.raises(ValueError, match="class indices"):
        rewards.softmax_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2)))


def test_log_softmax_inside_the_model_has_no_default_rule():
    with pytest.raises(errors.NoRuleError, match="0  softmax  logsumexp"):
        _feedback(lambda p, x: jax.nn.log_softmax(x @ p["w"] + p["b"]) @ jnp.eye(2))


def test_frozen_check_works_on_parameters_captured_by_a_jitted_function():
    """Parameters closed over by a jitted function are concrete: the all-zero check must not trace them."""
    w = jnp.ones((3, 2))
    x = jnp.ones((4, 3))
    zero = jnp.zeros((3, 2))

    @jax.jit
    def feedback(x):
        return lfp_jax.lfp_grad(lambda w, x: x @ w, lfp_jax.rewards.softmax_loss,
                                reward_argnums=(2,))(w, x, jnp.zeros(4, jnp.int32))

    # a single linear layer: Theorem 1 (lfp_grad's direction, minus the feedback, is |w| ⊙ ∇_w Σ CE)
    ce = jax.grad(lambda w: jnp.sum(-jax.nn.log_softmax(x @ w)[:, 0]))(w)
    np.testing.assert_allclose(feedback(x), jnp.abs(w) * ce, rtol=1e-5)

    @jax.jit
    def frozen(x):
        return lfp_jax.lfp_grad(lambda w, x: x @ w, lfp_jax.rewards.softmax_loss,
                                reward_argnums=(2,))(zero, x, jnp.zeros(4, jnp.int32))

    with pytest.warns(errors.FrozenParameterWarning):
        frozen(x)


@unmatched_entries
def test_every_site_without_a_rule_is_reported_at_once_with_its_own_hint():
    def fun(p, x):
        h = jax.lax.bessel_i1e(x @ p["w"])                 # an unknown primitive
        a = jax.nn.softmax(h, axis=-1)                      # a softmax inside the model
        return (a * (x @ p["w"] + p["b"])) @ jnp.eye(2)     # a product of two input-dependent values

    with pytest.raises(errors.NoRuleError) as info:
        _feedback(fun, composite=NO_ATTENTION)
    lines = str(info.value).splitlines()
    assert "3 sites" in lines[0]
    rows = [line.split()[:2] for line in lines[2:] if line[:1].isdigit()]  # wrapped cells start blank
    assert rows == [["0", "unknown"], ["1", "softmax"], ["2", "bilinear"]]
    hints = {line.split(":")[0]: line for line in lines if line.startswith("site ")}
    assert set(hints) == {"site 0 (unknown)", "site 1 (softmax)", "site 2 (bilinear)"}
    assert "register_primitive('bessel_i1e'" in hints["site 0 (unknown)"]
    assert "AttnLRP" not in hints["site 0 (unknown)"]
    assert "rules.SoftmaxTaylor()" in hints["site 1 (softmax)"]
    assert "rules.UniformProduct()" in hints["site 2 (bilinear)"]
    table = lfp_jax.describe(fun, P, X, composite=NO_ATTENTION)
    assert table.count("-- none --") == 3 and "3 without a rule" in table


@unmatched_entries
def test_a_rule_chosen_for_the_wrong_kind_is_reported_with_the_others():
    composite = NO_ATTENTION.with_rules((Match(kind="activation"), rules.WinnerTakeAll()))

    def fun(p, x):
        return jnp.tanh(x @ p["w"]) * (x @ p["w"])

    with pytest.raises(errors.NoRuleError) as info:
        _feedback(fun, composite=composite)
    msg = str(info.value)
    assert "2 sites" in msg and "only applies to ['max', 'max_pool']" in msg and "UniformProduct" in msg
