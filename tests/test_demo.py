"""The README's main job runs end to end (one short epoch per method) and learns something."""

from experiments import demo


def test_demo_trains_both_methods(capsys):
    demo.main(["--epochs", "2"])
    out = capsys.readouterr().out
    assert "lfp: test accuracy" in out and "gd: test accuracy" in out
    results = demo.train("lfp", epochs=2, seed=0, lr=0.01)
    assert results["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
