"""Runs the code blocks of a Markdown page (the README, ``docs/*.md``) as a reader would.

Every ```` ```python ```` block of a page runs, in the order of the page, in one namespace (like the
cells of a notebook), in a fresh interpreter with JAX's default settings (float32) and an empty working
directory, so a page is a complete program. Markers are HTML comments (invisible on GitHub and on the
documentation site) on the line before a fence:

``<!-- test: output -->``
    before a ```` ```text ```` block: what the previous Python block printed, as the reader sees it (real
    numbers, no placeholders). The text around the numbers must be the same (runs of whitespace count
    as one space); each number must agree within a tolerance, ``|got - page| <= atol + rtol * |page|``,
    by default ``rtol=1e-3, atol=0`` (a float32 result printed to four digits). A block whose numbers
    vary more (training, timings) says how much: ``<!-- test: output: rtol=0.05 -->``,
    ``<!-- test: output: rtol=0.02, atol=1e-6 -->``, or ``rtol=inf`` where only the words are checked
    (timings, memory). ``...`` is compared as written: it is no wildcard.
``<!-- test: skip: REASON -->``
    before a Python block that is not run; the reason is required and should say what runs it instead.
``<!-- test: requires: MODULE, ... -->``
    before a Python block that needs packages outside the test extra (``transformers`` from the
    ``models`` extra): it runs where they are installed and is skipped where they are not, unless
    ``LFP_DOCS_REQUIRE=1`` is set (the slow suite, which installs them), where a missing one fails.

Shell blocks (```` ```bash ````) are not run (they start training runs, install packages); what they
name of this repository is checked to exist: ``python -m MODULE`` of its packages (``experiments``,
``benchmarks``, ...) must be importable, ``bash scripts/*.sh`` and ``--config FILE`` must exist
(``python -m build`` and other installed tools are not checked).

Usage: ``python tests/_doc_runner.py README.md docs/getting-started/linen.md`` (exit status 1 and the
failing block's file and line on failure). ``tests/test_docs.py`` runs every page this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!--\s*test:\s*(?P<kind>output|skip|requires)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None = None
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a page (or a page's program) run in a fresh interpreter: this process's,
    without its ``JAX_*`` / ``XLA_*`` settings (the suite's x64), on the CPU, with XLA's optimisation
    passes off (compile time only, as in the rest of the suite), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", **extra)
    return env


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the marker comment that precedes each."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out, i, marker = [], 0, None
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m:
            if marker is not None:
                raise ValueError(f"{path}:{marker[2]}: a test marker must be followed by a code block")
            marker = (m["kind"], m["reason"], i + 1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f is None:
            if lines[i].strip() and marker is not None:
                raise ValueError(f"{path}:{marker[2]}: a test marker must be followed by a code block")
            i += 1
            continue
        fence, indent = f["fence"], len(f["indent"])
        lang = f["info"].strip().split(" ")[0].strip("{}") if f["info"].strip() else ""
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        block = Block(Path(path), i + 1, lang, "\n".join(body) + "\n")
        if marker is not None:
            block.marker, block.reason = marker[0], marker[1]
            if block.marker == "skip" and not block.reason:
                raise ValueError(f"{block.where}: 'test: skip' needs a reason: <!-- test: skip: why -->")
            if block.marker == "requires" and not block.reason:
                raise ValueError(f"{block.where}: 'test: requires' needs the modules: "
                                 f"<!-- test: requires: transformers -->")
            marker = None
        out.append(block)
        i = j + 1
    return out


NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?:nan|inf)\b")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").splitlines())


def output_tolerance(options: str | None) -> dict[str, float]:
    """``rtol`` and ``atol`` of an output marker's options (``"rtol=0.05, atol=1e-6"``)."""
    tolerance = {"rtol": 1e-3, "atol": 0.0}
    for option in filter(None, (o.strip() for o in (options or "").split(","))):
        key, _, value = option.partition("=")
        key = key.strip()
        if key not in tolerance or not value.strip():
            raise ValueError(f"unknown output option {option!r}: expected rtol=NUMBER, atol=NUMBER")
        try:
            tolerance[key] = float(value)
        except ValueError:
            raise ValueError(f"output option {option!r}: {value.strip()!r} is not a number") from None
    return tolerance


def _split_numbers(text: str) -> tuple[list[str], list[str]]:
    """The text between the numbers (whitespace runs as one space) and the numbers of ``text``."""
    words, numbers, at = [], [], 0
    for m in NUMBER.finditer(text):
        words.append(text[at:m.start()])
        numbers.append(m.group())
        at = m.end()
    words.append(text[at:])
    return [re.sub(r"\s+", " ", w) for w in words], numbers


def compare_output(expected: str, got: str, *, rtol: float = 1e-3, atol: float = 0.0) -> str | None:
    """``None`` if ``got`` is ``expected`` (the same text around the numbers, whitespace runs counting as
    one space, each number within ``atol + rtol * |expected|``), else what differs first."""
    expected, got = expected.strip(), got.strip()
    want_words, want_numbers = _split_numbers(expected)
    got_words, got_numbers = _split_numbers(got)
    if want_words != got_words or len(want_numbers) != len(got_numbers):
        for k, (a, b) in enumerate(zip(want_words, got_words)):
            if a != b:
                return f"the text differs after number {k}: {a!r} on the page, {b!r} printed"
        return f"{len(want_numbers)} numbers on the page, {len(got_numbers)} printed"
    for k, (a, b) in enumerate(zip(want_numbers, got_numbers)):
        x, y = float(a), float(b)
        if x == y or (x != x and y != y):   # equal, infinities and NaNs included
            continue
        if not abs(y - x) <= atol + rtol * abs(x):
            return (f"number {k + 1} is {b} where the page has {a} "
                    f"(tolerance atol={atol:g} + rtol={rtol:g} * |{a}|)")
    return None


def check_shell(block: Block) -> list[str]:
    """What a shell block names that does not exist (modules, scripts, config files)."""
    problems = []
    text = block.code.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        for k, word in enumerate(words):
            nxt = words[k + 1] if k + 1 < len(words) else ""
            top = nxt.split(".")[0]
            if word == "-m" and k > 0 and "python" in words[k - 1] and nxt and \
                    ((ROOT / top / "__init__.py").is_file() or (ROOT / f"{top}.py").is_file()):  # ours
                sys.path.insert(0, str(ROOT))
                try:
                    found = importlib.util.find_spec(nxt) is not None
                except ModuleNotFoundError:
                    found = False
                finally:
                    sys.path.pop(0)
                if not found:
                    problems.append(f"{block.where}: module {nxt!r} (python -m) does not exist")
            if word == "bash" and nxt.startswith("scripts/") and not (ROOT / nxt).exists():
                problems.append(f"{block.where}: {nxt} does not exist")
            if word == "--config" and nxt and "*" not in nxt and not (ROOT / nxt).exists():
                problems.append(f"{block.where}: config file {nxt} does not exist")
    return problems


def run_page(path: Path) -> list[str]:
    """Runs the page's Python blocks in order in one namespace; returns the problems found."""
    page = blocks(path)
    problems = []
    for block in page:
        if block.lang in ("bash", "sh", "shell", "console"):
            problems += check_shell(block)
    namespace: dict = {"__name__": "__main__"}
    last_output, last_block = None, None
    for block in page:
        if block.marker == "output":
            if last_block is None:
                problems.append(f"{block.where}: an output block must follow a Python block")
                continue
            if last_output is None:
                continue   # the block it belongs to failed or was skipped
            try:
                tolerance = output_tolerance(block.reason)
            except ValueError as e:
                problems.append(f"{block.where}: {e}")
                continue
            difference = compare_output(block.code, last_output, **tolerance)
            if difference is not None:
                problems.append(f"{block.where}: the output of the block at line {last_block.line} differs "
                                f"from the page: {difference}\nExpected:\n{_indent(block.code)}\n"
                                f"Got:\n{_indent(last_output)}")
            continue
        if block.lang not in ("python", "py"):
            continue
        last_block, last_output = block, None
        if block.marker == "skip":
            print(f"{block.where}: skipped ({block.reason})", file=sys.stderr)
            continue
        if block.marker == "requires":
            wanted = [m.strip() for m in block.reason.split(",")]
            missing = [m for m in wanted if importlib.util.find_spec(m) is None]
            if missing and os.environ.get("LFP_DOCS_REQUIRE") == "1":
                problems.append(f"{block.where}: needs {', '.join(missing)}, which is not installed")
                continue
            if missing:
                print(f"{block.where}: skipped (needs {', '.join(missing)})", file=sys.stderr)
                continue
        # padded so that line numbers in tracebacks are the page's
        code = compile("\n" * block.line + block.code, str(block.path), "exec")
        buffer = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(code, namespace)
        except BaseException:   # noqa: BLE001 - report any failure of a page's code, with its traceback
            problems.append(f"{block.where}: the block raised\n{traceback.format_exc()}")
            print(buffer.getvalue(), end="")
            break
        last_output = buffer.getvalue()
        print(last_output, end="")
        print(f"{block.where}: ran in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return problems


def main(argv: list[str]) -> int:
    paths = [Path(p).resolve() for p in argv]
    problems = []
    for path in paths:
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="lfp_jax_docs_") as work:
            os.chdir(work)
            sys.path.insert(0, str(ROOT))   # the README's examples import experiments.*
            try:
                problems += run_page(path)
            finally:
                sys.path.remove(str(ROOT))
                os.chdir(cwd)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
