"""The guide's pages run as written (the README and getting-started pages: ``tests/test_docs.py``)."""

import pytest
from test_docs import GUIDE, ROOT, check_page


@pytest.mark.parametrize("page", GUIDE, ids=[p.relative_to(ROOT).as_posix() for p in GUIDE])
def test_guide_page_runs_as_written(page):
    check_page(page)
