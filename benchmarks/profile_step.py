"""Where the LFP step's time goes, against the gradient step: work and parallelism.

    python -m benchmarks.profile_step [--models llama,gemma,...] [--batch 128] [--steps 9] [--repeats 3]
        [--same] [--json out.json]

For each model of :mod:`benchmarks.step_time` the jitted LFP and gradient training steps are compiled
once and measured three ways:

* **wall**: median step time, LFP and gradient alternately, on every core this process may use, and
  again in a child process pinned to one core (``os.sched_setaffinity`` before JAX starts, so XLA's
  thread pool has one thread). On one core the ratio is the ratio of *work*; the difference between
  the two ratios is what parallel execution gives one step and not the other.
* **operations**: ``jax.profiler`` traces ``--repeats`` steps of each; the time of every operation
  XLA's runtime executes (a fusion, a matrix product, a copy) is summed by kind, read from the
  compiled program: *matmul* (a fusion or operation holding ``dot`` or ``convolution``), *layout*
  (only copies, transposes, converts, bitcasts, broadcasts, slices, pads, concatenations) and
  *elementwise* (every other fusion: arithmetic, selects, reductions). ``busy`` is their sum.
* **overlap**: from the same trace, the time during which two or more operations ran at once, and
  the time during which one ran alone: on XLA's CPU runtime a matrix product is split over the cores,
  an elementwise fusion runs on one, so extra elementwise passes cost wall time out of proportion to
  their work.

The table's columns are LFP / gradient ratios; ``--json`` writes the per-kind milliseconds as well.

``--same`` measures the noise floor instead (an A/A test): each step is compiled twice, from two
distinct ``jax.jit`` wrappers of the same function, and the four executables are timed alternately.
The two copies run the same program, so ``LFP a / LFP b`` and ``grad a / grad b`` would be 1 on a
quiet machine; how far they are from 1 is how far one LFP / gradient ratio can be from the truth.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import step_time

DEFAULT = "vit,gpt," + ",".join(step_time.LANGUAGE_MODELS)
_LAYOUT = {"copy", "transpose", "convert", "bitcast", "broadcast", "slice", "pad", "concatenate",
           "reshape", "parameter", "constant", "tuple", "get-tuple-element", "iota", "dynamic-slice",
           "dynamic-update-slice"}


def _compiled(name: str, batch: int):
    """The compiled LFP and gradient steps of one model and their arguments."""
    p, s, x, y, lfp_step, grad_step = step_time._steps(name, batch)
    args = (p, s, x, y)
    out = {label: jax.jit(fn).lower(*args).compile()
           for label, fn in (("lfp", lfp_step), ("grad", grad_step))}
    for c in out.values():
        jax.block_until_ready(c(*args))
    return out, args


def _wall(compiled: dict, args: tuple, steps: int) -> dict[str, float]:
    times = collections.defaultdict(list)
    for _ in range(steps):
        for label, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[label].append(time.perf_counter() - t)
    return {label: float(np.median(v)) for label, v in times.items()}


def _kinds(hlo: str) -> dict[str, str]:
    """The kind (matmul, layout, elementwise) of every instruction of the entry computation that the
    runtime executes as one operation, by the operations inside it."""
    bodies = {m.group(1): m.group(2) for m in
              re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
    kinds = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = \S+ ([a-z\-]+)\((.*)$", hlo, re.M):
        name, op, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        ops = set(re.findall(r" = \S+ ([a-z\-]+)\(", bodies.get(called.group(1), ""))) if called else {op}
        if ops & {"dot", "convolution"}:
            kinds[name] = "matmul"
        elif ops <= _LAYOUT:
            kinds[name] = "layout"
        else:
            kinds[name] = "elementwise"
    return kinds


def _events(directory: str) -> list[dict]:
    path = glob.glob(f"{directory}/**/*.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        ev = json.load(f)
    return [e for e in (ev["traceEvents"] if isinstance(ev, dict) else ev) if e.get("ph") == "X"]


def _overlap(ops: list[dict]) -> tuple[float, float]:
    """Seconds during which exactly one operation ran, and two or more."""
    points = sorted([(e["ts"], 1) for e in ops] + [(e["ts"] + e["dur"], -1) for e in ops])
    level, last, alone, several = 0, None, 0.0, 0.0
    for t, d in points:
        if last is not None:
            if level == 1:
                alone += t - last
            elif level > 1:
                several += t - last
        last, level = t, level + d
    return alone / 1e6, several / 1e6


def _profile(compiled, args: tuple, repeats: int) -> dict[str, float]:
    kinds = _kinds(compiled.as_text())
    directory = tempfile.mkdtemp(prefix="lfp_profile_")
    try:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        for _ in range(repeats):
            jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        events = _events(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ops = [e for e in events if e["name"] in kinds]  # operations of the compiled program
    seconds = collections.Counter()
    for e in ops:
        seconds[kinds[e["name"]]] += e["dur"] / 1e6 / repeats
    alone, several = _overlap(ops)
    out = {k: seconds[k] for k in ("matmul", "layout", "elementwise")}
    out.update(busy=sum(out.values()), alone=alone / repeats, overlapped=several / repeats,
               operations=len(ops) / repeats)
    return out


def _one_core(name: str, batch: int, steps: int) -> dict[str, float]:
    """LFP and gradient medians in a child process pinned to one core."""
    code = ("import json, os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from benchmarks import profile_step as P; c, a = P._compiled(sys.argv[1], int(sys.argv[2])); "
            "print('RESULT' + json.dumps(P._wall(c, a, int(sys.argv[3]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, name, str(batch), str(steps)], capture_output=True,
                         text=True, env=env, check=True).stdout
    return json.loads(out.split("RESULT", 1)[1])


def profile(name: str, batch: int, steps: int, repeats: int, one_core: bool = True) -> dict:
    compiled, args = _compiled(name, batch)
    wall = _wall(compiled, args, steps)
    row = {"model": name, "cores": len(os.sched_getaffinity(0)),
           "lfp_ms": 1e3 * wall["lfp"], "grad_ms": 1e3 * wall["grad"], "ratio": wall["lfp"] / wall["grad"]}
    if one_core and hasattr(os, "sched_setaffinity"):
        single = _one_core(name, batch, steps)
        row.update(lfp_1core_ms=1e3 * single["lfp"], grad_1core_ms=1e3 * single["grad"],
                   ratio_1core=single["lfp"] / single["grad"])
    for label, c in compiled.items():
        for k, v in _profile(c, args, repeats).items():
            row[f"{label}_{k}" + ("" if k == "operations" else "_ms")] = v if k == "operations" else 1e3 * v
    return row


def same_program(name: str, batch: int, steps: int) -> dict:
    """The A/A test of one model: LFP and gradient steps compiled twice each, timed alternately."""
    p, s, x, y, lfp_step, grad_step = step_time._steps(name, batch)
    args = (p, s, x, y)
    compiled = {}
    for copy in ("a", "b"):  # a fresh wrapper per copy: jax.jit's cache would return the first one
        for label, fn in (("lfp", lfp_step), ("grad", grad_step)):
            compiled[f"{label}_{copy}"] = jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).compile()
    for c in compiled.values():
        jax.block_until_ready(c(*args))
    return same_row(name, _wall(compiled, args, steps))


def same_row(name: str, wall: dict[str, float]) -> dict:
    """The A/A ratios from the medians of ``lfp_a``, ``lfp_b``, ``grad_a``, ``grad_b`` (seconds)."""
    row = {"model": name, **{f"{k}_ms": 1e3 * v for k, v in wall.items()},
           "lfp_a_over_b": wall["lfp_a"] / wall["lfp_b"], "grad_a_over_b": wall["grad_a"] / wall["grad_b"],
           "ratio_a": wall["lfp_a"] / wall["grad_a"], "ratio_b": wall["lfp_b"] / wall["grad_b"]}
    row["spread"] = max(abs(row[k] - 1) for k in ("lfp_a_over_b", "grad_a_over_b"))
    return row


def same_table(rows: list[dict]) -> str:
    lines = ["| model | LFP a / LFP b | grad a / grad b | LFP/grad (copies a) | LFP/grad (copies b) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['lfp_a_over_b']:.3f} | {r['grad_a_over_b']:.3f} | "
                     f"{r['ratio_a']:.3f} | {r['ratio_b']:.3f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| model | LFP/grad | on one core | busy | matmul | elementwise | layout | alone | "
             "elementwise LFP−grad ms | operations LFP/grad |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def q(k, r=r):
            return r[f"lfp_{k}_ms"] / r[f"grad_{k}_ms"] if r[f"grad_{k}_ms"] else float("nan")

        one = f"{r['ratio_1core']:.2f}" if "ratio_1core" in r else "–"
        lines.append(
            f"| {r['model']} | {r['ratio']:.2f} | {one} | {q('busy'):.2f} | {q('matmul'):.2f} | "
            f"{q('elementwise'):.2f} | {q('layout'):.2f} | {q('alone'):.2f} | "
            f"{r['lfp_elementwise_ms'] - r['grad_elementwise_ms']:+.0f} | "
            f"{r['lfp_operations']:.0f}/{r['grad_operations']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT, help=f"comma-separated, from {sorted(step_time.SHAPES)}")
    parser.add_argument("--batch", type=int, default=128, help="batch of vit and gpt (language models: 16)")
    parser.add_argument("--steps", type=int, default=9, help="alternating timed steps per method")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per method")
    parser.add_argument("--no-one-core", action="store_true", help="skip the one-core timing")
    parser.add_argument("--same", action="store_true",
                        help="A/A test: each step compiled twice, the copies timed against each other")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(step_time.SHAPES))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(step_time.SHAPES)}")
    rows = []
    if args.same:
        for m in models:
            rows.append(same_program(m, args.batch, args.steps))
            print(f"{m}: LFP a/b {rows[-1]['lfp_a_over_b']:.3f}, grad a/b {rows[-1]['grad_a_over_b']:.3f}",
                  flush=True)
        print(same_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": step_time.environment(), "same_program": rows}, f, indent=1)
        return rows
    for m in models:
        rows.append(profile(m, args.batch, args.steps, args.repeats, not args.no_one_core))
        print(f"{m}: LFP/grad {rows[-1]['ratio']:.2f}", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": step_time.environment(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
