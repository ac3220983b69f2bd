"""The zoo's transformers (experiments/transformers.py): what the models compute, and that LFP moves
every parameter of them and lowers a language model's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lfp_jax
from experiments import models

VOCAB, T = 11, 6


def _gpt():
    model = models.build("gpt", VOCAB, context=T, width=16, depth=1, heads=2, mlp_ratio=2)
    tokens = jax.random.randint(jax.random.key(0), (2, T), 0, VOCAB)
    x = jax.nn.one_hot(tokens, VOCAB)
    return model, model.init(jax.random.key(1), x)["params"], x, tokens


def test_the_decoder_is_causal_in_its_jacobian_and_in_its_relevance():
    model, params, x, tokens = _gpt()
    fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    jac = jax.jit(jax.jacobian(lambda x: fun(params, x)[0]))(x)  # (T, V, batch, T, V)
    per_position = np.abs(np.asarray(jac)).sum(axis=(1, 2, 4))  # output position x input position
    assert np.all(per_position[np.triu_indices(T, 1)] == 0)  # no output sees a later token
    assert np.all(np.diag(per_position) > 0)
    # the relevance of the logit of the next character at position 2 lies on tokens 0..2 only
    target = jnp.zeros((2, T, VOCAB)).at[:, 2, 5].set(1.0) * fun(params, x)
    _, rel = jax.jit(lambda p, x, t: lfp_jax.lrp(fun)(p, x, target=t))(params, x, target)
    per_token = np.abs(np.asarray(rel)).sum(-1)
    assert np.all(per_token[:, 3:] == 0) and np.all(per_token[:, :3].sum(-1) > 0)


@pytest.mark.parametrize("pool", ["cls", pytest.param("mean", marks=pytest.mark.slow)])
def test_vit_tokens_and_pooling(pool):
    model = models.build("vit", 10, patch=7, width=16, depth=1, heads=2, pool=pool)
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    params = model.init(jax.random.key(1), x)["params"]
    assert params["position"].shape == (1, 16 + (pool == "cls"), 16)  # 4x4 patches (+ class token)
    assert model.apply({"params": params}, x).shape == (3, 10)
    # an image's logits depend on that image only (attention is within the sequence)
    jac = jax.jit(jax.jacobian(lambda x: model.apply({"params": params}, x)[0]))(x)
    assert np.all(np.asarray(jac)[:, 1:] == 0) and np.abs(np.asarray(jac)[:, 0]).sum() > 0


def test_model_errors_say_what_to_change():
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        v = models.build("vit", 10, pool="max")
        v.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        v = models.build("vit", 10, width=16, heads=3)
        v.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    model, params, x, _ = _gpt()
    with pytest.raises(ValueError, match=r"T <= 6"):
        model.apply({"params": params}, jnp.ones((1, T + 1, VOCAB)))


@pytest.mark.slow
def test_lfp_moves_every_transformer_parameter():
    """Under the default composite every ViT parameter that does not start at zero gets feedback:
    each softmax, product and normalisation has a rule that hands reward on to the layers before
    it. (LayerNorm offsets start at 0, and feedback is proportional to |θ|: frozen, as in the
    reference, and reported by a FrozenParameterWarning.)"""
    vit = models.build("vit", 10, patch=7, width=16, depth=1, heads=2)
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    y = jnp.arange(4) % 10
    p = vit.init(jax.random.key(1), x)["params"]
    step = lfp_jax.lfp_value_and_grad(lambda p, x: vit.apply({"params": p}, x),
                                      lfp_jax.rewards.softmax_loss, reward_argnums=(2,))
    with pytest.warns(lfp_jax.errors.FrozenParameterWarning, match="LayerNorm_0.*bias"):
        _, fb = step(p, x, y)  # eager: the check looks at the values
    moved = {jax.tree_util.keystr(k): float(jnp.abs(leaf).sum()) > 0
             for k, leaf in jax.tree_util.tree_leaves_with_path(fb)}
    frozen = {k for k, m in moved.items() if not m}
    block = "['EncoderBlock_0']"
    assert frozen == {f"{block}['LayerNorm_0']['bias']", f"{block}['LayerNorm_1']['bias']",
                      "['LayerNorm_0']['bias']"}, frozen
    assert len(moved) == 24


@pytest.mark.slow
def test_lfp_lowers_the_loss_of_a_small_language_model():
    model, params, x, tokens = _gpt()
    targets = jnp.roll(tokens, -1, axis=1)
    fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    opt = optax.adam(1e-2)
    feedback = lfp_jax.lfp_value_and_grad(fun, lfp_jax.rewards.softmax_loss, reward_argnums=(2,))

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(fun(p, x), targets).mean()

    @jax.jit
    def step(p, s):
        _, g = feedback(p, x, targets)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    before, state = float(loss(params)), opt.init(params)
    for _ in range(30):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * before  # memorising 12 next characters
