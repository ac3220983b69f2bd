"""Language models that take integer token ids, written as each library writes them (tests/_lm_models.py):
embedding lookups are where reward enters, tied heads sum their table's feedback, and the relevance of
each token is the relevance at its lookup's output summed over the features. References: Theorem 1
(jax.grad), jax.jacobian matrix forms, the same model fed the embeddings as floats, LXT 0.6 on a token
model (tests/data/lxt/token_lm.npz), and hand-written loops for jit and vmap."""

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_theorem1, rel_err
from _lm_models import (
    D,
    T,
    V,
    eqx_bert,
    ids_and_labels,
    linen_lm,
    nnx_lm,
    take_lm,
    token_types,
)
from _lxt_models import token_lm

import lfp_jax
from lfp_jax import Match, composites, errors, rewards, targets

TINY = lfp_jax.lfp_epsilon(1e-12)
LXT = pathlib.Path(__file__).parent / "data" / "lxt"


def _inputs(name):
    ids, labels = ids_and_labels()
    if name == "eqx":
        return (ids, token_types(ids)), labels[:, 0] % 4
    return (ids,), labels


BUILD = {"linen": linen_lm, "nnx": nnx_lm, "eqx": eqx_bert, "take": take_lm}


# -- training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linen", "nnx", "eqx", "take"])
def test_a_model_of_token_ids_trains_with_lfp_under_jit_with_no_opt_in(name):
    fun, params = BUILD[name](relu=name == "take")
    inputs, labels = _inputs(name)
    g = lfp_jax.lfp_value_and_grad(fun, rewards.softmax_loss, reward_argnums=(1 + len(inputs),))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s):
        logits, neg_feedback = g(p, *inputs, labels)
        updates, s = opt.update(neg_feedback, s, p)
        return optax.apply_updates(p, updates), s, optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()

    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", errors.FrozenParameterWarning)   # equinox's LayerNorm offsets
        losses = []
        for _ in range(15):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["linen", "nnx", "eqx", "take"])
def test_per_example_feedback_under_vmap_sums_to_the_batch_feedback(name):
    fun, params = BUILD[name](relu=name == "take")
    inputs, labels = _inputs(name)
    n = len(inputs)
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(1 + n,), allow_frozen=True)
    batch = jax.jit(g)(params, *inputs, labels)[1]
    one = lambda *a: g(params, *(x[None] for x in a[:n]), a[n][None])[1]   # noqa: E731
    per_example = jax.jit(jax.vmap(one))(*inputs, labels)
    summed = jax.tree.map(lambda a: a.sum(0), per_example)
    for got, want in zip(jax.tree.leaves(summed), jax.tree.leaves(batch)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


# -- Theorem 1 at embeddings and tied heads ------------------------------------------------------------


@pytest.mark.parametrize("name", ["linen", "eqx", "take"])
def test_theorem_1_holds_at_embeddings_and_tied_heads(name):
    fun, params = BUILD[name](relu=True)
    inputs, labels = _inputs(name)
    assert_theorem1(fun, params, *inputs, labels=labels, rtol=1e-8)


def test_theorem_1_holds_in_the_effective_weight_form_with_gemma_norms():
    """nnx, √d-scaled embedding, 1 + scale RMSNorms (scale 0), tied head: F_θ = −|W| ⊙ ∇_W Σ CE with
    W = θ for the table and the kernels and W = 1 + scale for the norms (∂W/∂scale = 1)."""
    fun, params = nnx_lm(relu=True)
    (ids,), labels = _inputs("nnx")
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, composite=TINY, reward_argnums=(2,))
    got = jax.jit(g)(params, ids, labels)[1]
    grad = jax.jit(jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        fun(p, ids), labels).sum()))(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), fb, gr in zip(flat, jax.tree.leaves(got), jax.tree.leaves(grad)):
        name = jax.tree_util.keystr(path)
        weight = 1 + p if "norm" in name or "final" in name else p
        want = -np.abs(weight) * gr
        assert rel_err(fb, want) < 1e-8, name
    assert all(np.all(jax.tree.leaves(got[n]["scale"])[0] != 0) for n in ("norm1", "norm2", "final"))


# -- the relevance of each token -------------------------------------------------------------------------


def test_per_token_relevance_is_the_lookup_outputs_relevance_summed_over_features():
    """Two lookups of one table (the ids and the ids rolled by one): the relevance of token t is what
    its own lookup and the rolled lookup at t + 1 carry, against the same model fed both embeddings as
    floats."""
    fun, params = take_lm(relu=False)
    (ids,), _ = _inputs("take")

    def fed(p, now, before):
        h = jax.nn.gelu(jnp.concatenate([now, before], -1) @ p["w"] + p["b"])
        return h @ p["table"].T

    logits = fun(params, ids)
    target = targets.token(logits, jnp.argmax(logits[:, -1], -1))
    _, per_token = jax.jit(lfp_jax.lrp(fun, argnums=1))(params, ids, target=target)
    now, before = params["table"][ids], params["table"][jnp.roll(ids, 1, axis=-1)]
    _, (r_now, r_before) = jax.jit(lfp_jax.lrp(fed, argnums=(1, 2)))(params, now, before, target=target)
    expected = r_now.sum(-1) + jnp.roll(r_before.sum(-1), -1, axis=-1)
    assert per_token.shape == ids.shape and per_token.dtype == jnp.float64
    np.testing.assert_allclose(per_token, expected, rtol=1e-10, atol=1e-13)


def test_ids_shifted_right_by_a_pad_give_each_token_the_relevance_of_the_position_it_moved_to():
    """Flax's lm1b shifts the ids right with jnp.pad before the lookup: token t is looked up at position
    t + 1, the pad token at position 0 carries nothing, and the last token is shifted out (0)."""
    _, params = take_lm(relu=False)

    def fun(p, ids):
        shifted = jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]
        h = jax.nn.gelu(jnp.take(p["table"], shifted, axis=0) @ p["w"][:D] + p["b"])
        return h @ p["table"].T

    def fed(p, e):
        return jax.nn.gelu(e @ p["w"][:D] + p["b"]) @ p["table"].T

    (ids,), labels = _inputs("take")
    _, per_token = jax.jit(lfp_jax.lrp(fun, argnums=1))(params, ids, target=labels)
    e = params["table"][jnp.pad(ids, ((0, 0), (1, 0)))[:, :-1]]
    _, r_e = jax.jit(lfp_jax.lrp(fed, argnums=1))(params, e, target=labels)
    np.testing.assert_allclose(per_token[:, :-1], r_e.sum(-1)[:, 1:], rtol=1e-10, atol=1e-13)
    assert np.all(per_token[:, -1] == 0)


def test_token_relevance_and_table_feedback_in_jacobian_matrix_form():
    """z = mean_t(E[ids]) W: with s = R_z / z (ε → 0), R_e = e ⊙ J_eᵀ s per token summed over the
    features, and F_E = |E| ⊙ J_Eᵀ s (the rows looked up, summed), J from jax.jacobian."""
    k = jax.random.split(jax.random.key(7), 3)
    table = jax.random.normal(k[0], (V, D), jnp.float64)
    w = jax.random.normal(k[1], (D, 4), jnp.float64)
    ids = jnp.array([[1, 4, 4, 7], [2, 2, 9, 0]], jnp.int32)
    reward = jax.random.normal(k[2], (2, 4), jnp.float64)

    def fun(p, ids):
        return p["table"][ids].mean(1) @ p["w"]

    z, fb_fn = lfp_jax.lfp_vjp(fun, {"table": table, "w": w}, ids, composite=TINY)
    feedback, per_token = fb_fn(reward)
    s = (reward / z).reshape(-1)
    e = table[ids]
    j_e = jax.jacobian(lambda e: e.mean(1) @ w)(e).reshape(8, -1)            # (outputs, B·T·D)
    r_e = (e.reshape(-1) * (j_e.T @ s)).reshape(e.shape)
    np.testing.assert_allclose(per_token, r_e.sum(-1), rtol=1e-8)
    j_table = jax.jacobian(lambda t: fun({"table": t, "w": w}, ids))(table).reshape(8, -1)
    np.testing.assert_allclose(feedback["table"], np.abs(table) * (j_table.T @ s).reshape(table.shape),
                               rtol=1e-8, atol=1e-14)
    assert np.all(np.asarray(feedback["table"])[[3, 5, 6, 8, 10, 11, 12]] == 0)   # rows no token looked up


def test_token_relevance_under_jit_equals_eager_and_under_vmap_the_loop():
    fun, params = linen_lm()
    (ids,), labels = _inputs("linen")
    explain = lfp_jax.lrp(fun, argnums=1)
    eager = explain(params, ids, target=labels)[1]
    np.testing.assert_allclose(jax.jit(explain)(params, ids, target=labels)[1], eager, rtol=1e-10, atol=1e-14)
    looped = np.stack([explain(params, ids[b:b + 1], target=labels[b:b + 1])[1][0] for b in range(len(ids))])
    vmapped = jax.jit(jax.vmap(lambda i, y: explain(params, i[None], target=y[None])[1][0]))(ids, labels)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(looped, eager, rtol=1e-10, atol=1e-14)


def test_token_relevance_matches_lxt_in_its_inputs_embeds_convention():
    """A pre-LN causal decoder with a learned position table and a tied head, weights from LXT 0.6:
    LXT measures a token's relevance at the word-embedding lookup's output, summed over features."""
    data = np.load(LXT / "token_lm.npz")
    params = {k[len("param/"):]: jnp.asarray(data[k]) for k in data.files if k.startswith("param/")}
    ids = jnp.asarray(data["ids"])
    logits = token_lm(params, ids)
    np.testing.assert_allclose(logits, data["logits"], rtol=1e-10)
    target = targets.token(logits, data["k"], data["t"])
    explain = jax.jit(lfp_jax.lrp(token_lm, composites.attn_lrp(float(data["epsilon"])), argnums=1))
    _, per_token = explain(params, ids, target=target)
    assert rel_err(per_token, data["relevance_tokens"]) < 1e-3


# -- what describe shows ---------------------------------------------------------------------------------


def test_describe_shows_the_embedding_sites_and_the_shared_table():
    fun, params = linen_lm()
    (ids,), _ = _inputs("linen")
    table = lfp_jax.describe(fun, params, ids)
    assert re.search(r"\n0 +embedding +embed +Embedding\(\) +LinenLM/Embed_0 +gather", table), table
    assert "Embed_0/embedding: sites 0, " in table and "a tied head" in table
    eqx_fun, eqx_params = eqx_bert()
    inputs, _ = _inputs("eqx")
    found = lfp_jax.find_sites(eqx_fun, eqx_params, *inputs)
    lookups = [s for s in found if s.kind == "embedding"]
    # words and token types are looked up by inputs; positions by arange: a parameter value, no site
    assert [s.path for s in lookups] == ["words", "types"]


def test_ids_used_as_a_mask_carry_no_reward():
    """The padding mask (ids != 0) selects scores as a constant and is no site. In the first sequence,
    positions 0 and 1 are padding: the classifier reads position 0's stream, and no query attends to
    the padded keys, so position 1 gets no relevance at all."""
    fun, params = eqx_bert()
    inputs, labels = _inputs("eqx")
    found = lfp_jax.find_sites(fun, params, *inputs)
    assert not any(s.kind == "bilinear" and "ne" in s.primitives for s in found)
    _, (r_ids, r_types) = jax.jit(lfp_jax.lrp(fun, argnums=(1, 2)))(params, *inputs, target=labels)
    assert r_ids.shape == inputs[0].shape and r_types.shape == inputs[1].shape
    assert np.all(np.isfinite(r_ids)) and np.any(r_types != 0)
    assert r_ids[0, 1] == 0 and r_ids[0, 0] != 0 and np.all(r_ids[1:, 1] != 0)


# -- relevance inside the model --------------------------------------------------------------------------


def test_recorded_relevance_at_a_site_is_the_input_relevance_of_the_model_after_it():
    """take_lm's hidden layer h = [now, before] W + b: the relevance recorded at h is the input
    relevance of the rest of the model, act(h) @ tableᵀ, fed h, after h's own ε: R ⊙ h / stab(h)."""
    fun, params = take_lm(relu=False)
    (ids,), _ = _inputs("take")
    logits = fun(params, ids)
    target = targets.contrastive(logits, 3, 5, position=2)
    explain = jax.jit(lfp_jax.lrp(fun, argnums=1, record=Match(kind="linear", path="w")))
    _, per_token, recorded = explain(params, ids, target=target)
    (first,) = recorded                     # the hidden layer (the head, tied, is named "table")
    assert first.split()[1:] == ["linear", "w"], first
    h = jnp.concatenate([params["table"][ids], params["table"][jnp.roll(ids, 1, -1)]], -1) @ params["w"] \
        + params["b"]
    _, want = lfp_jax.lrp(lambda p, h: jax.nn.gelu(h) @ p["table"].T, argnums=1)(params, h, target=target)
    np.testing.assert_allclose(recorded[first], want * h / (h + 1e-6 * jnp.where(h >= 0, 1, -1)),
                               rtol=1e-10, atol=1e-13)
    by_lookup = jax.jit(lfp_jax.lrp(fun, argnums=1, record=Match(kind="embedding")))
    lookups = by_lookup(params, ids, target=target)[2]
    first_lookup = lookups[sorted(lookups)[0]]
    assert first_lookup.shape == (*ids.shape, D)


def test_a_block_by_block_trace_under_jit_and_vmap():
    fun, params = linen_lm()
    (ids,), labels = _inputs("linen")
    explain = lfp_jax.lrp(fun, argnums=1, record=Match(kind="sum"))
    _, per_token, trace = jax.jit(explain)(params, ids, target=labels)
    assert list(trace) == sorted(trace) and len(trace) >= 2   # residual adds, in the order of the model
    assert all(v.shape == (*ids.shape, D) for v in trace.values())
    per_example = jax.jit(jax.vmap(lambda i, y: explain(params, i[None], target=y[None])[2]))(ids, labels)
    for key in trace:
        np.testing.assert_allclose(per_example[key][:, 0], trace[key], rtol=1e-10, atol=1e-13)
    with pytest.raises(errors.LFPError, match="picks no site"):
        lfp_jax.lrp(fun, argnums=1, record=Match(kind="spiking"))(params, ids, target=labels)


# -- targets for language models -------------------------------------------------------------------------


def test_targets_are_the_explained_logits_and_lrp_is_linear_in_them():
    fun, params = linen_lm()
    (ids,), _ = _inputs("linen")
    logits = fun(params, ids)
    a, b = targets.token(logits, 4, position=3), targets.token(logits, 7, position=3)
    np.testing.assert_array_equal(np.nonzero(np.asarray(a))[1:], [[3] * 3, [4] * 3])
    np.testing.assert_allclose(a[:, 3, 4], logits[:, 3, 4])
    contrast = targets.contrastive(logits, 4, 7, position=3)
    np.testing.assert_allclose(contrast, a - b)
    explain = jax.jit(lfp_jax.lrp(fun, argnums=1))
    r = {name: explain(params, ids, target=t)[1] for name, t in (("a", a), ("b", b), ("c", contrast))}
    np.testing.assert_allclose(r["c"], r["a"] - r["b"], rtol=1e-9, atol=1e-12)
    nxt = jnp.roll(ids, -1, -1)
    mask = jnp.arange(T) >= T - 3   # the last three predictions: a span
    whole = explain(params, ids, target=targets.span(logits, nxt, jnp.broadcast_to(mask, ids.shape)))[1]
    parts = sum(explain(params, ids, target=targets.token(logits, nxt[:, t], position=t))[1]
                for t in range(T - 3, T))
    np.testing.assert_allclose(whole, parts, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="shape of the logits without the vocabulary"):
        targets.span(logits, nxt[:, :2])


# -- zero parameters where people train -------------------------------------------------------------------


def test_gemma_norms_move_and_raise_no_warning_while_zero_biases_are_reported_under_jit_and_vmap():
    fun, params = nnx_lm()
    (ids,), labels = _inputs("nnx")
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # 1 + scale with scale = 0: nothing is frozen
        _, fb = jax.block_until_ready(jax.jit(g)(params, ids, labels))   # the compiled step has run
    assert np.all(jax.tree.leaves(fb["norm1"]["scale"])[0] != 0)
    eqx_fun, eqx_params = eqx_bert()
    inputs, eqx_labels = _inputs("eqx")
    h = lfp_jax.lfp_value_and_feedback(eqx_fun, rewards.softmax_loss, reward_argnums=(3,))
    lfp_jax._frozen._warned.clear()
    per_example = jax.vmap(lambda p, i, t, y: h(p, i[None], t[None], y[None])[1], in_axes=(None, 0, 0, 0))
    expected = r"(?s)norm\.bias.*offsets start at 0.*compiled step"
    with pytest.warns(errors.FrozenParameterWarning, match=expected):
        # the parameters are traced here; the warning comes when the step runs
        jax.block_until_ready(jax.jit(per_example)(eqx_params, *inputs, eqx_labels))


# -- errors people hit first ------------------------------------------------------------------------------


def test_forgetting_reward_argnums_names_the_keyword():
    fun, params = take_lm()
    (ids,), labels = _inputs("take")
    g = lfp_jax.lfp_value_and_grad(fun, rewards.softmax_loss)
    with pytest.raises(TypeError, match=r"fun takes 2 positional arguments but was given 3 .* "
                                        r"reward_argnums=\(2,\)"):
        g(params, ids, labels)


def test_ids_looked_up_inside_a_scan_train_but_are_not_explained():
    """A lookup inside a scan body is an embedding site there (the table trains); the relevance of each
    token cannot leave the loop, so lrp says so instead of returning zeros."""
    fun0, params = take_lm()

    def fun(p, ids):
        def body(carry, i):
            return carry + jnp.take(p["table"], i, axis=0), None

        h, _ = jax.lax.scan(body, jnp.zeros((ids.shape[0], D), jnp.float64), ids.T)
        return jax.nn.relu(h) @ p["table"].T

    (ids,), labels = _inputs("take")
    g = lfp_jax.lfp_value_and_feedback(fun, rewards.softmax_loss, reward_argnums=(2,))
    fb = jax.jit(g)(params, ids, labels[:, 0])[1]
    assert np.any(fb["table"] != 0)
    assert_theorem1(fun, params, ids, labels=labels[:, 0], rtol=1e-8)
    with pytest.raises(errors.LFPError, match="looked up inside a scan"):
        lfp_jax.lrp(fun, argnums=1)(params, ids, target=labels[:, 0])


# -- corner cases of ids and parameters -------------------------------------------------------------------


def test_a_lookup_by_ids_and_a_constant_column_gives_the_ids_all_of_it():
    """``E2[ids, seg]`` with ``seg`` a constant argument: the index vector has two components, and only
    the ids' is a token; against the model fed the looked-up rows."""
    k = jax.random.split(jax.random.key(21), 2)
    p = {"E2": jax.random.normal(k[0], (V, 2, D), jnp.float64),
         "w": jax.random.normal(k[1], (D, 3), jnp.float64)}
    ids = jnp.array([[1, 5, 2], [7, 7, 0]], jnp.int32)
    seg = jnp.array([[0, 1, 1], [1, 0, 0]], jnp.int32)
    target = jnp.array([0, 2])
    _, per_token = jax.jit(lfp_jax.lrp(lambda p, ids, seg: (p["E2"][ids, seg] @ p["w"]).sum(1), argnums=1))(
        p, ids, seg, target=target)
    _, r_e = lfp_jax.lrp(lambda p, e: (e @ p["w"]).sum(1), argnums=1)(p, p["E2"][ids, seg], target=target)
    np.testing.assert_allclose(per_token, r_e.sum(-1), rtol=1e-10, atol=1e-13)


def test_ids_that_only_mask_inside_a_scan_are_still_explained():
    """Scanned layers with a padding mask from the ids in the body: the lookup is outside the loop, so
    each token's relevance comes back (against the model fed the embeddings)."""
    k = jax.random.split(jax.random.key(22), 3)
    p = {"E": jax.random.normal(k[0], (V, D), jnp.float64),
         "Ws": jax.random.normal(k[1], (2, D, D), jnp.float64) / np.sqrt(D),
         "out": jax.random.normal(k[2], (D, 4), jnp.float64)}
    ids = jnp.array([[0, 3, 5, 2], [4, 4, 1, 9]], jnp.int32)

    def body(p, e, ids):
        mask = (ids != 0).astype(e.dtype)[..., None]

        def layer(h, w):
            return jax.nn.relu(h @ w) * mask + h, None

        h, _ = jax.lax.scan(layer, e, p["Ws"])
        return h.sum(1) @ p["out"]

    target = jnp.array([1, 3])
    explain = jax.jit(lfp_jax.lrp(lambda p, ids: body(p, p["E"][ids], ids), argnums=1))
    _, per_token = explain(p, ids, target=target)
    _, r_e = lfp_jax.lrp(lambda p, e: body(p, e, ids), argnums=1)(p, p["E"][ids], target=target)
    np.testing.assert_allclose(per_token, r_e.sum(-1), rtol=1e-10, atol=1e-13)


def test_the_relevance_of_tokens_of_a_bfloat16_table_is_summed_in_float32():
    table = (jax.random.normal(jax.random.key(23), (V, 256)) * 0.1).astype(jnp.bfloat16)
    ids = jnp.arange(6, dtype=jnp.int32).reshape(1, 6)
    explain = lfp_jax.lrp(lambda t, ids: t[ids].sum(-1), argnums=1)
    _, per_token = explain(table, ids, target=jnp.ones((1, 6), jnp.bfloat16))
    assert per_token.dtype == jnp.float32


def test_an_embedding_site_conserves_in_the_conservation_report():
    fun, params = take_lm(relu=True)
    (ids,), labels = _inputs("take")
    report = lfp_jax.conservation(fun, params, ids, target=labels)
    rows = [r for r in report.sites if r.kind == "embedding"]
    assert len(rows) == 2 and all(r.relative_gap == 0 for r in rows)
    assert abs(report.input_relevance) > 0


def test_lrp_of_a_table_closed_over_says_to_pass_it_as_an_argument():
    table = jnp.ones((V, D))
    with pytest.raises(errors.LFPError, match="passed to fun as an argument"):
        lfp_jax.lrp(lambda ids: table[ids].sum(-1), argnums=0)(jnp.ones((2, 3), jnp.int32),
                                                               target=jnp.ones((2, 3)))


def test_a_table_that_is_a_product_of_two_parameters_is_looked_up_and_each_factor_is_a_weight():
    """A factorised table (A @ B)[ids]: the lookup is an embedding site, and A and B are each weights
    used as they are, so Theorem 1 holds for both."""
    k = jax.random.split(jax.random.key(24), 3)
    params = {"a": jax.random.normal(k[0], (V, 3), jnp.float64),
              "b": jax.random.normal(k[1], (3, D), jnp.float64),
              "out": jax.random.normal(k[2], (D, 4), jnp.float64)}
    (ids,), labels = _inputs("take")

    def fun(p, ids):
        return jax.nn.relu((p["a"] @ p["b"])[ids]).mean(1) @ p["out"]

    assert [s.kind for s in lfp_jax.find_sites(fun, params, ids)][0] == "embedding"
    assert_theorem1(fun, params, ids, labels=labels[:, 0] % 4, rtol=1e-8)
