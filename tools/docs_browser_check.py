"""Opens every page of the built documentation site in headless Chromium, as a reader's browser would.

For each page it saves a screenshot (``--shots DIR``) and reads the DOM after the page's scripts ran
(``--dump-dom``) to check that the page rendered: a title and body text, no raw MyST/RST markup left
(`` ```{`` or ``.. auto``), and — where the page has formulas — MathJax's rendered output
(``mjx-container``), which shows that the MathJax copy shipped with the site loaded without network.

Needs Chromium (Debian: ``apt-get install chromium``); not part of CI, which has no browser guaranteed.
Usage: ``python tools/docs_browser_check.py docs/_build/html --shots /tmp/shots``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

SKIP = {"genindex.html", "search.html", "py-modindex.html"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium")


def browse(browser: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def check(html_dir: Path, shots: Path | None) -> list[str]:
    browser = chromium()
    pages = sorted(p for p in html_dir.rglob("*.html")
                   if p.name not in SKIP and "_modules" not in p.parts and "_static" not in p.parts)
    problems = []
    for page in pages:
        rel = page.relative_to(html_dir)
        source = page.read_text(encoding="utf-8")
        dom = browse(browser, page, "--dump-dom").stdout
        title = re.search(r"<h1[^>]*>(.*?)</h1>", dom, re.S)
        text = re.sub(r"<[^>]+>", " ", dom)
        if title is None:
            problems.append(f"{rel}: no <h1> title after rendering")
        if len(text.split()) < 30:
            problems.append(f"{rel}: almost no text after rendering ({len(text.split())} words)")
        for raw in ("```{", ".. auto", ":::"):
            if raw in text:
                problems.append(f"{rel}: unrendered markup {raw!r} in the page")
        has_math = 'class="math' in source
        math_rendered = "mjx-container" in dom
        if has_math and not math_rendered:
            problems.append(f"{rel}: has formulas but MathJax did not render them")
        status = f"{'math rendered' if math_rendered else 'no math':14s} {len(text.split()):6d} words"
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
            shot = shots / (str(rel).replace("/", "__").removesuffix(".html") + ".png")
            browse(browser, page, "--window-size=1400,2200", f"--screenshot={shot}")
            status += f"  {shot}"
        heading = re.sub(r"<[^>]+>", "", title.group(1)).strip()[:40] if title else "-"
        print(f"{str(rel):40s} {heading:42s} {status}")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", default="docs/_build/html", type=Path)
    parser.add_argument("--shots", type=Path, default=None, help="folder for one screenshot per page")
    args = parser.parse_args(argv)
    problems = check(args.html_dir, args.shots)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
