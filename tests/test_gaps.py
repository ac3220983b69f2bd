"""The gap study's settings: every one is a valid config, and a setting equal to one already met is
trained once, under the first name."""

import argparse

import pytest

from experiments import config as config_lib
from experiments import gaps, study


def _runner(tmp_path):
    args = argparse.Namespace(set=[], quick=False, out_dir=str(tmp_path), force=False, quiet=True, seeds=1,
                              results=str(tmp_path / "results"), tasks="swirls")
    return study.Runner(args)


@pytest.mark.parametrize("task", sorted(gaps.TASKS))
def test_every_setting_is_a_valid_config(task, tmp_path):
    runner = _runner(tmp_path)
    stem, base, _ = gaps.TASKS[task]
    for values in gaps.factors(task).values():
        for _label, lfp, gd in values:
            for method, over in (("lfp", lfp), ("gd", gd)):
                if over is not None:   # validated by the config schema (unknown keys, ranges)
                    merged = {**config_lib.merge(base[method], over), "name": "x"}
                    assert runner.cfg(f"{stem}_{method}.yaml", merged)["method"] == method


def test_identical_settings_share_one_run_name(tmp_path):
    runner = _runner(tmp_path)
    file = "toy_mlp_lfp.yaml"
    base = {"data": {"name": "swirls"}, "optimizer": {"lr": 3e-3}}
    first = gaps._run_name(runner, file, base, "base")
    # the base's own initial scale, given explicitly: the same config, so the same run
    assert gaps._run_name(runner, file, config_lib.merge(base, {"init": {"scale": 1}}), "scale_1") == first
    # another value: a run of its own
    other = config_lib.merge(base, {"init": {"scale": 2}})
    assert gaps._run_name(runner, file, other, "scale_2") == "scale_2"


def test_the_gradient_control_gives_magnitude_times_gradient_on_the_character_decoder():
    """``composite: gradient_control`` (the study's control: every rule the gradient in normalised form)
    on the SiLU-gated RMSNorm decoder of ``gpt_text``: feedback ``-|θ| ⊙ ∇_θ Σ CE`` (jax.grad), which
    AttnLRP's rules and the identity rule at SiLU do not give."""
    import jax
    import jax.numpy as jnp
    from _helpers import assert_theorem1, to64

    from experiments import config as config_lib
    from experiments import models
    from experiments.train import composite_of

    model = models.build("gpt", 11, context=6, width=8, depth=1, heads=2)
    tokens = jax.random.randint(jax.random.key(0), (3, 6), 0, 11)
    x = jax.nn.one_hot(tokens, 11, dtype=jnp.float64)
    y = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    params = to64(model.init(jax.random.key(2), x)["params"])
    fun = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    cfg = config_lib.load(None, ["composite=gradient_control", "epsilon=1e-12"])
    key_bias = "['DecoderBlock_0']['SelfAttention_0']['key']['bias']"   # a shift of every score: gradient 0
    assert_theorem1(fun, params, x, labels=y, composite=composite_of(cfg), rtol=1e-6,
                    zero_gradient=(key_bias,))
    default = composite_of(config_lib.load(None, ["epsilon=1e-12"]))
    with pytest.raises(AssertionError, match="relative error"):   # the default rules are not the gradient
        assert_theorem1(fun, params, x, labels=y, composite=default, rtol=1e-6, zero_gradient=(key_bias,))
