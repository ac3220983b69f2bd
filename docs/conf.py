"""Sphinx configuration of the lfp_jax documentation (``bash scripts/docs.sh`` builds it).

Pages are Markdown (MyST), the API reference comes from the docstrings (autodoc, Google style through
napoleon), formulas are rendered by a MathJax copy shipped with the site (``sphinx-mathjax-offline``):
the site builds and reads without network access.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lfp_jax  # noqa: E402

project = "lfp_jax"
author = "The lfp_jax developers"
copyright = "2026, the lfp_jax developers"
release = version = lfp_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/_build", "conf.py", "check_site.py"]

# Markdown: $...$ math (as GitHub renders it), anchors for ## and ### headings (links like page.md#a-section)
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# docstrings: Google style ("Args:", "Returns:"), formulas in ``.. math::``
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True   # "Attributes:" sections as fields, not a second description of each attribute
python_use_unqualified_type_names = True

html_theme = "furo"
html_title = f"lfp_jax {release}"
html_theme_options = {"navigation_with_keys": True}
# wide tables and long code lines: a wider content column where the screen has room, wrapping cells
html_static_path = ["_static"]
html_css_files = ["lfp.css"]
pygments_style = "friendly"
pygments_dark_style = "monokai"
