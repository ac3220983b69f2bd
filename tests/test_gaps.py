"""The gap study's settings: every one is a valid config, and a setting equal to one already met is
trained once, under the first name."""

import argparse

import pytest

from experiments import gaps, study


def _runner(tmp_path):
    args = argparse.Namespace(set=[], quick=False, out_dir=str(tmp_path), force=False, quiet=True, seeds=1,
                              results=str(tmp_path / "results"), tasks="swirls")
    return study.Runner(args)


@pytest.mark.parametrize("task", sorted(gaps.TASKS))
def test_every_setting_is_a_valid_config(task, tmp_path):
    runner = _runner(tmp_path)
    stem, base, _, _ = gaps.TASKS[task]
    for values in gaps.factors(task).values():
        for _label, lfp, gd in values:
            for method, over in (("lfp", lfp), ("gd", gd)):
                if over is not None:   # validated by the config schema (unknown keys, ranges)
                    merged = {**gaps._merge(base[method], over), "name": "x"}
                    assert runner.cfg(f"{stem}_{method}.yaml", merged)["method"] == method


def test_identical_settings_share_one_run_name(tmp_path):
    runner = _runner(tmp_path)
    file = "toy_mlp_lfp.yaml"
    base = {"data": {"name": "swirls"}, "optimizer": {"lr": 3e-3}}
    first = gaps._run_name(runner, file, base, "base")
    # the base's own initial scale, given explicitly: the same config, so the same run
    assert gaps._run_name(runner, file, gaps._merge(base, {"init": {"scale": 1}}), "scale_1") == first
    # another value: a run of its own
    assert gaps._run_name(runner, file, gaps._merge(base, {"init": {"scale": 2}}), "scale_2") == "scale_2"
