"""Language models from third-party libraries, imported as published (tests/_library_models.py), each in
a process of its own (tests/_library_child.py): token ids in, reward entering at the embedding lookup,
a few LFP steps under jit lowering the next-token loss, the relevance of each token equal to what the
lookup's output carries and to a loop over the sequences. Needs the ``models`` extra
(``pip install -e ".[models]"``); a library that is not installed is skipped with the reason."""

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _library_models import LIBRARY

HERE = pathlib.Path(__file__).parent

EXPECTED = {  # the embedding site's module, the library file holding the lookup, a tied head
    "hf_gpt2": ("transformer/wte", "transformers/models/gpt2/modeling_flax_gpt2.py", True),
    "hf_llama": ("model/embed_tokens", "transformers/models/llama/modeling_flax_llama.py", False),
    "hf_bert": ("bert/embeddings/word_embeddings", "transformers/models/bert/modeling_flax_bert.py", True),
    "penzai_llama": ("transformer/embedder", "penzai/nn/embeddings.py", False),
    "penzai_gemma_stacked": ("transformer/embedder", "penzai/nn/embeddings.py", True),
    "gm_gemma3": ("Transformer/embedder", "gemma/gm/nn/_modules.py", True),
}


@functools.cache
def _run(name: str) -> dict:
    library = LIBRARY[name]
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed (pip install -e '.[models]')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
    done = subprocess.run([sys.executable, str(HERE / "_library_child.py"), name], capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_library_language_model_trains_with_lfp_and_explains_each_token(name):
    found = _run(name)
    path, source, tied = EXPECTED[name]
    assert "embedding" in found["kinds"] and len(found["embedding_paths"]) == 1
    assert found["embedding_paths"][0].endswith(path)
    assert found["embedding_sources"][0].startswith(source)   # the library's own line
    assert found["tied"] == tied
    losses = found["losses"]
    assert losses[-1] < losses[0] - 0.1 and np.all(np.isfinite(losses)), losses
    per_token = np.asarray(found["per_token"])
    assert found["per_token_shape"] == [2, 8] and np.all(np.isfinite(per_token)) and np.any(per_token != 0)
    # the tokens' relevance is what the lookup's output carries, summed over the features
    np.testing.assert_allclose(found["per_token_sum"], found["recorded_sum"], rtol=1e-4)
    assert found["loop_error"] <= 1e-4 * np.max(np.abs(per_token))


@pytest.mark.slow
def test_gemma_norms_move_from_their_own_initialisation():
    """gm's RMSNorms compute x · (1 + scale) with scale = 0: the effective weight is 1, so the scales
    move under LFP with no change to the model, and nothing is reported frozen."""
    found = _run("gm_gemma3")
    scales = {k: v for k, v in found["zero_leaves_moved"].items() if k.endswith("['scale']")}
    assert len(scales) == 13 and all(scales.values()), scales
    assert found["frozen_warnings"] == []


@pytest.mark.slow
def test_gpt2_zero_biases_are_reported_from_the_compiled_step_with_advice_true_for_them():
    found = _run("hf_gpt2")
    (message,) = found["frozen_warnings"]
    assert "['attn']['c_attn']['bias']" in message and "keep_kernels=True draws only the biases" in message
    assert "['ln_f']['bias']" in message and "offsets start at 0" in message
    assert "found inside a compiled step" in message


@pytest.mark.slow
def test_the_pages_that_train_library_models_run_as_written():
    """The README's and the transformers page's blocks marked ``requires: transformers`` (skipped where
    the models extra is missing) run here with every one of them required."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[models]')")
    from _doc_runner import ROOT, subprocess_env

    pages = [ROOT / "README.md", ROOT / "docs" / "transformers.md"]
    done = subprocess.run([sys.executable, str(HERE / "_doc_runner.py"), *map(str, pages)],
                          capture_output=True, text=True, env=subprocess_env(LFP_DOCS_REQUIRE="1"),
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "skipped (needs" not in done.stderr
