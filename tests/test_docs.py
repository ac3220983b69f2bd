"""The README's and the documentation's code blocks run as written (``tests/_doc_runner.py``).

Each page runs in a fresh interpreter (JAX defaults: float32, no x64; the page's own ``XLA_FLAGS``),
its Python blocks in page order in one namespace, printed results compared with the page's output
blocks; shell blocks are checked for modules, scripts and configs that do not exist.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _doc_runner import ROOT, blocks, compare_output, output_tolerance, subprocess_env

ALL_PAGES = sorted([ROOT / "README.md",
                    *(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)])
# the front door here; the guide's pages in tests/test_docs_guide.py (another file, so that pytest-xdist
# runs the two halves on different workers)
FRONT = {"README.md", "docs/index.md", "docs/api.md"}
PAGES = [p for p in ALL_PAGES if p.relative_to(ROOT).as_posix() in FRONT or "getting-started" in p.parts]
GUIDE = [p for p in ALL_PAGES if p not in PAGES]
RUNNER = Path(__file__).with_name("_doc_runner.py")


def run_pages(*pages: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *map(str, pages)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout, cwd=ROOT)


def test_every_page_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in ALL_PAGES}
    assert {"README.md", "docs/index.md", "docs/api.md", "docs/scaling.md",
            "docs/getting-started/linen.md"} <= names
    assert set(PAGES) | set(GUIDE) == set(ALL_PAGES) and len(PAGES) >= 7


def check_page(page: Path) -> None:
    if not any(b.lang in ("python", "py", "bash", "sh") for b in blocks(page)):
        pytest.skip("no code blocks")
    result = run_pages(page)
    assert result.returncode == 0, \
        f"{page.relative_to(ROOT)}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_runs_as_written(page):
    check_page(page)


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
    assert f"{page}:13: the block raised" in result.stderr
    assert "RuntimeError: this example is broken" in result.stderr
    assert f'File "{page}", line 14' in result.stderr   # tracebacks point into the page

    page.write_text("<!-- test: skip -->\n```python\npass\n```\n")
    result = run_pages(page, timeout=120)
    assert result.returncode != 0 and "needs a reason" in result.stderr


def test_the_output_comparison_checks_every_number_and_word():
    """Pages show real output; the text around the numbers must match, each number within tolerance."""
    page = "epoch 1: test accuracy 0.781\nsum R / logit  0.47 to  2.57   MLP/Dense_0  README.md:98 (float32)"
    assert compare_output(page, page) is None
    assert compare_output(page, page.replace("  ", " ") + "\n") is None     # whitespace runs are one space
    assert compare_output(page, page.replace("0.781", "0.7812")) is None    # within rtol=1e-3 (the default)
    assert "number 2 is 0.79 where the page has 0.781" in compare_output(page, page.replace("0.781", "0.79"))
    assert compare_output(page, page.replace("0.781", "0.79"), rtol=0.02) is None   # a block's own rtol
    assert compare_output(page, page.replace("2.57", "2.58")) is not None
    assert compare_output(page, page.replace("Dense_0", "Dense_1")) is not None     # digits in names too
    assert compare_output(page, page.replace(":98", ":99")) is not None             # and line numbers
    assert "the text differs" in compare_output(page, page.replace("test accuracy", "train accuracy"))
    assert "the text differs" in compare_output(page, page.replace("float32", "int32"))
    assert compare_output(page, page + " 5") is not None                            # a number more
    assert compare_output("loss 0.0", "loss 1e-09", atol=1e-6) is None              # atol near zero
    assert compare_output("loss 0.0", "loss 1e-09") is not None
    assert compare_output("median 3.44 ms", "median 91.2 ms", rtol=float("inf")) is None   # timings
    assert compare_output("median 3.44 ms", "median 91.2 s", rtol=float("inf")) is not None
    assert compare_output("accuracy ...", "accuracy 0.97") is not None              # no wildcards
    assert compare_output("kind=...)", "kind=...)") is None                         # literal dots match
    assert output_tolerance(None) == {"rtol": 1e-3, "atol": 0.0}
    assert output_tolerance("rtol=0.05, atol=1e-6") == {"rtol": 0.05, "atol": 1e-6}
    with pytest.raises(ValueError, match="unknown output option"):
        output_tolerance("tolerance=0.1")


def test_the_runner_checks_the_numbers_of_a_page(tmp_path):
    """A page with the real output passes; a wrong number (beyond the block's tolerance) and a wrong word
    fail, with the block's file and line."""
    code = ('```python\nimport jax.numpy as jnp\n'
            'print("dtype", jnp.ones(2).dtype, "mean", float(jnp.arange(4.0).mean()) / 3)\n```\n')
    page = tmp_path / "page.md"
    page.write_text(code + "<!-- test: output -->\n```text\ndtype float32 mean 0.5\n```\n"
                    + code + "<!-- test: output: rtol=0.05 -->\n```text\ndtype float32 mean 0.52\n```\n")
    result = run_pages(page, timeout=120)
    assert result.returncode == 0, result.stderr
    page.write_text(code + "<!-- test: output -->\n```text\ndtype float32 mean 0.51\n```\n"
                    + code + "<!-- test: output: rtol=0.05 -->\n```text\ndtype float32 mean 0.6\n```\n"
                    + code + "<!-- test: output -->\n```text\ndtype float32 median 0.5\n```\n"
                    + code + "<!-- test: output: rtol=lots -->\n```text\ndtype float32 mean 0.5\n```\n")
    result = run_pages(page, timeout=120)
    assert result.returncode == 1
    # "float32" holds a number too (32): the mean is number 2
    assert f"{page}:6: the output of the block at line 1 differs from the page: number 2 is 0.5 where the " \
           f"page has 0.51" in result.stderr
    assert f"{page}:14: the output of the block at line 9 differs from the page: number 2 is 0.5 where the " \
           f"page has 0.6" in result.stderr
    assert f"{page}:22: the output of the block at line 17 differs from the page: the text differs" \
        in result.stderr
    assert f"{page}:30: output option 'rtol=lots': 'lots' is not a number" in result.stderr


# ---- the examples in the docstrings (the API reference) -------------------------------------------

def docstring_examples() -> list[tuple[str, str]]:
    """``(public name, code)`` for every literal block (``::``) of a public docstring that is Python
    (blocks that do not compile are printed output, e.g. ``describe``'s table)."""
    import inspect
    import re
    import types

    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from check_site import public_names
    finally:
        sys.path.pop(0)
    out, seen = [], set()
    for name, obj in public_names().items():
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        docs = [(name, inspect.getdoc(obj) or "")]
        if inspect.isclass(obj):
            docs += [(f"{name}.{k}", inspect.getdoc(v) or "") for k, v in vars(obj).items()
                     if not k.startswith("_") and callable(v)]
        for where, doc in docs:
            for m in re.finditer(r"^(?P<lead>.*)::\n\n(?P<body>(?:[ \t]+.*\n|\n)+)", doc + "\n", re.M):
                if m["lead"].strip().startswith(".. "):
                    continue   # a directive (.. math::)
                code = textwrap.dedent(m["body"]).strip() + "\n"
                try:
                    compile(code, where, "exec")
                except SyntaxError:
                    continue
                out.append((where, code))
    return out


EXAMPLES = docstring_examples()


def example_namespace() -> dict:
    """The names the docstring examples take as given: a linen MLP ``model`` with ``params``, a batch of
    ``images`` and ``labels`` (also ``x``), a PRNG ``key``, a BatchNorm network ``net`` (eval mode), a
    learning rate ``lr``; a linen language model ``lm`` with ``lm_params``, token ``ids`` and a
    ``next_token`` per sequence."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import lfp_jax
    from lfp_jax import Match, lfp_value_and_feedback, rewards, rules

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=True)(nn.Dense(16)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(nn.relu(h))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(20, 8)
            h = embed(ids)
            return embed.attend(h + nn.Dense(8)(nn.relu(nn.Dense(16)(h))))

    key = jax.random.key(0)
    images = jax.random.uniform(key, (4, 8, 8, 1))
    ids = jax.random.randint(key, (2, 5), 0, 20)
    lm = LM()
    labels = jnp.array([0, 3, 5, 9])
    model, net = MLP(), Net()
    params = lfp_jax.nn.torch_init(key, model.init(key, images)["params"])
    return dict(jax=jax, jnp=jnp, lfp_jax=lfp_jax, rewards=rewards, rules=rules, Match=Match,
                lfp_value_and_feedback=lfp_value_and_feedback, model=model, params=params, images=images,
                labels=labels, x=images, key=key, net=net, lr=0.01, lm=lm,
                lm_params=lfp_jax.nn.torch_init(key, lm.init(key, ids)["params"]), ids=ids,
                next_token=jnp.array([3, 7]))


def test_the_docstrings_have_examples():
    names = {where for where, _ in EXAMPLES}
    assert {"lfp_jax.lfp_value_and_feedback", "lfp_jax.lrp", "lfp_jax.composites"} <= names


# The examples keep Flax's own initialisation of ``net`` (zero biases and BatchNorm offsets), for which
# a user sees FrozenParameterWarning too: expected here (the warning itself: tests/test_errors.py).
@pytest.mark.filterwarnings("ignore::lfp_jax.errors.FrozenParameterWarning")
@pytest.mark.parametrize("where,code", EXAMPLES, ids=[f"{w}-{i}" for i, (w, _) in enumerate(EXAMPLES)])
def test_docstring_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # examples may write files (heatmaps)
    exec(compile(code, f"<docstring of {where}>", "exec"), example_namespace())
