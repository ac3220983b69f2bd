"""experiments.explain on a tiny untrained LeNet: relevance of each preset, the grid PNG, the report."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("matplotlib")

import matplotlib.image  # noqa: E402

from experiments import explain, models  # noqa: E402
from lfp_jax import plot  # noqa: E402


def test_pick_samples_takes_one_class_after_the_other():
    labels = np.array([3, 1, 1, 0, 3, 0, 2])
    np.testing.assert_array_equal(explain.pick_samples(labels, 6), [3, 1, 6, 0, 5, 2])
    np.testing.assert_array_equal(explain.pick_samples(labels, 100), [3, 1, 6, 0, 5, 2, 4])


def _torch_like_params(model, x, rng):
    """``U(±1/√fan_in)`` parameters of the shapes ``model.init`` gives, drawn by NumPy (no compilation of
    JAX's random initialisers: seconds saved)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
    params = {}
    for layer, leaves in shapes.items():
        bound = 1 / np.sqrt(np.prod(leaves["kernel"].shape[:-1]))
        params[layer] = {k: rng.uniform(-bound, bound, v.shape).astype(np.float32) for k, v in leaves.items()}
    return params


@pytest.mark.slow
def test_heatmaps_of_an_untrained_lenet(tmp_path):
    """The pipeline of ``python -m experiments.explain`` minus the training: relevance of every preset
    this lfp_jax has for 2 images, the grid PNG and the report."""
    model = models.build("lenet", 10)
    rng = np.random.default_rng(0)
    x = np.where(rng.uniform(size=(2, 28, 28, 1)) < 0.7, -1.0, 1.0).astype(np.float32)  # MNIST range
    params = _torch_like_params(model, x, rng)
    fun = lambda p, v: model.apply({"params": p}, v, train=False)
    presets = explain.available_presets()
    assert "attn_lrp" in presets
    relevance, report = explain.relevance_by_preset(fun, params, x, np.array([3, 7]), presets)
    logits = np.asarray(fun(params, x), np.float64)
    for name in presets:
        assert relevance[name].shape == x.shape and np.all(np.isfinite(relevance[name]))
        np.testing.assert_allclose(report[name]["relevance_sum"], relevance[name].sum(axis=(1, 2, 3)))
        np.testing.assert_allclose(report[name]["target_logit"], logits[[0, 1], [3, 7]], rtol=1e-5)
    # attn_lrp is the ε rule everywhere with ε = 1e-6 (biases absorb the rest): finite, non-zero.
    assert all(abs(v) > 0 for v in report["attn_lrp"]["relevance_sum"])
    path = tmp_path / "heatmaps.png"
    plot.grid(x, relevance, path, titles=["label 3", "label 7"], title="untrained LeNet", dpi=40)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 50
    assert json.loads(json.dumps(report)) == report  # what results.json holds


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        explain.main(["--presets", "no_such_preset", "--out", str(tmp_path)])


@pytest.mark.slow
def test_language_model_explanations_and_token_deletion(tmp_path):
    """``python -m experiments.explain`` with the decoder's config on a tiny corpus: the token heatmaps,
    and the faithfulness study's token-deletion evaluation of that model (float32, as the command runs)."""
    with jax.enable_x64(False):
        _language_model_explanations_and_token_deletion(tmp_path)


def _language_model_explanations_and_token_deletion(tmp_path):
    from experiments import config as config_lib
    from experiments import faithfulness

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat.", "%\n"], 2500)))
    overrides = [f"data.root={corpus}", "data.options.context=16", "model.context=16", "model.width=32",
                 "model.depth=1", "model.heads=2", f"out_dir={tmp_path / 'runs'}", "data.subset=256"]
    args = ["--config", "configs/gpt_text_gd.yaml", "--epochs", "1", "--samples", "2",
            "--out", str(tmp_path / "out"), "--no-progress"]
    result = explain.main(args + [a for o in overrides for a in ("--set", o)])
    html = (tmp_path / "out" / "tokens.html").read_text()
    assert html.count("→") == 2 and html.count("<span title=") == 2 * 16      # 2 windows of 16 characters
    png = matplotlib.image.imread(result["presets"]["attn_lrp"]["png"])
    assert png.ndim == 3 and png.shape[1] > 500
    assert all(np.isfinite(result["presets"]["attn_lrp"]["relevance_sum"]))

    cfg = config_lib.load("configs/gpt_text_gd.yaml", overrides + ["epochs=1"])
    trainer, _ = explain.trained_model(cfg, 1, progress=False)
    res = faithfulness.evaluate(trainer, ["attn_lrp"], "tokens", 4, jax.random.key(0))
    assert list(res) == ["random", "gradient", "gradient_x_input", "epsilon", "attn_lrp"]
    first = {name: r["morf"][0] for name, r in res.items()}
    last = {name: r["morf"][-1] for name, r in res.items()}
    # every attribution starts from the unperturbed score and ends with every character deleted
    assert np.ptp(list(first.values())) < 1e-5 and np.ptp(list(last.values())) < 1e-5
    assert all(len(r["morf"]) == 17 and r["fractions"][-1] == 1.0 for r in res.values())
    attributions = {k: {**{m: v[m] for m in ("area_between", "auc_morf", "auc_lerf")},
                        "area_between_std": 0.0, "auc_morf_std": 0.0, "seeds": 1, "curves_seed0": v}
                    for k, v in res.items()}
    results = {"examples": 4, "models": {"gpt_text_gd": {"epochs": 1, "perturbation": "tokens",
                                                         "attributions": attributions}}}
    faithfulness.plot_curves(results, tmp_path / "curves.png")
    assert matplotlib.image.imread(tmp_path / "curves.png").shape[1] > 300
