"""Test configuration: float64 everywhere, so identities can be checked to tight tolerances; long
integration runs (marked ``slow``) run only with ``--slow`` (CI runs them: ``.ci/run``)."""

import jax
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
# XLA's optimisation passes dominate the cost of the many small programs the tests compile (the CPU
# backend spends ~0.25 s per program in them, ~2.5x the test time of a typical file) and change nothing
# but rounding; the benchmarks and the training subprocesses of the kill test keep them.
jax.config.update("jax_disable_most_optimizations", True)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the long integration tests (marked slow); CI does")
    parser.addoption("--only-slow", action="store_true", default=False,
                     help="run only the long integration tests (marked slow) and the property-based tests "
                          "with their long profile")


def pytest_configure(config):
    # property-based tests (tests/test_properties.py): each example compiles a new network
    slow = config.getoption("--slow") or config.getoption("--only-slow")
    settings.register_profile("lfp_jax", max_examples=60 if slow else 10)
    settings.load_profile("lfp_jax")
    config.addinivalue_line("markers", "slow: a long integration run (training runs, subprocesses); "
                                       "runs with --slow or --only-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--only-slow"):  # the slow tests, and the property-based ones with more examples
        def long(item):
            return "slow" in item.keywords or "hypothesis" in item.keywords

        keep = [item for item in items if long(item)]
        config.hook.pytest_deselected(items=[item for item in items if not long(item)])
        items[:] = keep
        return
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow integration test: run with --slow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
