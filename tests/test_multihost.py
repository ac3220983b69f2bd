"""Several processes (``jax.distributed``): the multi-host program of ``docs/scaling.md``, as written.

The block marked ``runs as 2 processes by tests/test_multihost.py`` is taken from the page
(``_doc_runner.blocks``), written to a file and started

- twice, as processes 0 and 1 of one job, each with 4 CPU devices (``XLA_FLAGS``), the coordinator on
  ``127.0.0.1`` at a free port: one mesh of 8 devices over 2 processes, each process loading only its
  half of every global batch (``jax.make_array_from_process_local_data``), CPU collectives through gloo;
- once as a single process with 8 CPU devices (``NUM_PROCESSES=1``: no ``jax.distributed``), the same
  steps on the same global batches.

Each process prints a checksum (Σ|θ| in float64) of its copy of the parameters before and after the
steps. Both processes must agree with each other exactly (replicas of one all-reduced update) and with
the single-process run to float32 rounding, and the steps must have changed the parameters by far
more than that tolerance (a step fewer changes the checksum by 5e-4 relative). Measured (jax 0.10.2,
2 CPU cores): the two processes' checksums identical, the single process's 6e-11 (with
``JAX_DISABLE_MOST_OPTIMIZATIONS``, as here and in the rest of the suite) to 8e-10 (without) relative
from them; 5-15 s in all.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from _doc_runner import ROOT, blocks, subprocess_env

PAGE = ROOT / "docs" / "scaling.md"
TIMEOUT = 300  # seconds for each run (measured: 5-10 s for the 2-process run on 2 cores)
LINE = re.compile(r"^process (\d+) of (\d+): (\d+) of (\d+) devices; checksum (\S+) -> (\S+)$", re.M)


def multihost_program() -> str:
    found = [b for b in blocks(PAGE) if b.lang == "python" and b.marker == "skip"
             and "tests/test_multihost.py" in (b.reason or "")]
    assert len(found) == 1, f"{PAGE}: expected one Python block skipped for tests/test_multihost.py"
    assert "jax.distributed.initialize" in found[0].code
    return found[0].code


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int, **extra: str) -> dict:
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=path,
                          NUM_STEPS="3", **extra)


def start(script, cwd, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, ...]]:
    """Waits for all (killing every one if any runs past the timeout); the parsed line of each."""
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.communicate()
        pytest.fail(f"the multi-host program did not finish within {TIMEOUT} s")
    results = []
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, f"exit status {proc.returncode}\n{out[-3000:]}\n{err[-6000:]}"
        lines = LINE.findall(out)
        assert len(lines) == 1, f"expected one 'process ... checksum' line:\n{out[-3000:]}\n{err[-3000:]}"
        results.append(lines[0])
    return results


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
    script = tmp_path / "multihost.py"
    script.write_text(multihost_program())
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [start(script, tmp_path, environment(4, COORDINATOR=coordinator, NUM_PROCESSES="2",
                                                 PROCESS_ID=str(i))) for i in range(2)]
    two = finish(procs)
    one = finish([start(script, tmp_path, environment(8, NUM_PROCESSES="1"))])

    # the job really is 2 processes of 4 devices each, one mesh of 8; the reference 1 process of 8
    assert sorted((int(p), int(n), int(local), int(total)) for p, n, local, total, _, _ in two) == [
        (0, 2, 4, 8), (1, 2, 4, 8)]
    assert [(int(p), int(n), int(local), int(total)) for p, n, local, total, _, _ in one] == [(0, 1, 8, 8)]

    before = [float(b) for *_, b, _ in two + one]
    after = [float(a) for *_, a in two + one]
    assert before[0] == before[1] == pytest.approx(before[2], rel=1e-6), before   # the same initial replicas
    assert after[0] == after[1], after                       # both processes hold the same parameters
    assert after[2] == pytest.approx(after[0], rel=1e-6)     # = one process, to float32 rounding
    assert abs(after[0] - before[0]) > 1e-4 * before[0], (before, after)  # the steps did change them
