"""The README's and the documentation's code blocks run as written (``tests/_doc_runner.py``).

Each page runs in a fresh interpreter (JAX defaults: float32, no x64; the page's own ``XLA_FLAGS``),
its Python blocks in page order in one namespace, printed results compared with the page's output
blocks; shell blocks are checked for modules, scripts and configs that do not exist.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _doc_runner import ROOT, blocks

PAGES = sorted([ROOT / "README.md", *(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)])
RUNNER = Path(__file__).with_name("_doc_runner.py")


def run_pages(*pages: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    # compile time only (as in the rest of the suite); the pages' numbers do not depend on it
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    return subprocess.run([sys.executable, str(RUNNER), *map(str, pages)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_every_page_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/api.md", "docs/scaling.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_runs_as_written(page):
    if not any(b.lang in ("python", "py", "bash", "sh") for b in blocks(page)):
        pytest.skip("no code blocks")
    result = run_pages(page)
    assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_the_readme_has_linen_nnx_and_equinox_examples():
    code = "\n".join(b.code for b in blocks(ROOT / "README.md") if b.lang == "python" and b.marker is None)
    for framework in ("flax.linen", "from flax import nnx", "import equinox"):
        assert framework in code, f"the README has no {framework} example"


def test_the_runner_fails_on_a_wrong_example(tmp_path):
    """The checker can fail: an exception, a changed output, a missing module, a skip without reason."""
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent("""\
        # A page
        ```python
        x = 2 + 2
        print("x =", x)
        ```
        <!-- test: output -->
        ```text
        x = 5
        ```
        ```bash
        python -m experiments.no_such_module --config configs/no_such.yaml
        ```
        ```python
        raise RuntimeError("this example is broken")
        ```
        """))
    result = run_pages(page, timeout=120)
    assert result.returncode == 1
    assert f"{page}:7: the output of the block at line 2 differs" in result.stderr
    assert "Expected:\n    x = 5\nGot:\n    x = 4" in result.stderr
    assert "module 'experiments.no_such_module' (python -m) does not exist" in result.stderr
    assert "config file configs/no_such.yaml does not exist" in result.stderr
    assert f"{page}:13: the block raised" in result.stderr and "RuntimeError: this example is broken" in result.stderr
    assert f'File "{page}", line 14' in result.stderr   # tracebacks point into the page

    page.write_text("<!-- test: skip -->\n```python\npass\n```\n")
    result = run_pages(page, timeout=120)
    assert result.returncode != 0 and "needs a reason" in result.stderr


def test_the_runner_passes_a_correct_example_with_ellipsis(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('```python\nimport jax.numpy as jnp\nprint("dtype", jnp.ones(2).dtype, 0.9876)\n```\n'
                    "<!-- test: output -->\n```text\ndtype float32 0.98...\n```\n")
    result = run_pages(page, timeout=120)
    assert result.returncode == 0, result.stderr
