"""Models written the way Flax's examples and equinox users write them, run without edits: a ResNet with
zero-initialised residual scales and ``batch_stats`` passed as an argument (train and eval mode), an
LSTM classifier whose sequence lengths are computed from its input, an nnx CNN with BatchNorm and
dropout in eval mode and its state passed as an argument, equinox MLP and CNN. Each runs eagerly,
under ``jit`` and under ``vmap``. References: Theorem 1 (jax.grad) on the ReLU models, an unrolled
hand-written LSTM with constant lengths, and the batch sum of per-example feedback."""

import functools
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import rel_err, theorem1_expected, theorem1_reference
from flax import nnx

import lfp_jax
from lfp_jax import Match, _frozen, errors, rewards, rules

F64 = jnp.float64
EPS = lfp_jax.lfp_epsilon(1e-12)


def _close(got, want, rtol=1e-6):
    """Per leaf, relative to the largest feedback of the model (leaves with zero gradient included)."""
    scale = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    assert len(flat) == len(jax.tree.leaves(want))
    for (path, g), w in zip(flat, jax.tree.leaves(want)):
        err = rel_err(g, w, floor=1e-6 * scale)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"

# Eager calls run the same compiled program as jit (lfp_vjp jits the rewritten program when nothing is
# traced); the eager cases of the bigger models run with the slow tests, the equinox ones always.
EAGER = pytest.param("eager", marks=pytest.mark.slow)


def _theorem1_in_mode(mode, fun, params, x, y, *constants, **kw):
    """Theorem 1 for ``fun(params, x, *constants)``: eagerly, under jit, or per example under vmap."""
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, composite=EPS,
                                       reward_argnums=(2 + len(constants),), **kw)
    if mode == "vmap":  # both sides in one program: one compile
        per, want = jax.jit(jax.vmap(lambda xi, yi: (
            g(params, xi[None], *constants, yi[None])[1],
            theorem1_reference(fun, params, (xi[None], *constants), yi[None], False))))(x, y)
        _close(per, want)
        return
    if mode == "jit":
        fb, want = jax.jit(lambda x, y: (g(params, x, *constants, y)[1],
                                         theorem1_reference(fun, params, (x, *constants), y, False)))(x, y)
        _close(fb, want)
        return
    fb = g(params, x, *constants, y)[1]
    _close(fb, theorem1_expected(fun, params, x, *constants, labels=y))


# -- a ResNet as in Flax's examples: zero-initialised last scale of every residual block ----------


class ResidualBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 param_dtype=F64)
        conv = functools.partial(nn.Conv, use_bias=False, param_dtype=F64)
        y = nn.relu(norm()(conv(self.features, (3, 3), (self.strides, self.strides))(x)))
        y = norm(scale_init=nn.initializers.zeros_init())(conv(self.features, (3, 3))(y))
        if x.shape != y.shape:
            x = norm(name="norm_proj")(conv(self.features, (1, 1), (self.strides, self.strides),
                                            name="conv_proj")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), use_bias=False, param_dtype=F64)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, param_dtype=F64)(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = ResidualBlock(4)(x, train)
        x = ResidualBlock(6, strides=2)(x, train)
        return nn.Dense(3, param_dtype=F64)(jnp.mean(x, axis=(1, 2)))


@functools.cache
def _resnet():
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 2), F64)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    variables = jax.jit(ResNet().init)(jax.random.key(1), x)
    return variables["params"], variables["batch_stats"], x, y


def _train(p, x, stats):
    return ResNet().apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])


def _eval(p, x, stats):
    return ResNet().apply({"params": p, "batch_stats": stats}, x, False)


def _nonzero_stats(stats):
    return jax.tree.map(lambda a: a + jnp.linspace(0.2, 0.8, a.size).reshape(a.shape), stats)


def test_resnet_zero_scales_are_reported_under_jit_and_torch_init_gives_every_branch_feedback():
    """The parameters are arguments of the jitted step (tracers at trace time): the compiled step finds
    the zero residual scales and warns once, naming them and a fix that is true for them."""
    params, stats, x, y = _resnet()
    lfp = lfp_jax.lfp_value_and_feedback(_train, rewards.softmax_loss, has_aux=True, reward_argnums=(3,))
    step = jax.jit(lfp)
    _frozen._warned.clear()
    with pytest.warns(errors.FrozenParameterWarning) as record:
        _, fb = jax.block_until_ready(step(params, x, stats, y))   # the warning comes when it runs
    message = str(record[0].message)
    assert "['ResidualBlock_0']['BatchNorm_1']['scale']" in message and "compiled step" in message
    assert "torch_init(key, params, fun, *args) sets the zero scales that LFP cannot move to 1" in message
    with warnings.catch_warnings():   # once: the second call of the same step is silent
        warnings.simplefilter("error")
        jax.block_until_ready(step(params, x, stats, y))
    grads = jax.jit(jax.grad(lambda p: rewards.softmax_loss(_train(p, x, stats)[0], y).sum()))(params)

    def silent(fb):  # leaves with a non-zero gradient but no feedback at all
        flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
        return {jax.tree_util.keystr(k) for (k, gr), f in zip(flat_g, jax.tree.leaves(fb))
                if np.any(gr != 0) and not np.any(f != 0)}

    assert "['ResidualBlock_0']['BatchNorm_1']['scale']" in silent(fb)
    # a zero scale never moves under LFP, so its branch's kernels never receive feedback either
    assert not np.any(fb["ResidualBlock_0"]["Conv_1"]["kernel"] != 0)
    params = lfp_jax.nn.torch_init(jax.random.key(2), params, _train, x, stats)
    assert all(np.all(a != 0) for k, a in jax.tree_util.tree_leaves_with_path(params)
               if "scale" in jax.tree_util.keystr(k))
    with pytest.warns(errors.FrozenParameterWarning) as record:  # BatchNorm offsets stay at 0
        _, fb = jax.block_until_ready(step(params, x, stats, y))   # the warning comes when it runs
    assert "['scale']" not in str(record[0].message) and "offsets start at 0" in str(record[0].message)
    assert all(k.endswith("['bias']") and ("BatchNorm" in k or "norm_proj" in k) for k in silent(fb))
    assert np.all(fb["ResidualBlock_0"]["Conv_1"]["kernel"] != 0)


def test_concrete_parameters_are_checked_when_the_model_is_traced():
    params, stats, x, y = _resnet()
    lfp = lfp_jax.lfp_value_and_feedback(_train, rewards.softmax_loss, has_aux=True, reward_argnums=(3,))
    with pytest.warns(errors.FrozenParameterWarning, match=r"BatchNorm_1'\]\['scale'\]") as record:
        jax.jit(lambda *a: lfp(params, *a))(x, stats, y)   # captured: concrete at trace time
    assert "compiled step" not in str(record[0].message)


def test_zero_scales_are_reported_from_a_pmap_step():
    """pmap over the one CPU device: the parameters (replicated, a leading device axis) are tracers."""
    params, stats, x, y = _resnet()
    lfp = lfp_jax.lfp_value_and_feedback(_train, rewards.softmax_loss, has_aux=True, reward_argnums=(3,))
    one = lambda tree: jax.tree.map(lambda a: a[None], tree)   # noqa: E731
    _frozen._warned.clear()
    with pytest.warns(errors.FrozenParameterWarning, match=r"(?s)BatchNorm_1'\]\['scale'\].*compiled step"):
        _, fb = jax.block_until_ready(jax.pmap(lfp)(one(params), one(x), one(stats), one(y)))
    assert not np.any(fb["ResidualBlock_0"]["BatchNorm_1"]["scale"] != 0)


@pytest.mark.parametrize("mode", [EAGER, "jit"])
def test_resnet_train_mode_with_batch_stats_argument_satisfies_theorem_1(mode):
    params, stats, x, y = _resnet()
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero offsets and scales
    g = lfp_jax.lfp_value_and_feedback(_train, rewards.softmax_loss, composite=EPS, has_aux=True,
                                       reward_argnums=(3,))
    g = jax.jit(g) if mode == "jit" else g
    (_, aux), fb = g(params, x, stats, y)
    assert jax.tree.structure(aux["batch_stats"]) == jax.tree.structure(stats)
    _close(fb, theorem1_expected(_train, params, x, stats, labels=y, has_aux=True), rtol=1e-5)


@pytest.mark.parametrize("mode", [EAGER, "jit", "vmap"])
def test_resnet_eval_mode_with_batch_stats_argument_satisfies_theorem_1(mode):
    params, stats, x, y = _resnet()
    params = jax.tree.map(lambda a: a + 0.1, params)
    _theorem1_in_mode(mode, _eval, params, x, y, _nonzero_stats(stats), input_argnums=(1,))


@pytest.mark.slow
def test_resnet_train_mode_per_group_under_vmap():
    params, stats, x, y = _resnet()
    params = jax.tree.map(lambda a: a + 0.1, params)
    g = lfp_jax.lfp_value_and_feedback(_train, rewards.softmax_loss, composite=EPS, has_aux=True,
                                       reward_argnums=(3,))
    xg, yg = x.reshape(2, 3, *x.shape[1:]), y.reshape(2, 3)
    per = jax.jit(jax.vmap(lambda xi, yi: g(params, xi, stats, yi)[1]))(xg, yg)
    want = jax.vmap(lambda xi, yi: theorem1_expected(_train, params, xi, stats, labels=yi,
                                                     has_aux=True))(xg, yg)
    _close(per, want, rtol=1e-5)


# -- an LSTM classifier whose sequence lengths come from its input (Flax's seq2seq pattern) -------


class LSTMClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        lengths = jnp.sum(jnp.any(x != 0, axis=-1), axis=-1)  # padding steps are all zero
        cell = nn.LSTMCell(5, param_dtype=F64)
        (_, h), _ = nn.RNN(cell, return_carry=True)(x, seq_lengths=lengths)
        return nn.Dense(3, param_dtype=F64)(h)


def _manual_lstm(p, x, lengths):
    """The same LSTM by hand: a Python loop over time and the lengths as a constant."""
    c = p["LSTMCell_0"]
    dense = lambda name, v: v @ c[name]["kernel"] + c[name].get("bias", 0.0)  # noqa: E731
    h = cell = jnp.zeros((x.shape[0], 5), F64)
    for t in range(x.shape[1]):
        xt = x[:, t]
        i = jax.nn.sigmoid(dense("ii", xt) + dense("hi", h))
        f = jax.nn.sigmoid(dense("if", xt) + dense("hf", h))
        gt = jnp.tanh(dense("ig", xt) + dense("hg", h))
        o = jax.nn.sigmoid(dense("io", xt) + dense("ho", h))
        new_c = f * cell + i * gt
        new_h = o * jnp.tanh(new_c)
        keep = (t < lengths)[:, None]
        cell, h = jnp.where(keep, new_c, cell), jnp.where(keep, new_h, h)
    return h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


@functools.cache
def _lstm_data():
    x = jax.random.normal(jax.random.key(5), (4, 6, 3), F64)
    lengths = jnp.array([6, 3, 5, 2])
    x = x * (jnp.arange(6)[None, :, None] < lengths[:, None, None])
    params = jax.jit(LSTMClassifier().init)(jax.random.key(6), x)["params"]
    return lfp_jax.nn.torch_init(jax.random.key(7), params), x, lengths, jnp.array([0, 1, 2, 1])


# LSTM gates are products of input-dependent values: the default composite gives them AttnLRP's uniform
# rule. ε = 1e-12: a scan treats its zero initial carry as input-dependent at the first step too (an
# ε-sized difference from the hand-written loop, whose first step multiplies constants).
GATES = lfp_jax.lfp_epsilon(1e-12)


@pytest.mark.parametrize("mode", [EAGER, "jit"])
def test_lstm_with_lengths_from_its_input_equals_the_hand_written_loop(mode):
    params, x, lengths, y = _lstm_data()
    model = lambda p, x: LSTMClassifier().apply({"params": p}, x)  # noqa: E731
    g = lfp_jax.lfp_value_and_feedback(model, rewards.softmax_loss, composite=GATES, reward_argnums=(2,))
    ref = lfp_jax.lfp_value_and_feedback(lambda p, x: _manual_lstm(p, x, lengths), rewards.softmax_loss,
                                         composite=GATES, reward_argnums=(2,))
    got = (jax.jit(g) if mode == "jit" else g)(params, x, y)
    want = jax.jit(ref)(params, x, y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9)
    _close(got[1], want[1], rtol=1e-8)
    sites = lfp_jax.find_sites(model, params, x, composite=GATES)
    assert all(s.source_line != "<unknown location>" for s in sites)
    assert {s.path for s in sites if s.kind == "linear"} >= {"LSTMClassifier/RNN_0/LSTMCell_0/ii",
                                                            "LSTMClassifier/Dense_0"}


@pytest.mark.slow
def test_lstm_per_example_feedback_under_vmap_sums_to_the_batch():
    params, x, _, y = _lstm_data()
    model = lambda p, x: LSTMClassifier().apply({"params": p}, x)  # noqa: E731
    g = lfp_jax.lfp_value_and_feedback(model, rewards.softmax_loss, composite=GATES, reward_argnums=(2,))
    per = jax.jit(jax.vmap(lambda xi, yi: g(params, xi[None], yi[None])[1]))(x, y)
    batch = jax.jit(g)(params, x, y)[1]
    for a, b in zip(jax.tree.leaves(per), jax.tree.leaves(batch)):
        np.testing.assert_allclose(a.sum(0), b, rtol=1e-9, atol=1e-12)


# -- an nnx CNN with BatchNorm and dropout in eval mode, its state passed as an argument -----------


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs, param_dtype=F64)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs, param_dtype=F64)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs, param_dtype=F64)
        self.head = nnx.Linear(6, 3, rngs=rngs, param_dtype=F64)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (2, 2), (2, 2))
        x = self.dropout(nnx.relu(self.conv2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


@functools.cache
def _nnx_setup():
    model = NnxCNN(nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = lfp_jax.nn.torch_init(jax.random.key(1), params)
    params = jax.tree.map(lambda a: a + 0.1, params)
    rest = jax.tree.map(lambda a: a + 0.5 if jnp.issubdtype(a.dtype, jnp.floating) else a, rest)

    def fun(p, x, rest):
        return nnx.merge(graphdef, p, rest)(x)

    x = jax.random.normal(jax.random.key(2), (5, 8, 8, 2), F64)
    return fun, params, rest, x, jnp.array([0, 1, 2, 0, 1])


@pytest.mark.parametrize("mode", [EAGER, "jit", "vmap"])
def test_nnx_cnn_in_eval_mode_with_its_state_as_an_argument_satisfies_theorem_1(mode):
    fun, params, rest, x, y = _nnx_setup()
    _theorem1_in_mode(mode, fun, params, x, y, rest, input_argnums=(1,))


def test_nnx_sites_carry_attribute_paths():
    fun, params, rest, x, _ = _nnx_setup()
    composite = lfp_jax.lfp_epsilon().with_rules((Match(path="conv2"), rules.ZPlus()))
    sites = lfp_jax.find_sites(fun, params, x, rest, composite=composite, input_argnums=(1,))
    assert [(s.kind, s.path) for s in sites] == [
        ("linear", "conv1"), ("activation", ""), ("max_pool", ""), ("linear", "conv2"),
        ("activation", ""), ("pool", ""), ("linear", "head")]
    assert [type(s.rule).__name__ for s in sites if s.kind == "linear"] == ["Epsilon", "ZPlus", "Epsilon"]
    table = lfp_jax.describe(fun, params, x, rest, composite=composite, input_argnums=(1,))
    assert "conv2" in table and "ZPlus(1e-06)" in table


# -- equinox models -----------------------------------------------------------------------------


class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 4, 3, key=k1)
        self.conv2 = eqx.nn.Conv2d(4, 6, 3, key=k2)
        self.pool = eqx.nn.MaxPool2d(2, 2)
        self.head = eqx.nn.Linear(6, 3, key=k3)

    def __call__(self, x):
        x = self.pool(jax.nn.relu(self.conv1(x)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


@functools.cache
def _eqx_models():
    mlp = eqx.nn.MLP(5, 3, 8, 2, key=jax.random.key(0))
    x_mlp = jax.random.normal(jax.random.key(1), (6, 5), F64)
    cnn = EqxCNN(jax.random.key(2))
    x_cnn = jax.random.normal(jax.random.key(3), (6, 1, 8, 8), F64)
    return {"mlp": (mlp, x_mlp), "cnn": (cnn, x_cnn)}


def _batched(static):
    return lambda p, x: jax.vmap(eqx.combine(p, static))(x)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["eager", "jit", "vmap"])
def test_equinox_models_satisfy_theorem_1(name, mode):
    model, x = _eqx_models()[name]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _theorem1_in_mode(mode, _batched(static), params, x, jnp.array([0, 1, 2, 0, 1, 2]))


def test_an_equinox_module_can_be_passed_whole():
    """Leaves that are not arrays (the MLP's activation functions) are static parts of the model."""
    model, x = _eqx_models()["mlp"]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    whole = lfp_jax.lfp_value_and_feedback(lambda m, x: jax.vmap(m)(x), rewards.softmax_loss,
                                           composite=EPS, reward_argnums=(2,))(model, x, y)[1]
    assert whole.activation is None and whole.layers[0].weight.shape == (8, 5)
    _close(eqx.filter(whole, eqx.is_array), theorem1_expected(_batched(static), params, x, labels=y))


def test_an_equinox_module_with_pooling_and_dropout_can_be_passed_whole():
    """MaxPool2d's Python ``-inf`` and Dropout's ``p`` and ``inference`` flag are static, not traced."""
    k = jax.random.split(jax.random.key(4), 2)
    model = eqx.nn.Sequential([
        eqx.nn.Conv2d(1, 4, 3, key=k[0]), eqx.nn.Lambda(jax.nn.relu), eqx.nn.MaxPool2d(2, 2),
        eqx.nn.Dropout(0.5, inference=True), eqx.nn.Lambda(lambda h: h.reshape(-1)),
        eqx.nn.Linear(36, 3, key=k[1])])
    x, y = _eqx_models()["cnn"][1], jnp.array([0, 1, 2, 0, 1, 2])
    whole = lfp_jax.lfp_value_and_feedback(lambda m, x: jax.vmap(m)(x), rewards.softmax_loss,
                                           composite=EPS, reward_argnums=(2,))
    fb = jax.jit(lambda x, y: whole(model, x, y)[1])(x, y)
    assert fb.layers[3].p is None and fb.layers[3].inference is None
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _close(eqx.filter(fb, eqx.is_array), theorem1_expected(_batched(static), params, x, labels=y))


def test_equinox_sites_carry_field_paths():
    model, x = _eqx_models()["mlp"]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    composite = lfp_jax.lfp_epsilon().with_rules((Match(path="layers/1"), rules.ZPlus()))
    sites = lfp_jax.find_sites(_batched(static), params, x, composite=composite)
    linear = [(s.path, type(s.rule).__name__) for s in sites if s.kind == "linear"]
    assert linear == [("layers/0", "Epsilon"), ("layers/1", "ZPlus"), ("layers/2", "Epsilon")]
    cnn, x_cnn = _eqx_models()["cnn"]
    p_cnn, s_cnn = eqx.partition(cnn, eqx.is_inexact_array)
    paths = [s.path for s in lfp_jax.find_sites(_batched(s_cnn), p_cnn, x_cnn) if s.kind == "linear"]
    assert paths == ["conv1", "conv2", "head"]


def test_equinox_zero_parameters_get_advice_that_is_true_for_equinox():
    model = eqx.nn.Sequential([eqx.nn.Linear(4, 6, key=jax.random.key(0)), eqx.nn.LayerNorm(6),
                               eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(6, 2, key=jax.random.key(1))])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(2), (3, 4), F64)
    with pytest.warns(errors.FrozenParameterWarning) as record:
        lfp_jax.lfp_vjp(_batched(static), params, x)
    message = str(record[0].message)
    assert "layers[1].bias" in message and "offsets start at 0" in message
    assert "Flax initialises biases" not in message
