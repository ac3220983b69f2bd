#!/usr/bin/env bash
# Builds the documentation site (Sphinx, MyST Markdown, furo theme) into docs/_build/html and checks it;
# sets itself up (the docs extra: pip install -e ".[docs]"). Every Sphinx warning is an error; then
# docs/check_site.py checks that every public name of lfp_jax is in the API reference and that no
# internal link is broken. The pages' code blocks are run by the test suite (tests/test_docs.py).
# DOCS_OUT: where to build (default docs/_build/html). Extra arguments go to sphinx-build.
EXTRAS="${EXTRAS:-test,experiments,docs}"
source "$(dirname "$0")/_env.sh"
out="${DOCS_OUT:-docs/_build/html}"
rm -rf "$out"
"$VENV/bin/python" -m sphinx -W --keep-going -q -b html "$@" docs "$out"
"$VENV/bin/python" docs/check_site.py "$out"
echo "documentation: $out/index.html"
