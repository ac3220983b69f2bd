"""Checks a built documentation site (``bash scripts/docs.sh`` runs it after Sphinx).

1. Every public name of ``lfp_jax`` (its ``__all__``, the ``__all__`` of each public submodule and of
   ``lfp_jax.plot``) is
   documented in the API reference: listed in the site's ``objects.inv`` under that name or, for a
   re-export such as ``lfp_jax.Match``, under another public name of the same object; every public
   function and class has a docstring.
2. No broken internal link: every ``href``/``src`` of every page that points into the site names a
   file that exists and, with ``#anchor``, an element with that id in it.

Usage: ``python docs/check_site.py docs/_build/html``. Exit status 1 with one line per problem.
"""

from __future__ import annotations

import html.parser
import importlib
import inspect
import sys
import types
from pathlib import Path
from urllib.parse import unquote, urlsplit


def public_names() -> dict[str, object]:
    """``{"lfp_jax.X": obj, "lfp_jax.rules.Y": obj, ...}`` for every public name."""
    import lfp_jax
    import lfp_jax.plot  # public, but not imported by lfp_jax: it needs matplotlib (an extra)

    names: dict[str, object] = {"lfp_jax.plot": lfp_jax.plot}
    modules = [lfp_jax, lfp_jax.plot]
    for name in lfp_jax.__all__:
        obj = getattr(lfp_jax, name)
        names[f"lfp_jax.{name}"] = obj
        if isinstance(obj, types.ModuleType):
            modules.append(obj)
    for module in modules[1:]:
        exported = getattr(module, "__all__", None)
        if exported is None:
            raise SystemExit(f"{module.__name__} has no __all__: declare its public names")
        for name in exported:
            names[f"{module.__name__}.{name}"] = getattr(module, name)
    return names


def documented(html_dir: Path) -> dict[str, str]:
    """``{full name: role}`` of the Python objects in the site's inventory."""
    from sphinx.util.inventory import InventoryFile

    with open(html_dir / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    out = {}
    for role, entries in inventory.data.items() if hasattr(inventory, "data") else inventory.items():
        if role.startswith("py:"):
            for name in entries:
                out[name] = role
    return out


def resolve(full_name: str):
    module_name, _, attr = full_name.rpartition(".")
    while module_name:
        try:
            obj = importlib.import_module(module_name)
            break
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            attr = f"{head}.{attr}"
    else:
        return None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    return obj


def check_api(html_dir: Path) -> list[str]:
    inventory = documented(html_dir)
    objects_documented = [resolve(name) for name in inventory]
    problems = []
    for name, obj in public_names().items():
        if name in inventory:
            pass
        elif isinstance(obj, (type, types.FunctionType, types.ModuleType)) and any(
                obj is other for other in objects_documented):
            pass
        else:
            problems.append(f"public name {name} is not in the API reference (docs/api.md)")
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType)) \
                and not (inspect.getdoc(obj) or "").strip():
            problems.append(f"public name {name} has no docstring")
    return problems


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key):
                self.ids.add(attrs[key])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and attrs.get("rel") == "preconnect"):
                self.links.append(attrs[key])


def check_links(html_dir: Path) -> tuple[list[str], int, int]:
    pages = {}
    for path in html_dir.rglob("*.html"):
        parser = _Links()
        parser.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = parser
    problems, checked = [], 0
    for path, parser in pages.items():
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:", "data:")):
                continue
            checked += 1
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            rel = path.relative_to(html_dir.resolve())
            if not target.exists():
                problems.append(f"{rel}: broken link {link!r} (no file {target})")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if unquote(parts.fragment) not in ids:
                    problems.append(
                        f"{rel}: broken link {link!r} (no id {parts.fragment!r} in {target.name})")
    return problems, checked, len(pages)


def main(argv: list[str]) -> int:
    html_dir = Path(argv[0] if argv else "docs/_build/html")
    problems = check_api(html_dir)
    link_problems, checked, n_pages = check_links(html_dir)
    problems += link_problems
    for problem in problems:
        print(problem, file=sys.stderr)
    n_names = len(public_names())
    print(f"{html_dir}: {n_pages} pages, {n_names} public names documented, {checked} internal links "
          f"checked, {len(problems)} problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
