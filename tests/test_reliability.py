"""The trainer's run folder survives kills and refuses what it cannot trust (experiments.train).

Checkpoints are written atomically and verified on load (integrity, structure, finite values); a resume
with a changed config is refused unless allowed; metrics.jsonl is repaired on resume; divergence stops
the run with the first bad step. The slow test kills a training subprocess at random moments (inside
the checkpoint write too) and checks that resuming each time ends with the uninterrupted run's numbers.
"""

import concurrent.futures
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest
import yaml

from experiments import config as config_lib
from experiments import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_mlp_lfp.yaml")
TOY = os.path.join(ROOT, "configs", "toy_mlp_lfp.yaml")
TINY = ["epochs=2", "data.subset=64", "batch_size=16", "eval_batch_size=64"]


def _cfg(out_dir, *extra) -> dict:
    return config_lib.load(DIGITS, [f"out_dir={out_dir}", *TINY, *extra])


def _flat(tree) -> dict:
    return train._flatten(tree)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch digits run (checkpoint of epoch 2, previous checkpoint of epoch 1) and a trainer
    of its config, to load checkpoints without compiling a step."""
    out = tmp_path_factory.mktemp("finished")
    cfg = _cfg(out)
    summary = train.train(cfg, progress=False)
    return cfg, summary["run_dir"], train.Trainer(cfg)


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run in a folder of its own: (config, run folder, trainer)."""
    cfg, folder, trainer = finished
    cfg = {**cfg, "out_dir": str(tmp_path)}
    shutil.copytree(folder, config_lib.run_dir(cfg))
    return cfg, config_lib.run_dir(cfg), trainer


def _snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


# --- atomic writes ---------------------------------------------------------------------------------------


def test_run_folder_holds_the_latest_and_the_previous_checkpoint(finished):
    cfg, folder, trainer = finished
    assert {"config.yaml", "metrics.jsonl", train.CHECKPOINT, train.PREVIOUS, "summary.json"} == set(
        os.listdir(folder))  # no temporary file left behind
    assert train.read_checkpoint(os.path.join(folder, train.CHECKPOINT))["epoch"] == 2
    assert train.read_checkpoint(os.path.join(folder, train.PREVIOUS))["epoch"] == 1
    with open(os.path.join(folder, train.CHECKPOINT), "rb") as f:
        header = f.readline()
    assert re.fullmatch(rb"LFPJAX-CHECKPOINT 1 sha256=[0-9a-f]{64} bytes=\d+\n", header)


def test_an_interrupted_checkpoint_write_leaves_the_old_checkpoints_loadable(run, monkeypatch):
    cfg, folder, trainer = run
    latest, prev = os.path.join(folder, train.CHECKPOINT), os.path.join(folder, train.PREVIOUS)
    before = _snapshot(folder)
    trainer.load_checkpoint(latest)

    def disk_full(path, data):  # half the bytes reach the disk, then ENOSPC
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(train, "_write_synced", disk_full)
        with pytest.raises(OSError, match="No space left"):
            trainer.save_checkpoint(folder, 3)
        with pytest.raises(OSError, match="No space left"):
            train.atomic_write(os.path.join(folder, "config.yaml"), "epochs: 99\n")
    assert _snapshot(folder) == before  # old files intact, temporary files removed
    assert trainer.load_checkpoint(latest) == 2

    class Killed(BaseException):
        pass

    calls = []

    def kill_at(n):
        def hook():
            calls.append(n)
            if len(calls) == n:
                raise Killed
        return hook

    # killed after the new checkpoint reached its temporary file, before any rename: nothing changed
    monkeypatch.setattr(train, "_test_delay", kill_at(1))
    with pytest.raises(Killed):
        trainer.save_checkpoint(folder, 3)
    assert _snapshot(folder)[train.CHECKPOINT] == before[train.CHECKPOINT]
    assert trainer.load_checkpoint(latest) == 2 and trainer.load_checkpoint(prev) == 1
    # killed between the two renames: the latest checkpoint is gone, the previous one is complete
    calls.clear()
    monkeypatch.setattr(train, "_test_delay", kill_at(2))
    with pytest.raises(Killed):
        trainer.save_checkpoint(folder, 3)
    assert not os.path.exists(latest) and trainer.load_checkpoint(prev) == 2
    monkeypatch.undo()
    with pytest.warns(train.ResumeWarning, match=r"checkpoint.msgpack is missing .* resuming from the "
                      r"previous checkpoint .*checkpoint.prev.msgpack \(epoch 2\)"):
        summary = train.train(cfg, resume=True, progress=False)  # finished at epoch 2: nothing to train
    # the fallback made the run folder whole again: checkpoint.msgpack is back (epoch 2)
    assert summary["epochs"] == 2 and trainer.load_checkpoint(latest) == 2


# --- verification on load ----------------------------------------------------------------------------------


def _flip(blob: bytes) -> bytes:
    i = len(blob) * 2 // 3
    return blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1:]


def _with_nan(blob: bytes) -> bytes:
    state = train.decode_checkpoint(blob, "x")
    kernel = state["params"]["Dense_1"]["kernel"] = state["params"]["Dense_1"]["kernel"].copy()
    kernel[3, 4] = np.nan
    return train.encode_checkpoint(flax.serialization.msgpack_serialize(state))  # valid hash, bad values


DAMAGE = {
    "flipped_byte": (_flip, r"is damaged: the SHA-256 of its payload does not match"),
    "truncated": (lambda b: b[:len(b) // 2], r"is truncated or extended: the header promises \d+ bytes"),
    "empty": (lambda b: b"", r"is empty \(0 bytes\)"),
    "damaged_header": (lambda b: b[:30] + b"x" + b[31:], r"has a damaged header"),
    "newer_format": (lambda b: b.replace(b"CHECKPOINT 1 ", b"CHECKPOINT 2 ", 1), r"has checkpoint format "
                     r"version 2; this trainer reads version 1"),
    "not_a_checkpoint": (lambda b: b"hello world", r"is not an lfp_jax checkpoint"),
    "nan_weight": (_with_nan, r"holds non-finite values \(NaN or inf\) in params/Dense_1/kernel"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(run, damage):
    cfg, folder, trainer = run
    path = os.path.join(folder, train.CHECKPOINT)
    with open(path, "rb") as f:
        blob = f.read()
    corrupt, reason = DAMAGE[damage]
    with open(path, "wb") as f:
        f.write(corrupt(blob))
    with pytest.raises(train.CheckpointError, match=re.escape(path) + ".*" + reason):
        trainer.load_checkpoint(path)
    assert issubclass(train.CheckpointError, ValueError)


def test_a_checkpoint_of_another_model_is_refused_as_a_config_change(run, tmp_path):
    cfg, folder, trainer = run
    other = train.Trainer(_cfg(tmp_path, "model.hidden=[32, 84]"))
    path = str(tmp_path / "other.msgpack")
    with open(path, "wb") as f:
        f.write(other.checkpoint_bytes(1))
    with pytest.raises(train.CheckpointError, match=re.escape(path) + r" does not match the model and "
                       r"optimiser of this config \(params/Dense_0/(bias|kernel): float32\[(64, )?32\] in "
                       r"the checkpoint, float32\[(64, )?120\] for this config.*the config \(model, "
                       r"optimizer, dtype\) or the code changed"):
        trainer.load_checkpoint(path)
    adam = train.Trainer(_cfg(tmp_path, "optimizer.name=adam"))  # same model, another optimiser state
    with open(path, "wb") as f:
        f.write(adam.checkpoint_bytes(1))
    with pytest.raises(train.CheckpointError, match=r"opt_state/.*missing in the checkpoint"):
        trainer.load_checkpoint(path)


def test_a_non_finite_state_is_never_checkpointed(run):
    cfg, folder, trainer = run
    trainer.load_checkpoint(os.path.join(folder, train.CHECKPOINT))
    good = trainer.params
    trainer.params = jax.tree.map(lambda a: np.full_like(a, np.inf), good)
    try:
        with pytest.raises(train.CheckpointError, match="refusing to checkpoint a non-finite state"):
            trainer.save_checkpoint(folder, 3)
    finally:
        trainer.params = good
    assert trainer.load_checkpoint(os.path.join(folder, train.CHECKPOINT)) == 2


def test_resume_falls_back_to_the_previous_checkpoint_and_ends_with_the_same_params(run, finished):
    cfg, folder, trainer = run
    latest = os.path.join(folder, train.CHECKPOINT)
    with open(latest, "rb") as f:
        damaged = _flip(f.read())
    with open(latest, "wb") as f:
        f.write(damaged)
    with pytest.warns(train.ResumeWarning, match=r"is damaged.*resuming from the previous checkpoint .*"
                                                 r"\(epoch 1\) instead; the damaged file is kept"), \
            pytest.warns(train.ResumeWarning, match=r"metrics.jsonl: dropped the row of epoch 2"):
        train.train(cfg, resume=True, progress=False)  # epoch 2 again, from the checkpoint of epoch 1
    with open(os.path.join(folder, train.DAMAGED), "rb") as f:
        assert f.read() == damaged
    again = _flat(train.read_checkpoint(latest)["params"])
    original = _flat(train.read_checkpoint(os.path.join(finished[1], train.CHECKPOINT))["params"])
    assert again.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(again[k], original[k])
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    # with both checkpoints damaged nothing is left: a clear error, also from the CLI
    for name in (train.CHECKPOINT, train.PREVIOUS):
        with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(300)
    with pytest.raises(train.CheckpointError, match=r"cannot resume: .*checkpoint.msgpack is truncated.*"
                       r"checkpoint.prev.msgpack is truncated.*delete the run folder"):
        train.train(cfg, resume=True, progress=False)


def test_cli_reports_a_damaged_checkpoint_with_exit_1_and_a_json_line(run, capsys):
    cfg, folder, trainer = run
    for name in (train.CHECKPOINT, train.PREVIOUS):
        open(os.path.join(folder, name), "wb").close()
    with pytest.raises(SystemExit) as info:
        train.main(["--config", DIGITS, "--no-progress", "--resume", "--set", f"out_dir={cfg['out_dir']}",
                    *[a for kv in TINY for a in ("--set", kv)]])
    assert info.value.code == 1
    captured = capsys.readouterr()
    last = json.loads(captured.out.strip().splitlines()[-1])
    assert last["kind"] == "checkpoint" and "is empty (0 bytes)" in last["error"]
    assert os.path.join(folder, train.CHECKPOINT) in captured.err and "Traceback" not in captured.err


# --- metrics.jsonl and config changes -----------------------------------------------------------------------


def test_a_torn_last_metrics_line_and_rows_after_the_checkpoint_are_dropped_on_resume(run):
    cfg, folder, trainer = run
    path = os.path.join(folder, "metrics.jsonl")
    with open(path) as f:
        rows = f.read()
    with open(path, "a") as f:  # a row of an epoch the checkpoint does not hold, then a torn append
        f.write(json.dumps({"epoch": 3, "train_loss": 1.0}) + "\n" + '{"epoch": 4, "train_lo')
    with pytest.warns(train.ResumeWarning,
                      match=r"metrics.jsonl: dropped the row of epoch 3 .*, the torn last line 4"):
        train.train(cfg, resume=True, progress=False)
    with open(path) as f:
        assert f.read() == rows
    with open(path, "w") as f:  # damaged in the middle: an error naming file and line
        lines = rows.splitlines()
        f.write(lines[0] + "\n" + lines[1][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(train.MetricsError, match=re.escape(path) + r", line 2: not a JSON metrics row"):
        train.train(cfg, resume=True, progress=False)


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(run, capsys):
    cfg, folder, trainer = run
    before = _snapshot(folder)
    changed = _cfg(cfg["out_dir"], "epochs=3", "optimizer.lr=0.05", "model.activation=tanh")
    with pytest.raises(train.ConfigChangedError) as info:
        train.train(changed, resume=True, progress=False)
    message = str(info.value)
    assert "epochs: 2 → 3" in message and "optimizer.lr: 0.03 → 0.05" in message
    assert 'model.activation: "relu" → "tanh"' in message and "--allow-config-change" in message
    assert os.path.join(folder, "config.yaml") in message
    assert _snapshot(folder) == before  # config.yaml not overwritten, nothing else touched
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", DIGITS, "--no-progress", "--resume", "--set", f"out_dir={cfg['out_dir']}",
                    *[a for kv in TINY for a in ("--set", kv)], "--set", "epochs=3"])
    assert exit_info.value.code == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kind"] == "config_changed" and "epochs: 2 → 3" in last["error"]
    assert _snapshot(folder) == before


def test_allow_config_change_resumes_with_the_new_config(run):
    cfg, folder, trainer = run
    more = _cfg(cfg["out_dir"], "epochs=3")
    with pytest.warns(train.ResumeWarning,
                      match=r"changed config \(--allow-config-change\):\n  epochs: 2 → 3"):
        summary = train.train(more, resume=True, allow_config_change=True, progress=False)
    assert summary["epochs"] == 3
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2, 3]
    with open(os.path.join(folder, "config.yaml")) as f:
        assert yaml.safe_load(f)["epochs"] == 3
    assert train.read_checkpoint(os.path.join(folder, train.CHECKPOINT))["epoch"] == 3


# --- divergence ---------------------------------------------------------------------------------------------

# LFP on the digits MLP at 100x the configured learning rate (0.03) without clipping: the outputs overflow
# within the first epoch (measured: epoch 1, step 12 at batch 16).
DIVERGE = ["optimizer.lr=3.0", "optimizer.clip_norm=null", "epochs=2", "data.subset=256", "batch_size=16"]


def _strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_divergence_stops_the_run_at_the_first_non_finite_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--config", DIGITS, "--no-progress", "--set", f"out_dir={tmp_path}",
                    *[a for kv in DIVERGE for a in ("--set", kv)]])
    assert info.value.code == train.EXIT_DIVERGED == 3
    captured = capsys.readouterr()
    last = _strict_json(captured.out.strip().splitlines()[-1])
    assert last["kind"] == "divergence" and last["epoch"] == 1
    assert "params/Dense_2/kernel" in last["nonfinite_leaves"]
    assert f"training diverged in epoch 1, step {last['step']}" in last["error"] in captured.err
    folder = config_lib.run_dir(_cfg(tmp_path, *DIVERGE))
    assert not os.path.exists(os.path.join(folder, train.CHECKPOINT))  # nothing non-finite was saved
    # the reported step is the first bad one: replay the epoch step by step with the trainer's own step
    trainer = train.Trainer(_cfg(tmp_path, *DIVERGE))
    order = np.random.default_rng([0, 0]).permutation(len(trainer.data.x_train))
    key = jax.random.fold_in(trainer.key, 1)
    state = (trainer.params, trainer.batch_stats, trainer.opt_state)
    for b in range(last["step"]):
        idx = order[b * 16:(b + 1) * 16]
        *state, m = trainer.train_step(*state, trainer.data.x_train[idx], trainer.data.y_train[idx],
                                       jax.random.fold_in(key, b))
        finite = np.asarray(m["finite"])
        assert finite.all() == (b < last["step"] - 1), (b, finite)
    assert bool(finite[0]) == last["loss_finite"] and bool(finite[1]) == last["reward_finite"]
    assert not np.isfinite(np.asarray(state[0]["Dense_2"]["kernel"])).all()
    with pytest.raises(train.DivergenceError, match=r"epoch 1, step \d+ \(update \d+ of the run\)"):
        trainer.run_epoch(0, progress=False)  # the Python API raises the same error


def test_the_printed_json_has_no_nan():
    line = train.json_line({"loss": float("nan"), "x": [float("inf"), 1.5]})
    assert line == '{"loss": null, "x": [null, 1.5]}'


# --- kills --------------------------------------------------------------------------------------------------

KILL_RUN = ["--config", TOY, "--no-progress", "--set", "epochs=30", "--set", "data.options.n=160",
            "--set", "data.subset=64", "--set", "batch_size=16", "--set", "eval_batch_size=64"]


def _env(cache: str, delay: float | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", train.WRITE_DELAY_ENV)}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,  # the compile once, not per restart
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if delay:
        env[train.WRITE_DELAY_ENV] = str(delay)
    return env


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    """Poll ``predicate`` every millisecond until it holds (True) or ``proc`` ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("the trainer made no progress")


def _kill_chain(out_dir: str, env: dict, kills: int, seed: int, log) -> dict:
    """Start the trainer with --resume and SIGKILL it, ``kills`` times, at moments picked by ``seed``:
    while the temporary checkpoint exists (the k-th write of that process), between the two renames of a
    checkpoint write, or a random time after the first epoch; then let it finish."""
    rng = random.Random(seed)
    folder = os.path.join(out_dir, "toy_mlp_lfp", "seed0")
    latest, prev = os.path.join(folder, train.CHECKPOINT), os.path.join(folder, train.PREVIOUS)
    tmp = train._tmp_name(latest)
    stats = {"kills": 0, "inside_write": 0, "no_latest": 0}
    for i in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *KILL_RUN, "--set",
                                 f"out_dir={out_dir}", "--resume"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
        mode = ("write", "renames", "random")[i % 3]
        if mode == "write":
            ok = True
            for k in range(rng.randint(1, 3)):  # inside the k-th checkpoint write of this process
                if k:
                    ok = ok and _wait_for(lambda: not os.path.exists(tmp), proc)
                ok = ok and _wait_for(lambda: os.path.exists(tmp), proc)
        elif mode == "renames":  # the latest checkpoint moved to checkpoint.prev.msgpack, the new not yet in
            ok = _wait_for(lambda: (os.path.exists(tmp) and os.path.exists(prev)
                                    and not os.path.exists(latest)), proc)
        else:
            start = os.path.getmtime(latest) if os.path.exists(latest) else 0
            ok = _wait_for(lambda t=start: os.path.exists(latest) and os.path.getmtime(latest) > t, proc)
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:  # finished before the kill: the run needs more epochs
            raise AssertionError(f"the trainer ended by itself ({proc.returncode}) before kill {i}")
        proc.kill()
        proc.wait()
        stats["kills"] += 1
        stats["inside_write"] += os.path.exists(tmp)
        stats["no_latest"] += os.path.exists(tmp) and not os.path.exists(latest)
        assert ok or mode == "random"
    final = subprocess.run([sys.executable, "-m", "experiments.train", *KILL_RUN, "--set",
                            f"out_dir={out_dir}", "--resume"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    stats["summary"] = json.loads(final.stdout.strip().splitlines()[-1])
    stats["folder"] = folder
    return stats


def _metrics(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"} for line in f]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_resume_give_the_uninterrupted_run(tmp_path):
    cache = str(tmp_path / "jax_cache")
    reference = subprocess.Popen([sys.executable, "-m", "experiments.train", *KILL_RUN, "--set",
                                  f"out_dir={tmp_path / 'reference'}"], cwd=ROOT, env=_env(cache, None),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log, concurrent.futures.ThreadPoolExecutor(2) as pool:
        env = _env(cache, 0.03)  # 30 ms inside each checkpoint write: a window the kills can hit
        chains = [pool.submit(_kill_chain, str(tmp_path / f"killed{c}"), env, 10, c, log) for c in range(2)]
        results = [c.result() for c in chains]
    print({k: [r[k] for r in results] for k in ("kills", "inside_write", "no_latest")})  # seen with -s
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    ref_folder = json.loads(out.strip().splitlines()[-1])["run_dir"]
    assert sum(r["kills"] for r in results) >= 20
    assert sum(r["inside_write"] for r in results) >= 6      # killed with a half-done checkpoint write
    assert sum(r["no_latest"] for r in results) >= 3         # ... and with no checkpoint.msgpack at all
    log_text = log_path.read_text()
    assert "resuming from the previous checkpoint" in log_text and "Traceback" not in log_text
    want = train.read_checkpoint(os.path.join(ref_folder, train.CHECKPOINT))
    for r in results:
        got = train.read_checkpoint(os.path.join(r["folder"], train.CHECKPOINT))
        assert got["epoch"] == want["epoch"] == 30
        g, w = _flat({k: got[k] for k in ("params", "opt_state")}), _flat({k: want[k] for k in ("params",
                                                                                            "opt_state")})
        assert g.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
        assert _metrics(r["folder"]) == _metrics(ref_folder)  # one row per epoch, the same numbers
        assert r["summary"]["test_accuracy"] == json.loads(out.strip().splitlines()[-1])["test_accuracy"]
