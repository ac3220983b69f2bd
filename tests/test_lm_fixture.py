"""The feedback and token relevance of the benchmark's language models (Llama-, Gemma- and BERT-style,
token ids in) against the values saved before the engine's performance work
(``tools/lm_feedback_fixture.py``, float64): a change that makes LFP cheaper must not change what it
computes."""

import jax
import numpy as np
import pytest

from tools import lm_feedback_fixture as fixture

DATA = np.load(fixture.os.path.join(fixture.os.path.dirname(__file__), "data", "lm", "feedback.npz"))


@pytest.mark.parametrize("name", ["llama", "gemma", "bert"])
def test_feedback_and_relevance_are_those_saved_before(name):
    got = fixture.compute(name)
    saved = {k[len(name) + 1:]: DATA[k] for k in DATA.files if k.startswith(name + "/")}
    np.testing.assert_array_equal(got.pop("ids"), saved.pop("ids"))
    assert got.keys() == saved.keys()
    assert sum(np.any(v != 0) for k, v in saved.items() if k.startswith("feedback/")) >= 15
    # float64; absolute tolerance relative to the model's largest feedback (a key bias's feedback is a
    # cancellation, ~1e-8 of the rest, whose last digits follow the order of the sums)
    largest = max(np.abs(v).max() for k, v in saved.items() if k.startswith("feedback/"))
    for key, want in saved.items():
        scale = largest if key.startswith("feedback/") else np.abs(want).max()
        np.testing.assert_allclose(got[key], want, rtol=1e-9, atol=1e-12 * scale, err_msg=f"{name} {key}")
    assert jax.config.jax_enable_x64
