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


def test_final_weights_counts_the_entries_that_end_near_zero(tmp_path, monkeypatch):
    """The weight diagnosis on a swirls run whose final parameters are its initial ones with the first
    layer's kernel set to 0 and its bias to 1e-4: hand-counted shares below 1e-3 per kind and overall,
    and the zeros in the histogram's lowest bin."""
    import json
    import os

    import jax
    import numpy as np

    from experiments import train as train_lib

    runner = _runner(tmp_path)
    monkeypatch.setitem(gaps.WEIGHT_RUNS, "swirls", ("swirls", (("LFP", "lfp", None, None),)))
    stem, base, _ = gaps.TASKS["swirls"]
    cfg = runner.cfg(f"{stem}_lfp.yaml", {**base["lfp"], "name": "gap_swirls_base_lfp"}, 0)
    folder = config_lib.run_dir(cfg)
    os.makedirs(folder)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"test_accuracy": 0.5}, f)
    open(os.path.join(folder, train_lib.CHECKPOINT), "wb").close()   # read by the patched reader below
    start = train_lib.Trainer(cfg).params
    first = sorted(start)[0]
    end = jax.tree_util.tree_map(np.asarray, start)
    end[first] = {"kernel": np.zeros_like(end[first]["kernel"]),
                  "bias": np.full_like(end[first]["bias"], 1e-4)}
    monkeypatch.setattr(train_lib, "read_checkpoint", lambda path: {"params": end})
    got = gaps.final_weights(runner, "swirls")["LFP"]
    kernels = sum(start[k]["kernel"].size for k in start)
    biases = sum(start[k]["bias"].size for k in start)
    small_start_biases = sum(int(np.sum(np.abs(start[k]["bias"]) < 1e-3)) for k in start if k != first)
    assert got["kernels"]["below_1e-3"] == pytest.approx(
        (end[first]["kernel"].size + sum(int(np.sum(np.abs(start[k]["kernel"]) < 1e-3))
                                         for k in start if k != first)) / kernels)
    expected_biases = (end[first]["bias"].size + small_start_biases) / biases
    assert got["biases"]["below_1e-3"] == pytest.approx(expected_biases)
    assert set(got) >= {"kernels", "biases", "all"} and "embeddings" not in got
    assert sum(got["hist_end"]) == kernels + biases == sum(got["hist_start"])
    assert got["hist_end"][0] >= end[first]["kernel"].size and got["n"] == 1 and got["metric"] == 0.5


def _cell(values, n=None):
    import numpy as np
    return {"n": n or len(values), "metric_mean": float(np.mean(values)), "metric_std": float(np.std(values)),
            "metric_values": list(values)}


def test_the_gap_section_states_only_what_its_numbers_hold():
    """RESULTS text from a hand-made results.json: the language model's best settings are compared on the
    seeds both cells have, a gap is called within 0.05 only when it is, the β₂ sentences follow the
    numbers' signs, and cells or weights that are missing leave their sentences out without an error."""
    from experiments import results

    gd = _cell([2.46, 2.47, 2.47])
    lm = {"metric": "test_bits_per_char",
          "base": {"lfp": _cell([2.65, 2.64, 2.65]), "gd": _cell([2.52, 2.52, 2.52])},
          "factors": {
              "Adam lr 3e-3 (3 epochs)": {
                  "AttnLRP (default)": {"lfp": _cell([2.59, 2.59, 2.59]), "gd": gd},
                  "gradient everywhere (control)": {"lfp": _cell([2.54, 2.53, 2.55])}},
              "Adam lr 3e-3, β₂ 0.95 (3 epochs)": {
                  "AttnLRP (default)": {"gd": _cell([2.50])},
                  "gradient at products": {"lfp": _cell([2.51, 2.50, 2.50])},
                  "gradient everywhere (control)": {"lfp": _cell([2.48])}}}}
    text = "\n".join(results._gaps_section("results", {"char_lm": lm}))
    # best LFP (2.503, n=3) against best GD (2.4667, n=3): +0.037, within 0.05
    assert "LFP with Adam lr 3e-3, β₂ 0.95, gradient at products ends at 2.503" in text
    assert "+0.037 bits per character at equal steps (within 0.05)" in text
    # control at 0.95 (seed 0: 2.48) against GD at 0.999 on seed 0 (2.46): +0.020
    assert ("At its best β₂ (0.95) the control ends +0.020 from gradient descent at its best β₂ (0.999)"
            in text)
    assert "no β₂ measured removes the cost" in text
    # the same β₂: control 2.48 below GD 2.50; GD at 0.95 costs +0.040 on seed 0
    assert "costs gradient descent itself +0.040" in text and "0.020 bits per character below" in text
    assert "keeps more of the control's weights off zero" not in text   # no weights measured
    # one more seed-0 run where the control is worse: the sentence turns, and a missing LFP base is tolerated
    lm["factors"]["Adam lr 3e-3, β₂ 0.95 (3 epochs)"]["gradient everywhere (control)"]["lfp"] = _cell([2.56])
    del lm["base"]["lfp"]
    text = "\n".join(results._gaps_section("results", {"char_lm": lm}))
    assert "0.060 bits per character above gradient descent" in text
    assert "The memory that suits gradient descent traps" not in text   # the control's best β₂ is GD's
    lenet = {"metric": "test_accuracy", "base": {"lfp": _cell([0.90]), "gd": _cell([0.89])}, "factors": {}}
    text = "\n".join(results._gaps_section("results", {"fashion_lenet": lenet}))
    assert "LFP ends 1.00 points ahead" in text
