"""The README's main job and the results page run end to end (tiny settings)."""

import json

import pytest
from _data import write_idx_dataset

from experiments import demo, results, study


@pytest.mark.slow
def test_demo_compares_lfp_and_gradient_descent(tmp_path, capsys):
    table = demo.main(["--epochs", "2", "--out-dir", str(tmp_path), "--no-progress"])
    assert set(table["digits"]) == {"lfp", "gd"}
    assert table["digits"]["lfp"]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == table
    assert any("test accuracy after the last epoch" in line for line in out)
    png = tmp_path / "curves.png"
    assert f"test-accuracy curves: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_study_and_the_results_page(tmp_path):
    root = write_idx_dataset(tmp_path)  # MNIST-format files, whether or not MNIST is installed
    study.main(["rewards", "--quick", "--seeds", "1", "--quiet", "--out-dir", str(tmp_path / "runs"),
                "--results", str(tmp_path / "results"), "--set", f"data.root={root}"])
    page = results.render(str(tmp_path / "results"))
    assert "## Non-differentiable rewards" in page and "misclassification" in page
    assert (tmp_path / "results" / "rewards" / "rewards.png").exists()
