"""Transfer-learning plumbing of the trainer: class subsets (``data.classes``), the initial scale
(``init.scale``) and a pretrained start (``init.from`` with ``init.reset``), checked against the model's
own initialisation and the pretraining run's checkpoint file."""

import os

import jax
import numpy as np
import pytest

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, train

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DIGITS = os.path.join(CONFIG_DIR, "digits_mlp_lfp.yaml")


def _cfg(tmp_path, *extra):
    return config_lib.load(DIGITS, [f"out_dir={tmp_path}", "epochs=1", "batch_size=16", "data.subset=64",
                                    "eval_batch_size=32", *extra])


def test_select_classes_keeps_and_relabels_in_the_given_order():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.array([0, 1, 2, 3, 2, 1], np.int32)
    d = data_lib.Dataset("toy", x, y, x[:3], y[:3], 4).select_classes([2, 1])
    assert d.num_classes == 2
    np.testing.assert_array_equal(d.y_train, [1, 0, 0, 1])     # 1 → 1, 2 → 0 (the order given)
    np.testing.assert_array_equal(d.x_train, x[[1, 2, 4, 5]])
    np.testing.assert_array_equal(d.y_test, [1, 0])
    with pytest.raises(ValueError, match=r"\[7\] are not classes of 'toy' \(0 … 3\)"):
        data_lib.Dataset("toy", x, y, x, y, 4).select_classes([1, 7])


def test_classes_config_is_checked():
    for bad, msg in (([1, 1], "lists an integer twice"), ([], "non-empty list"), ([True], "list of integers"),
                     ([-1], "integers ≥ 0")):
        with pytest.raises(config_lib.ConfigError, match=msg):
            config_lib.load(DIGITS, [f"data.classes={bad}"])


def test_trainer_sees_only_the_selected_classes(tmp_path):
    t = train.Trainer(_cfg(tmp_path, "data.classes=[5, 6, 7, 8, 9]", "data.subset=null"))
    full = data_lib.load("digits")
    assert t.data.num_classes == 5 and set(np.unique(t.data.y_train)) == {0, 1, 2, 3, 4}
    assert len(t.data.y_train) == int(np.isin(full.y_train, [5, 6, 7, 8, 9]).sum())
    assert t.params["Dense_2"]["kernel"].shape[-1] == 5            # the classifier has 5 outputs


def test_init_scale_multiplies_the_models_own_initialisation(tmp_path):
    t = train.Trainer(_cfg(tmp_path, "init.scale=0.25"))
    model = models.build("mlp", 10, hidden=(120, 84))
    x = t.data.x_train[:2]
    fresh = model.init(jax.random.key(0), x, train=False)["params"]
    got = jax.tree.leaves(t.params)
    want = [0.25 * np.asarray(v) for v in jax.tree.leaves(fresh)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)


def test_fine_tuning_starts_from_the_pretrained_checkpoint_with_a_fresh_head(tmp_path):
    pre = train.train(_cfg(tmp_path / "pre", "data.classes=[0, 1, 2, 3, 4]", "data.subset=null", "method=gd"),
                      progress=False)
    saved = train.read_checkpoint(os.path.join(pre["run_dir"], train.CHECKPOINT))["params"]
    fine = _cfg(tmp_path / "fine", "data.classes=[5, 6, 7, 8, 9]", "data.subset=null",
                f"init.from={pre['run_dir']}", "init.reset=[Dense_2]")
    t = train.Trainer(fine)
    fresh = train.Trainer(_cfg(tmp_path / "fresh", "data.classes=[5, 6, 7, 8, 9]", "data.subset=null"))
    for layer in ("Dense_0", "Dense_1"):        # the pretrained body, from the file
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(t.params[layer][leaf]), saved[layer][leaf])
    for leaf in ("kernel", "bias"):             # the head: this run's own initialisation
        np.testing.assert_array_equal(np.asarray(t.params["Dense_2"][leaf]),
                                      np.asarray(fresh.params["Dense_2"][leaf]))
        assert not np.array_equal(np.asarray(t.params["Dense_2"][leaf]), saved["Dense_2"][leaf])
    summary = train.train(fine, progress=False)     # and it trains from there
    assert summary["test_accuracy"] > 0.2           # 5 classes: chance is 0.2


def test_pretrained_start_errors_say_what_to_change(tmp_path):
    pre = train.train(_cfg(tmp_path / "pre", "data.classes=[0, 1, 2, 3, 4]"), progress=False)
    ten = _cfg(tmp_path / "x", f"init.from={pre['run_dir']}")      # 10 classes against a 5-class head
    with pytest.raises(train.CheckpointError, match=r"Dense_2/kernel.*belongs in init.reset"):
        train.Trainer(ten)
    with pytest.raises(config_lib.ConfigError, match=r"\['Head'\] are not parameters.*Dense_2"):
        train.Trainer(_cfg(tmp_path / "x", f"init.from={pre['run_dir']}", "init.reset=[Head]"))
    with pytest.raises(config_lib.ConfigError, match="set init.from too"):
        train.Trainer(_cfg(tmp_path / "x", "init.reset=[Dense_2]"))
    with pytest.raises(train.CheckpointError, match=r"init.from: no run folder .* train the run to"):
        train.Trainer(_cfg(tmp_path / "x", f"init.from={tmp_path / 'nowhere'}"))


def test_train_examples_keeps_the_whole_test_set(tmp_path):
    full = train.Trainer(_cfg(tmp_path, "data.subset=null"))
    few = train.Trainer(_cfg(tmp_path, "data.subset=null", "data.train_examples=100"))
    assert len(few.data.x_train) == 100 and len(few.data.x_test) == len(full.data.x_test)
    np.testing.assert_array_equal(few.data.x_train, full.data.x_train[:100])


def test_a_fine_tuning_run_resumes_from_its_own_checkpoint_without_the_source(tmp_path):
    import shutil

    pre = train.train(_cfg(tmp_path / "pre", "data.classes=[0, 1, 2, 3, 4]", "method=gd"), progress=False)
    cfg = _cfg(tmp_path / "fine", "data.classes=[5, 6, 7, 8, 9]", f"init.from={pre['run_dir']}",
               "init.reset=[Dense_2]", "epochs=2")
    full = train.train(cfg, progress=False)
    train.train({**cfg, "epochs": 1, "out_dir": str(tmp_path / "half")}, progress=False)
    shutil.rmtree(pre["run_dir"])      # the run it started from is gone: resume needs only its own
    half = {**cfg, "out_dir": str(tmp_path / "half")}
    with pytest.warns(train.ResumeWarning, match="epochs: 1 → 2"):
        resumed = train.train(half, resume=True, allow_config_change=True, progress=False)
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])


def test_runs_written_before_a_key_existed_resume_with_its_default(tmp_path):
    import yaml

    cfg = _cfg(tmp_path, "epochs=1")
    run = train.train(cfg, progress=False)
    path = os.path.join(run["run_dir"], "config.yaml")
    with open(path) as f:
        stored = yaml.safe_load(f)
    for key in ("init", "products"):                 # as an older trainer wrote it
        stored.pop(key)
    stored["data"].pop("classes")
    with open(path, "w") as f:
        yaml.safe_dump(stored, f)
    assert train.train(cfg, resume=True, progress=False)["epochs"] == 1     # no ConfigChangedError
    with pytest.raises(train.ConfigChangedError, match=r"init.scale: 1.0 → 2"):
        train.train({**cfg, "init": {**cfg["init"], "scale": 2}}, resume=True, progress=False)
