"""lfp_jax composes with JAX transformations and control flow, and feeds optax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import theorem1_expected

import lfp_jax
from lfp_jax import rewards


def _params(seed=0, depth=3, width=6, d_in=4, classes=3):
    keys = jax.random.split(jax.random.key(seed), 2 * depth + 4)
    return {
        "w_in": jax.random.normal(keys[0], (d_in, width), jnp.float64) / 2,
        "b_in": jax.random.normal(keys[1], (width,), jnp.float64) / 4,
        "ws": jax.random.normal(keys[2], (depth, width, width), jnp.float64) / 2,
        "bs": jax.random.normal(keys[3], (depth, width), jnp.float64) / 4,
        "w_out": jax.random.normal(keys[4], (width, classes), jnp.float64) / 2,
        "b_out": jax.random.normal(keys[5], (classes,), jnp.float64) / 4,
    }


def unrolled(p, x):
    h = jnp.tanh(x @ p["w_in"] + p["b_in"])
    for k in range(p["ws"].shape[0]):
        h = jax.nn.silu(h @ p["ws"][k] + p["bs"][k])
    return h @ p["w_out"] + p["b_out"]


def scanned(p, x):
    h = jnp.tanh(x @ p["w_in"] + p["b_in"])

    def layer(h, wb):
        w, b = wb
        return jax.nn.silu(h @ w + b), None

    h, _ = jax.lax.scan(layer, h, (p["ws"], p["bs"]))
    return h @ p["w_out"] + p["b_out"]


def _data(n=5, d_in=4, classes=3, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, d_in), jnp.float64), jax.random.randint(ky, (n,), 0, classes)


def _vf(fun, **kw):
    return lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,), **kw)


def _assert_trees_close(a, b, rtol=1e-9, atol=1e-12):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_jit_equals_eager():
    p, (x, y) = _params(), _data()
    eager = _vf(unrolled)(p, x, y)
    jitted = jax.jit(_vf(unrolled))(p, x, y)
    _assert_trees_close(eager, jitted)


def test_vmap_per_example_feedback_sums_to_batch_feedback():
    p, (x, y) = _params(), _data()
    _, batch = _vf(unrolled)(p, x, y)
    per_example = jax.vmap(lambda xi, yi: _vf(unrolled)(p, xi[None], yi[None])[1])(x, y)
    assert jax.tree.leaves(per_example)[0].shape[0] == x.shape[0]
    _assert_trees_close(jax.tree.map(lambda a: a.sum(0), per_example), batch)


def test_scan_over_layers_equals_unrolled_model():
    p, (x, y) = _params(), _data()
    _assert_trees_close(_vf(scanned)(p, x, y), _vf(unrolled)(p, x, y), rtol=1e-7)


def test_scan_keeps_its_loop_in_the_rewritten_program():
    p, (x, y) = _params(), _data()
    jaxpr = jax.make_jaxpr(_vf(scanned))(p, x, y)
    assert "scan" in str(jaxpr)


def test_cond_selects_the_branch_rules():
    p, (x, y) = _params(), _data()

    def with_cond(p, x, flag):
        h = jax.lax.cond(flag, lambda h: jnp.tanh(h), lambda h: jax.nn.relu(h), x @ p["w_in"] + p["b_in"])
        return h @ p["w_out"] + p["b_out"]

    def tanh_model(p, x):
        return jnp.tanh(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    def relu_model(p, x):
        return jax.nn.relu(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    reward = lambda z: rewards.softmax_loss(z, y)  # noqa: E731
    for flag, ref in ((True, tanh_model), (False, relu_model)):
        got = lfp_jax.lfp_value_and_feedback(with_cond, reward)(p, x, flag)[1]
        want = lfp_jax.lfp_value_and_feedback(ref, reward)(p, x)[1]
        _assert_trees_close(got, want, rtol=1e-7)


def test_remat_block_equals_plain_block():
    p, (x, y) = _params(), _data()

    def rematted(p, x):
        h = jax.checkpoint(lambda x: jnp.tanh(x @ p["w_in"] + p["b_in"]))(x)
        return h @ p["w_out"] + p["b_out"]

    def plain(p, x):
        return jnp.tanh(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    _assert_trees_close(_vf(rematted)(p, x, y), _vf(plain)(p, x, y), rtol=1e-7)


def test_custom_vjp_and_custom_jvp_are_traced_through_their_forward():
    """A user's custom gradient rule does not leak into LFP: feedback equals that of the plain forward."""

    @jax.custom_vjp
    def weird_tanh(v):
        return jnp.tanh(v)

    weird_tanh.defvjp(lambda v: (jnp.tanh(v), None), lambda _, g: (100.0 * g,))
    p, (x, y) = _params(), _data()

    def custom(p, x):
        return weird_tanh(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    def plain(p, x):
        return jnp.tanh(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

    _assert_trees_close(_vf(custom)(p, x, y), _vf(plain)(p, x, y))


def test_optax_sgd_step_moves_parameters_by_plus_lr_times_feedback():
    p, (x, y) = _params(), _data()
    lr = 0.1
    _, fb = _vf(unrolled)(p, x, y)
    neg = lfp_jax.lfp_grad(unrolled, rewards.softmax_loss, reward_argnums=(2,))(p, x, y)
    opt = optax.sgd(lr)
    updates, _ = opt.update(neg, opt.init(p), p)
    new = optax.apply_updates(p, updates)
    _assert_trees_close(new, jax.tree.map(lambda a, f: a + lr * f, p, fb))


def test_lfp_step_inside_lax_scan_training_loop():
    p, (x, y) = _params(), _data()
    opt = optax.sgd(0.05)
    grad = lfp_jax.lfp_grad(unrolled, rewards.softmax_loss, reward_argnums=(2,))

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(grad(params, x, y), state, params)
        return (optax.apply_updates(params, updates), state), None

    (scanned_p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=3)
    loop_p, state = p, opt.init(p)
    for _ in range(3):
        (loop_p, state), _ = step((loop_p, state), None)
    _assert_trees_close(scanned_p, loop_p)


def test_second_call_does_not_retrace():
    p, (x, y) = _params(), _data()
    traces = []

    def counted(p, x):
        traces.append(1)
        return unrolled(p, x)

    step = jax.jit(_vf(counted))
    step(p, x, y)
    step(p, x + 1.0, y)
    assert len(traces) == 1


def test_has_aux_returns_aux_and_ignores_it_for_reward():
    p, (x, y) = _params(), _data()

    def with_aux(p, x):
        z = unrolled(p, x)
        return z, {"norm": jnp.sum(z ** 2)}

    (z, aux), fb = _vf(with_aux, has_aux=True)(p, x, y)
    np.testing.assert_allclose(aux["norm"], jnp.sum(unrolled(p, x) ** 2))
    _assert_trees_close(fb, _vf(unrolled)(p, x, y)[1])
    neg, aux2 = lfp_jax.lfp_grad(with_aux, rewards.softmax_loss, reward_argnums=(2,), has_aux=True)(p, x, y)
    _assert_trees_close(neg, jax.tree.map(jnp.negative, fb))


def test_reward_closure_equals_reward_argnums():
    p, (x, y) = _params(), _data()
    closure = lfp_jax.lfp_value_and_feedback(unrolled, lambda z: rewards.softmax_loss(z, y))(p, x)
    _assert_trees_close(closure, _vf(unrolled)(p, x, y))


def test_several_argnums_give_a_tuple_of_feedbacks():
    p, (x, y) = _params(), _data()
    first = {k: v for k, v in p.items() if k.endswith("in")}
    rest = {k: v for k, v in p.items() if not k.endswith("in")}
    g = lfp_jax.lfp_value_and_feedback(lambda a, b, x: unrolled({**a, **b}, x),
                                       rewards.softmax_loss, argnums=(0, 1), reward_argnums=(3,))
    _, (fa, fr) = g(first, rest, x, y)
    _, full = _vf(unrolled)(p, x, y)
    _assert_trees_close({**fa, **fr}, full)


def test_sharded_batch_gives_the_same_feedback():
    """A batch split over all devices of this process gives the feedback of the unsplit batch.

    Runs only where this process sees several devices (several accelerators, or host devices from
    ``XLA_FLAGS=--xla_force_host_platform_device_count=4``); skipped otherwise. The suite's own
    multi-device check, which always runs, lives in ``tests/test_scale.py`` (``test_sharded_*``):
    ``tests/_sharded_child.py`` runs in a subprocess with 8 host devices, and the tests assert that the
    batch really lies on 8 devices, that the feedback equals the one-device feedback and Theorem 1, and
    that it comes back replicated.
    """
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip(f"needs at least 2 devices, this process has {len(devices)}; the 8-device check is "
                    "tests/test_scale.py::test_sharded_* (tests/_sharded_child.py, 8 host devices)")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    p, (x, y) = _params(), _data(n=2 * len(devices))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert len(xs.sharding.device_set) == len(devices) >= 2
    assert {s.data.shape[0] for s in xs.addressable_shards} == {2}  # two rows per device
    _assert_trees_close(jax.jit(_vf(unrolled))(p, xs, y), _vf(unrolled)(p, x, y))


def test_linen_dropout_model_under_jit_with_rng_argument():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dropout(0.3, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
            return nn.Dense(3)(x)

    x, y = _data()
    params = lfp_jax.nn.torch_init(jax.random.key(2), Net().init(jax.random.key(0), x, False)["params"])
    f = lambda p, x, k: Net().apply({"params": p}, x, True, rngs={"dropout": k})  # noqa: E731
    g = jax.jit(lfp_jax.lfp_value_and_feedback(f, rewards.softmax_loss, reward_argnums=(3,)))
    _, fb1 = g(params, x, jax.random.key(5), y)
    _, fb2 = g(params, x, jax.random.key(6), y)
    assert not np.allclose(fb1["Dense_0"]["kernel"], fb2["Dense_0"]["kernel"])  # masks differ
    # A ReLU network: Theorem 1 with the same mask (the same key), at lfp_epsilon's ε = 1e-6, except that
    # the reference's dropout rule rescales the reward by 1/(1-p) on top of the forward pass's 1/(1-p)
    # (which jax.grad has too): the layer before the dropout gets 1/0.7 of -|θ| ⊙ ∇CE.
    for key, fb in ((5, fb1), (6, fb2)):
        want = theorem1_expected(lambda p, x, k=key: f(p, x, jax.random.key(k)), params, x, labels=y)
        want = {"Dense_0": jax.tree.map(lambda a: a / 0.7, want["Dense_0"]), "Dense_1": want["Dense_1"]}
        for (path, got), w in zip(jax.tree_util.tree_flatten_with_path(fb)[0], jax.tree.leaves(want)):
            np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()),
                                       err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_parameters_give_feedback_of_their_dtype(dtype):
    p, (x, y) = _params(), _data()
    p, x = jax.tree.map(lambda a: a.astype(dtype), p), x.astype(dtype)
    _, fb = _vf(unrolled)(p, x, y)
    assert all(a.dtype == dtype for a in jax.tree.leaves(fb))
