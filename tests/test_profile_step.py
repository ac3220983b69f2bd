"""The bookkeeping of ``benchmarks.profile_step``: overlap of operation intervals and the kind of each
compiled operation (hand-computed intervals; a compiled program with one matrix product)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_step


def test_overlap_splits_time_into_alone_and_several():
    # [0, 10] and [5, 15] overlap on [5, 10]; [20, 25] runs alone; the gap [15, 20] counts for neither
    events = [{"ts": 0, "dur": 10}, {"ts": 5, "dur": 10}, {"ts": 20, "dur": 5}]
    alone, several = profile_step._overlap(events)
    assert alone == pytest.approx(15e-6) and several == pytest.approx(5e-6)


def test_overlap_counts_three_at_once_as_several():
    events = [{"ts": 0, "dur": 9}, {"ts": 3, "dur": 3}, {"ts": 4, "dur": 1}]
    alone, several = profile_step._overlap(events)
    assert alone == pytest.approx(6e-6) and several == pytest.approx(3e-6)


def test_kinds_of_a_compiled_program():
    def f(a, b):
        return jnp.tanh(a @ b) * 2.0 + jnp.exp(a).sum()

    a = jnp.ones((64, 64))
    hlo = jax.jit(f).lower(a, a).compile().as_text()
    kinds = profile_step._kinds(hlo)
    assert set(kinds.values()) <= {"matmul", "layout", "elementwise"}
    assert "matmul" in kinds.values()        # the product
    assert "elementwise" in kinds.values()   # tanh / exp / the reduction
    assert all(kinds[n] == "layout" for n in kinds if n.startswith("copy") and "fusion" not in n)


def test_same_program_ratios_are_copy_against_copy():
    # hand-made medians: the copies of LFP differ by 10 %, those of the gradient step not at all
    wall = {"lfp_a": 0.11, "lfp_b": 0.10, "grad_a": 0.10, "grad_b": 0.10}
    row = profile_step.same_row("m", wall)
    assert row["lfp_a_over_b"] == pytest.approx(1.1) and row["grad_a_over_b"] == pytest.approx(1.0)
    assert row["ratio_a"] == pytest.approx(1.1) and row["ratio_b"] == pytest.approx(1.0)
    assert row["spread"] == pytest.approx(0.1)

