"""The site finder recognises layers, activations, normalisations and pooling in jaxprs, and
describe() shows the user's source lines."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lfp_jax
from lfp_jax import Match

P = {"w1": jnp.ones((4, 5)) * 0.3, "b1": jnp.ones((5,)) * 0.1, "w2": jnp.ones((5, 3)) * 0.2}
X = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)


def _kinds(fun, params=P, x=X, **kw):
    return [(s.kind, s.label) for s in lfp_jax.find_sites(fun, params, x, **kw)]


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "gelu_exact": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "step_astype": lambda z: (z > 0).astype(z.dtype),
    "step_where": lambda z: jnp.where(z > 0, 1.0, 0.0),
    "step_heaviside": lambda z: jnp.heaviside(z, 0.0),
    "step_sign": jnp.sign,
    "square": lambda z: z * z,
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_is_one_site_between_two_dense_layers(name):
    act = ACTIVATIONS[name]
    kinds = _kinds(lambda p, x: act(x @ p["w1"] + p["b1"]) @ p["w2"])
    assert [k for k, _ in kinds] == ["linear", "activation", "linear"], kinds
    expected = {"gelu_exact": "gelu", "step_astype": "step", "step_where": "step",
                "step_heaviside": "heaviside", "step_sign": "step", "square": "elementwise"}.get(name, name)
    assert kinds[1][1] == expected


def test_linen_cnn_sites_in_order():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=False)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
            x = nn.LayerNorm()(nn.Dense(6)(x))
            x = nn.Dropout(0.5, deterministic=False)(x)
            return nn.Dense(3)(x)

    x = jnp.ones((2, 8, 8, 1))
    v = Net().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)

    def fun(params, x, key):
        return Net().apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                           rngs={"dropout": key}, mutable=["batch_stats"])

    sites = lfp_jax.find_sites(fun, v["params"], x, jax.random.key(2), has_aux=True)
    assert [(s.kind, s.label) for s in sites] == [
        ("linear", "conv"), ("normalization", "batch_norm"), ("activation", "relu"),
        ("max_pool", "max_pool"), ("pool", "avg_pool"), ("linear", "dense"),
        ("normalization", "layer_norm"), ("dropout", "dropout"), ("linear", "dense")]
    assert [s.name_stack for s in sites][:2] == ["Net/Conv_0", "Net/BatchNorm_0"]


def test_batchnorm_in_eval_mode_is_part_of_the_affine_block():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x))))

    v = Net().init(jax.random.key(0), X)
    kinds = [s.kind for s in lfp_jax.find_sites(lambda p, x: Net().apply(p, x), v, X)]
    assert kinds == ["linear", "activation", "linear"]


def test_residual_sum_and_mean_are_epsilon_sites():
    def fun(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = h + jnp.tanh(h)
        return jnp.mean(h, axis=-1, keepdims=True) * jnp.ones((1, 3))

    kinds = _kinds(fun)
    assert ("sum", "sum") in kinds and ("pool", "reduce_sum") in kinds


def test_describe_points_at_the_users_lines():
    def fun(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return h @ p["w2"]

    first = inspect.getsourcelines(fun)[1]
    table = lfp_jax.describe(fun, P, X)
    assert f"test_sites.py:{first + 1}" in table and f"test_sites.py:{first + 2}" in table
    assert "Identity()" in table and "Epsilon(1e-06)" in table and "relu" in table


def test_sites_inside_scan_are_found():
    def fun(p, x):
        def body(h, _):
            return jnp.tanh(h @ jnp.eye(4) + 0.1), None
        h, _ = jax.lax.scan(body, x, None, length=2)
        return h @ p["w1"]

    kinds = [s.kind for s in lfp_jax.find_sites(fun, P, X)]
    assert kinds == ["linear", "activation", "linear"]


def test_linen_sites_are_matched_by_module_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(5, name="hidden")(x))
            return nn.Dense(3, name="out")(x)

    v = Net().init(jax.random.key(0), X)
    composite = lfp_jax.lfp_epsilon().with_rules((Match(path="*/out"), lfp_jax.rules.ZPlus()))
    sites = lfp_jax.find_sites(lambda p, x: Net().apply(p, x), v, X, composite=composite)
    assert [(s.path, type(s.rule).__name__) for s in sites] == [
        ("Net/hidden", "Epsilon"), ("Net", "Identity"), ("Net/out", "ZPlus")]


def test_plain_function_sites_are_named_after_their_weights():
    sites = lfp_jax.find_sites(lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"], P, X)
    assert [s.path for s in sites] == ["w1", "", "w2"]
    assert sites[0].param_paths == ("b1", "w1")


def test_mish_is_labelled_mish():
    kinds = _kinds(lambda p, x: jax.nn.mish(x @ p["w1"]) @ p["w2"])
    assert kinds[1] == ("activation", "mish")


def test_describe_rows_of_a_transformer_stay_readable():
    """Long module paths and primitive lists wrap inside their columns (no row past 160 characters);
    the attention's softmax and products get AttnLRP's rules."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(name="pre_attention_layer_norm")(x)
            h = nn.MultiHeadDotProductAttention(num_heads=2, name="self_attention_over_tokens")(h, h)
            x = x + h
            return x + nn.Dense(8, name="feed_forward_output_projection")(
                nn.gelu(nn.Dense(16, name="feed_forward_input_projection")(nn.LayerNorm()(x))))

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            for k in range(2):
                x = Block(name=f"encoder_block_number_{k}")(x)
            return x.mean(1)

    x = jnp.ones((2, 4, 8))
    v = Encoder().init(jax.random.key(0), x)
    table = lfp_jax.describe(lambda p, x: Encoder().apply(p, x), v, x)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 160, max(lines, key=len)
    assert "feed_forward_output_projection" in table.replace("\n", "").replace(" ", "")
    assert "SoftmaxTaylor()" in table and "UniformProduct(1e-06)" in table and "without a rule" not in table


def test_sites_inside_flax_rnn_cells_point_at_the_users_line():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.RNN(nn.SimpleCell(4, param_dtype=jnp.float64))(x)[:, -1]  # this line

    x = jnp.ones((2, 3, 4), jnp.float64)
    v = Net().init(jax.random.key(0), x)
    line = inspect.getsourcelines(Net)[1] + 3
    sites = lfp_jax.find_sites(lambda p, x: Net().apply(p, x), v, x)
    assert [s.kind for s in sites] == ["linear", "linear", "sum", "activation"]
    assert all(f"test_sites.py:{line} (" in s.source_line and "Net.__call__" in s.source_line for s in sites)


# -- names of sites in models from libraries --------------------------------------------------------------


@pytest.mark.parametrize("stack,path", [
    ("Transformer/Transformer._apply_attention/layer_0/attn/q_einsum/BTD,NDH->BTNH",
     "Transformer/layer_0/attn/q_einsum"),                      # gm: a method scope and an einsum
    ("Transformer/Transformer._encode_and_get_inputs/embedder.encode", "Transformer/embedder"),
    ("LM/Embed_0.attend", "LM/Embed_0"),                        # linen: a module called by a method
    ("1/0/0/1/vmap(vmap(vmap()))", ""),                         # penzai: positions in Sequentials
    ("RNN_0/LSTMCell_0.scan_fn/LSTMCell_0", "RNN_0/LSTMCell_0"),
])
def test_name_stacks_become_module_paths(stack, path):
    from lfp_jax._names import clean_name_stack

    assert clean_name_stack(stack) == path


def test_a_site_named_only_by_positions_takes_its_parameter_label():
    """penzai names parameters by label (``block/attention/query.weights``) and its name stacks hold only
    positions: the site is named after the label's layer."""
    params = {"block_0/attention/query.weights": jnp.ones((3, 4)), "head/out.weights": jnp.ones((4, 2))}

    def fun(p, x):
        with jax.named_scope("1"), jax.named_scope("0"):
            h = jax.nn.relu(x @ p["block_0/attention/query.weights"])
        return h @ p["head/out.weights"]

    paths = [s.path for s in lfp_jax.find_sites(fun, params, jnp.ones((2, 3))) if s.kind == "linear"]
    assert paths == ["block_0/attention/query", "head/out"]


def test_a_batch_norm_is_named_by_its_module_or_by_the_axes_of_its_statistics():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=False, name="bn_init", dtype=jnp.bfloat16)(x)
            x = nn.BatchNorm(use_running_average=False, name="stem")(jnp.asarray(x, jnp.float32))
            return nn.Dense(3)(x.mean((1, 2)))

    net = Net()
    x = jnp.ones((2, 6, 6, 3))
    v = net.init(jax.random.key(0), x)

    def fun(p, x):
        return net.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])[0]

    labels = [s.label for s in lfp_jax.find_sites(fun, v["params"], x, input_argnums=(1,))
              if s.kind == "normalization"]
    assert labels == ["batch_norm", "batch_norm"]

    def per_token(x):   # a layer norm of one example (as equinox writes it under vmap) and an RMS norm
        h = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
        return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + 1e-6)

    labels = [s.label for s in lfp_jax.find_sites(lambda p, x: per_token(x) @ p, jnp.ones((5, 2)),
                                                  jnp.ones(5)) if s.kind == "normalization"]
    assert labels == ["layer_norm", "rms_norm"]
