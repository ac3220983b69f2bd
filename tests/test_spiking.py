"""LIF neurons, the spiking LFP rule and spike rewards, against hand computation and independent references.

The references here never call the engine: numpy loops over time that apply the reference's rule
layer by layer (``lfp-spec.md`` §5), or per-layer ``jax.vjp`` calls where the rule needs a layer's
Jacobian (convolutions, pooling).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lfp_jax
from experiments import models
from lfp_jax import Match, rules
from lfp_jax.errors import NoRuleError
from lfp_jax.nn import lif_step, run_lif_layers

BETA, THR, EPS = 0.9, 1.0, 1e-6


def test_lif_step_hand_computed_sequence():
    """u_{t+1} = β u_t + I_t − H(u_t − ϑ) ϑ, spike = H(u_{t+1} − ϑ): the reset comes one step late."""
    currents = [0.6, 0.6, 0.6, 0.0, 0.0]
    u, got = jnp.zeros(()), []
    for c in currents:
        s, u = lif_step(jnp.asarray(c), u)
        got.append((float(s), float(u)))
    # by hand: 0.6 -> 1.14 (spike) -> 1.626 - 1 = 0.626... -> reset only where u_t > 1
    u1 = 0.6
    u2 = 0.9 * u1 + 0.6  # 1.14: spike
    u3 = 0.9 * u2 + 0.6 - 1.0  # reset for the spike at u2
    u4 = 0.9 * u3 + 0.0  # u3 = 0.626 < 1: no reset
    u5 = 0.9 * u4
    expected = [(0, u1), (1, u2), (0, u3), (0, u4), (0, u5)]
    np.testing.assert_allclose(np.array(got), np.array(expected, float), rtol=1e-6)


def test_lif_derivatives_heaviside_zero_atan_surrogate_and_no_reset_gradient():
    c = jnp.array([0.3, 1.5, 0.9])
    u = jnp.array([1.2, 0.1, 0.4])  # the first one resets
    ds_dc = jax.jacobian(lambda c: lif_step(c, u)[0])(c)
    np.testing.assert_array_equal(ds_dc, 0.0)  # true Heaviside: no derivative
    du_du = jax.jacobian(lambda u: lif_step(c, u)[1])(u)
    np.testing.assert_allclose(du_du, BETA * np.eye(3))  # the reset is not differentiated
    new = BETA * u + c - (u > THR) * THR
    v = np.asarray(new - THR)
    slope = (2.0 / 2) / (1 + (math.pi / 2 * 2.0 * v) ** 2)
    ds_dc_atan = jax.jacobian(lambda c: lif_step(c, u, surrogate="atan")[0])(c)
    np.testing.assert_allclose(ds_dc_atan, np.diag(slope), rtol=1e-6)


def test_lif_vmap_and_jit_equal_elementwise_application():
    c = jax.random.normal(jax.random.key(0), (5, 4)) + 0.8
    u = jax.random.normal(jax.random.key(1), (4,))
    batched = jax.vmap(lambda ci: lif_step(ci, u), in_axes=0)(c)
    rows = [lif_step(ci, u) for ci in c]
    for k in range(2):  # equal up to rounding (XLA may fuse the compiled program differently)
        np.testing.assert_allclose(batched[k], np.stack([r[k] for r in rows]), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(jax.jit(lif_step)(c, u)[k], lif_step(c, u)[k], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("bad, message", [({"surrogate": "sigmoid"}, "surrogate"), ({"beta": 1.5}, "beta"),
                                          ({"threshold": 0.0}, "threshold")])
def test_lif_bad_arguments_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        lif_step(jnp.ones(3), jnp.zeros(3), **bad)


# --- the rule against the reference's equations ------------------------------------------------


def _tiny(T=2, B=3, D=4, H=5, C=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    p = {"w1": jax.random.normal(k[0], (D, H)), "b1": jax.random.normal(k[1], (H,)) * 0.3,
         "w2": jax.random.normal(k[2], (H, C)), "b2": jax.random.normal(k[3], (C,)) * 0.3}
    x = jax.random.uniform(k[4], (B, D)) * 2
    r = jax.random.normal(k[5], (T, B, C))  # reward on every output step, silent ones too
    return p, x, r


def _scan_model(T, order="step", constant=False):
    def model(p, x):
        layers = [lambda a: a @ p["w1"] + p["b1"], lambda a: a @ p["w2"] + p["b2"]]
        if constant:  # direct encoding: the first layer's current computed once
            return run_lif_layers(layers, x, steps=T, order=order)
        return run_lif_layers(layers, jnp.broadcast_to(x, (T, *x.shape)), order=order)
    return model


def _numpy_reference(p, x, r, normalizer="membrane"):
    """The reference's spiking rule, written out with numpy: time backwards, layers backwards."""
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    X, R = np.asarray(x, np.float64), np.asarray(r, np.float64)
    T, layers = R.shape[0], [("w1", "b1"), ("w2", "b2")]
    u = [np.zeros((X.shape[0], P[w].shape[1])) for w, _ in layers]
    rec = []
    for _ in range(T):
        a, step = X, []
        for k, (w, b) in enumerate(layers):
            reset = (u[k] > THR) * THR
            new = BETA * u[k] + a @ P[w] + P[b] - reset
            step.append((a, u[k], new, reset))
            a, u[k] = (new > THR).astype(float), new
        rec.append(step)
    F = {k: np.zeros_like(v) for k, v in P.items()}
    r_in = np.zeros_like(X)
    handed = [np.zeros_like(m) for m in u]
    for t in reversed(range(T)):
        r_out = R[t]
        for k in reversed(range(len(layers))):
            a, u_t, new, reset = rec[t][k]
            w, b = layers[k]
            total = r_out + handed[k]
            if normalizer == "membrane":
                s = total / (np.abs(u_t) + np.abs(new + reset - u_t) + EPS)
            else:
                s = total / (new + np.where(new >= 0, EPS, -EPS))
            F[w] += np.abs(P[w]) * (a.T @ s)
            F[b] += np.abs(P[b]) * s.sum(0)
            handed[k] = u_t * BETA * s
            r_out = a * (s @ P[w].T)
        r_in += r_out
    return F, r_in


@pytest.mark.parametrize("normalizer", ["membrane", "epsilon"])
def test_spiking_rule_equals_the_reference_equations_on_a_two_step_network(normalizer):
    p, x, r = _tiny()
    composite = lfp_jax.lfp_epsilon().with_rules(
        (Match(kind="spiking"), rules.SpikingEpsilon(EPS, normalizer=normalizer)))
    spikes, feedback_fn = lfp_jax.lfp_vjp(_scan_model(2), p, x, composite=composite)
    feedback, relevance = feedback_fn(r)
    ref, ref_in = _numpy_reference(p, x, r, normalizer)
    assert float(jnp.sum(spikes)) < spikes.size  # silent outputs exist and still receive reward
    for k in p:
        assert np.abs(ref[k]).max() > 0
        np.testing.assert_allclose(feedback[k], ref[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(relevance, ref_in, rtol=1e-9, atol=1e-12)


def test_scan_over_time_equals_the_unrolled_loop():
    """One scan over time (step order), one scan per layer (layer order), with frames or a constant input:
    all equal the Python loop and the reference's equations."""
    T = 5
    p, x, r = _tiny(T=T, seed=3)

    def unrolled(p, x):
        u1 = jnp.zeros((x.shape[0], 5))
        u2 = jnp.zeros((x.shape[0], 3))
        out = []
        for _ in range(T):
            s1, u1 = lif_step(x @ p["w1"] + p["b1"], u1)
            s2, u2 = lif_step(s1 @ p["w2"] + p["b2"], u2)
            out.append(s2)
        return jnp.stack(out)

    f_loop, r_loop = lfp_jax.lfp_vjp(unrolled, p, x)[1](r)
    ref, ref_in = _numpy_reference(p, x, r)
    for order in ("step", "layer"):
        for constant in (False, True):
            f_scan, r_scan = lfp_jax.lfp_vjp(_scan_model(T, order, constant), p, x)[1](r)
            for k in p:
                np.testing.assert_allclose(f_scan[k], f_loop[k], rtol=1e-10, atol=1e-12)
                np.testing.assert_allclose(f_scan[k], ref[k], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(r_scan, ref_in, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r_loop, ref_in, rtol=1e-9, atol=1e-12)


def test_spiking_feedback_under_jit_and_vmap():
    p, x, r = _tiny(T=3, seed=4)
    model = _scan_model(3)

    def feedback(p, x, r):
        return lfp_jax.lfp_vjp(model, p, x)[1](r)[0]

    eager = feedback(p, x, r)
    jitted = jax.jit(feedback)(p, x, r)
    per_example = jax.vmap(lambda xi, ri: feedback(p, xi[None], ri[:, None]))(x, jnp.swapaxes(r, 0, 1))
    for k in p:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(per_example[k].sum(0), eager[k], rtol=1e-9, atol=1e-12)


def test_spiking_cnn_with_max_pooling_against_per_layer_vjps():
    """conv → LIF → 2x2 max pool → dense → LIF over 3 steps: the rule applied by hand with jax.vjp of each
    layer (reward routed through the pool as it is, to the first maximum of each window)."""
    k = jax.random.split(jax.random.key(7), 5)
    p = {"k": jax.random.normal(k[0], (3, 3, 1, 2)) * 0.8, "c": jnp.array([0.3, 0.6]),
         "w": jax.random.normal(k[1], (18, 3)), "b": jnp.array([0.2, -0.1, 0.4])}
    x = jax.random.uniform(k[2], (2, 8, 8, 1)) * 2
    T = 3
    r = jax.random.normal(k[3], (T, 2, 3))

    def conv(h, kk, c):
        return jax.lax.conv_general_dilated(h, kk, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + c

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def dense(h, w, b):
        return pool(h).reshape(h.shape[0], -1) @ w + b

    def model(p, x):
        frames = jnp.broadcast_to(x, (T, *x.shape))
        return run_lif_layers([lambda h: conv(h, p["k"], p["c"]), lambda h: dense(h, p["w"], p["b"])], frames,
                              order=order)

    order = "step"
    feedback, relevance = lfp_jax.lfp_vjp(model, p, x)[1](r)
    order = "layer"
    feedback_layer, relevance_layer = lfp_jax.lfp_vjp(model, p, x)[1](r)

    layers = [(lambda h, q: conv(h, q[0], q[1]), ("k", "c")), (lambda h, q: dense(h, q[0], q[1]), ("w", "b"))]
    u = [jnp.zeros((2, 6, 6, 2)), jnp.zeros((2, 3))]
    rec = []
    for _ in range(T):
        a, step = x, []
        for n, (f, names) in enumerate(layers):
            q = tuple(p[m] for m in names)
            cur, vjp = jax.vjp(f, a, q)
            reset = (u[n] > THR) * THR
            new = BETA * u[n] + cur - reset
            step.append((a, u[n], new, reset, vjp))
            a, u[n] = (new > THR).astype(new.dtype), new
        rec.append(step)
    ref = {m: jnp.zeros_like(v) for m, v in p.items()}
    ref_in = jnp.zeros_like(x)
    handed = [jnp.zeros_like(m) for m in u]
    for t in reversed(range(T)):
        r_out = r[t]
        for n in reversed(range(2)):
            a, u_t, new, reset, vjp = rec[t][n]
            s = (r_out + handed[n]) / (jnp.abs(u_t) + jnp.abs(new + reset - u_t) + EPS)
            g_a, g_q = vjp(s)
            for m, g in zip(layers[n][1], g_q):
                ref[m] = ref[m] + jnp.abs(p[m]) * g
            handed[n] = u_t * BETA * s
            r_out = a * g_a  # the pool's VJP inside `dense` routes s; R = spikes ⊙ J^T s
        ref_in = ref_in + r_out
    for m in p:
        assert float(jnp.abs(ref[m]).max()) > 0
        np.testing.assert_allclose(feedback[m], ref[m], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(feedback_layer[m], ref[m], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(relevance, ref_in, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(relevance_layer, ref_in, rtol=1e-9, atol=1e-12)


def test_spiking_rule_refuses_other_sites():
    composite = lfp_jax.lfp_epsilon().with_rules((Match(kind="linear"), rules.SpikingEpsilon()))
    with pytest.raises(NoRuleError, match="spiking"):
        lfp_jax.lfp_vjp(lambda w, x: jnp.tanh(x @ w), jnp.ones((3, 2)), jnp.ones((4, 3)),
                        composite=composite)


# --- rewards -------------------------------------------------------------------------------------


def test_rate_coded_reward_hand_computed():
    spikes = jnp.array([[[1.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0]]])  # T=4
    r = lfp_jax.rewards.spike_rate_coded(spikes, jnp.array([0]))
    sig = lambda v: 1 / (1 + math.exp(-v))
    pos = 1 - sig(3 - 2)  # class 0 fired 3 times, ⌊T/2⌋ = 2: reward at every step
    neg1 = 1 - sig(3 - 2)  # class 1 silent 3 times
    neg2 = 1 - sig(1 - 2)  # class 2 silent once
    expected = np.array([[[pos, 0, -neg2]], [[pos, 0, 0]], [[pos, -neg1, -neg2]], [[pos, 0, -neg2]]])
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_spike_count_softmax_loss_hand_computed():
    spikes = jnp.array([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 1.0]]])  # counts (2, 2)
    r = lfp_jax.rewards.spike_count_softmax_loss(spikes, jnp.array([1]), epsilon=0.0)
    r_counts = np.array([2 * (0 - 0.5), 2 * (1 - 0.5)])  # softmax of equal counts = 1/2
    expected = np.asarray(spikes) * (r_counts / 2)[None, None]
    np.testing.assert_allclose(r, expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r).sum(0)[0], r_counts, rtol=1e-6)  # conserved over time
    with pytest.raises(ValueError, match="T, batch, classes"):
        lfp_jax.rewards.spike_rate_coded(jnp.ones((4, 3)), jnp.array([0, 1, 2, 0]))


# --- baselines: gradient descent through the Heaviside cannot learn -------------------------------


@pytest.mark.slow
def test_gradient_through_the_true_heaviside_is_zero_and_the_surrogate_is_not():
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1)) * 2 - 1
    y = jnp.arange(4)
    for surrogate, zero in ((None, True), ("atan", False)):
        model = models.build("snn_mlp", 10, hidden=(32,), steps=4, surrogate=surrogate)
        params = model.init(jax.random.key(1), x)["params"]

        def loss(p, model=model):
            counts = model.apply({"params": p}, x).sum(0)
            return -jnp.mean(jax.nn.log_softmax(counts)[jnp.arange(4), y])

        grads = jax.grad(loss)(params)
        total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads))
        assert (total == 0.0) == zero


@pytest.mark.slow
def test_rate_encoded_frames_carry_reward_to_the_first_layer_and_rates_are_spike_means():
    model = models.build("snn_mlp", 10, hidden=(16,), steps=6, encoding="rate")
    images = jax.random.uniform(jax.random.key(0), (5, 28, 28, 1)) * 2 - 1
    frames = models.encode_inputs(model, images, jax.random.key(1))
    assert frames.shape == (6, 5, 28, 28, 1)
    assert set(np.unique(np.asarray(frames))) <= {0.0, 1.0}
    # Bernoulli with p = (x + 1) / 2: the frequency over many draws approaches p
    many = models.encode_inputs(models.build("snn_mlp", 10, steps=4000, encoding="rate"), images[:1, :2, :2],
                                jax.random.key(2))
    np.testing.assert_allclose(np.asarray(many).mean(0), (np.asarray(images[:1, :2, :2]) + 1) / 2, atol=0.03)
    params = model.init(jax.random.key(3), frames)["params"]
    fb = lfp_jax.lfp_grad(lambda p, x: model.apply({"params": p}, x), lfp_jax.rewards.spike_rate_coded,
                          reward_argnums=(2,))(params, frames, jnp.arange(5))
    assert float(jnp.abs(fb["Dense_0"]["kernel"]).max()) > 0
    out = model.apply({"params": params}, frames)
    rates = models.spike_rates(model, params, images, jax.random.key(1))
    assert len(rates) == 2
    np.testing.assert_allclose(rates[-1], float(out.mean()), rtol=1e-6)
    with pytest.raises(ValueError, match="frames"):
        model.apply({"params": params}, images)  # images, not frames


def test_flax_lif_module_inside_nn_scan_matches_the_functional_form():
    """A linen model written the Flax way (nn.scan over a cell of Dense + LIF) gets the same feedback as
    run_lif_layers with the same parameters, and both match the reference's equations."""
    import flax.linen as nn

    from lfp_jax.nn import LIF

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, carry, x):
            u1, u2 = carry
            s1, u1 = LIF()(nn.Dense(5, name="d1")(x), u1)
            s2, u2 = LIF()(nn.Dense(3, name="d2")(s1), u2)
            return (u1, u2), s2

    class Net(nn.Module):
        @nn.compact
        def __call__(self, frames):
            b = frames.shape[1]
            scan = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False})
            return scan(name="cell")((jnp.zeros((b, 5)), jnp.zeros((b, 3))), frames)[1]

    T = 3
    p, x, r = _tiny(T=T, seed=5)
    frames = jnp.broadcast_to(x, (T, *x.shape))
    net = Net()
    variables = {"params": {"cell": {"d1": {"kernel": p["w1"], "bias": p["b1"]},
                                     "d2": {"kernel": p["w2"], "bias": p["b2"]}}}}
    assert net.init(jax.random.key(0), frames)["params"]["cell"]["d1"]["kernel"].shape == p["w1"].shape
    fb, _ = lfp_jax.lfp_vjp(lambda v, f: net.apply(v, f), variables, frames)[1](r)
    ref, _ = _numpy_reference(p, x, r)
    got = fb["params"]["cell"]
    for name, key in (("d1", "w1"), ("d2", "w2")):
        np.testing.assert_allclose(got[name]["kernel"], ref[key], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["d1"]["bias"], ref["b1"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("wrapper", ["cond", "checkpoint"])
def test_output_spikes_through_control_flow_keep_reward_on_silent_neurons(wrapper):
    """Spikes reaching the output through a cond or a remat region still take the reward as it is."""
    p, x, r = _tiny(T=3, seed=6)
    inner = _scan_model(3, order="layer")

    def model(p, x):
        s = inner(p, x)
        if wrapper == "cond":
            return jax.lax.cond(True, lambda a: a, lambda a: a[::-1][::-1], s)
        return jax.checkpoint(lambda a: a)(s)

    feedback, relevance = lfp_jax.lfp_vjp(model, p, x)[1](r)
    ref, ref_in = _numpy_reference(p, x, r)
    for k in p:
        np.testing.assert_allclose(feedback[k], ref[k], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(relevance, ref_in, rtol=1e-9, atol=1e-12)
