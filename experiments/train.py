"""Train one run: ``python -m experiments.train --config configs/<name>.yaml [--set key=value ...]
[--resume [--allow-config-change]]``.

Both methods share data order, initialisation, model and optimiser; they differ in the update
direction: ``method: lfp`` uses ``lfp_jax.lfp_value_and_grad`` (-feedback of the configured reward),
``method: gd`` the gradient of the mean cross-entropy.

``dtype: bfloat16`` runs the model in bfloat16: parameters, BatchNorm statistics and optimiser state stay
float32 (master weights); the model function casts parameters and inputs to bfloat16 on entry and its
logits back to float32 on exit, so the forward pass and the LFP (or gradient) backward pass run in
bfloat16 and the casts' transposes hand optax a float32 direction (LFP: ``|θ| ⊙ c_θ`` with the float32
``θ`` and the bfloat16 ``c_θ``).

The config is checked against the schema of :mod:`experiments.config` before anything runs (unknown
keys, types, ranges; every message names the dotted key).

Files in the run folder ``<out_dir>/<name>/seed<seed>/``
--------------------------------------------------------
``config.yaml``
    the resolved config, written (atomically) once the run's checks have passed.
``metrics.jsonl``
    one JSON row per finished epoch, appended and flushed to disk (``fsync``) before that epoch's
    checkpoint is written. Non-finite numbers are written as ``null``.
``checkpoint.msgpack``
    the state after the last finished epoch: a header line ``LFPJAX-CHECKPOINT <version>
    sha256=<hex> bytes=<n>`` and then the flax msgpack payload (params, BatchNorm statistics, optimiser
    state, epoch). It is written to a temporary file in the same folder, flushed and ``fsync``-ed, and
    only then renamed onto the name (the folder is ``fsync``-ed too), so a kill or a full disk during
    the write never damages the checkpoint that was there.
``checkpoint.prev.msgpack``
    the checkpoint before it (the previous epoch), kept until the new one is complete.
``summary.json``
    the run's summary, also the last line printed.

Resume
------
``--resume`` continues from the checkpoint. It first compares the resolved config with the run's
``config.yaml`` (all keys but ``out_dir``) and refuses, before anything is written, if they differ,
listing each differing key as ``old → new``; ``--allow-config-change`` accepts intended changes (more
epochs, say: the learning-rate schedule then follows the new config). A checkpoint is verified before
it is used: integrity (format version, length and SHA-256 of the payload), structure (every array must
have the shape and dtype that the config's model and optimiser have) and finite values. If
``checkpoint.msgpack`` is damaged or missing and ``checkpoint.prev.msgpack`` passes these checks, the run
resumes from the previous checkpoint (one epoch earlier) with a :class:`ResumeWarning`; the damaged
file is kept as ``checkpoint.damaged.msgpack`` and ``checkpoint.msgpack`` is written again from the
previous one, so readers of the run folder (``experiments.explain``, the studies) find it.
``metrics.jsonl`` is then cut back to the checkpoint's epoch: rows beyond it and a torn last line (a
kill during the append) are dropped with a warning; a damaged line in the middle is an error naming the
file and line. Without a usable checkpoint the error says so; deleting the run folder (or running
without ``--resume``) starts the run again.

Divergence
----------
A non-finite loss, reward, parameter, BatchNorm statistic or optimiser state stops the run with a
:class:`DivergenceError` naming the epoch, the step (the first bad one) and the non-finite leaves by tree
path. Each jitted step returns per-leaf finiteness flags; the host reads the flags of step ``b - 1``
after dispatching step ``b``, so the check does not stall the pipeline. A non-finite state is never
checkpointed.

Output and exit codes
---------------------
The last line printed on stdout is always one valid JSON object (non-finite floats become ``null``):
the summary (``test_accuracy``, ``train_seconds``, ``method``, ``seed``, ...) on success, or
``{"error": "<message>", "kind": ...}`` on a handled failure, whose message also goes to stderr. Exit
code 0: finished; 1: a config mistake, a run folder that cannot be resumed as asked (changed config,
damaged checkpoint or metrics) or a missing dataset; 3: the training diverged (the JSON line then also
holds ``epoch``, ``step``, ``global_step`` and ``nonfinite_leaves``). (2 is argparse's usage error.)

Progress
--------
On a terminal (stderr is a TTY) each epoch shows a progress bar on stderr; when stderr goes to a file
or a pipe there is no bar (its carriage-return updates would fill the log), only the line printed after
each epoch (stdout: ``<name> seed <s> epoch <e>: train acc ..., test acc ...``). ``--no-progress`` turns
off both.

Test hook
---------
``LFP_JAX_CHECKPOINT_WRITE_DELAY=<seconds>`` sleeps that long after the temporary checkpoint file is
written and again between moving the latest checkpoint to ``checkpoint.prev.msgpack`` and renaming the
new one onto ``checkpoint.msgpack``, so that a test can kill the trainer inside the checkpoint write
(tests/test_reliability.py, ``pytest --slow``). Not meant for real runs.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm import tqdm

import lfp_jax
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, optim

CHECKPOINT = "checkpoint.msgpack"
PREVIOUS = "checkpoint.prev.msgpack"
DAMAGED = "checkpoint.damaged.msgpack"
MAGIC = b"LFPJAX-CHECKPOINT"
FORMAT_VERSION = 1
WRITE_DELAY_ENV = "LFP_JAX_CHECKPOINT_WRITE_DELAY"
CONFIG_IGNORED = ("out_dir",)  # keys that may differ between a run's config.yaml and --resume's config
EXIT_ERROR, EXIT_DIVERGED = 1, 3


# --- errors ------------------------------------------------------------------------------------------


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the file and how to recover."""


class CheckpointError(RunFolderError):
    """A checkpoint that is damaged (truncated, flipped bytes), holds non-finite values or does not match
    the config's model and optimiser."""


class ConfigChangedError(RunFolderError):
    """``--resume`` with a config that differs from the run's ``config.yaml`` (without
    ``--allow-config-change``)."""


class MetricsError(RunFolderError):
    """A ``metrics.jsonl`` damaged in the middle (a torn last line is repaired on resume instead)."""


class ResumeWarning(UserWarning):
    """Something a resume repaired or fell back on: a dropped metrics row, the previous checkpoint."""


class DivergenceError(RuntimeError):
    """The training produced non-finite numbers. ``epoch`` and ``step`` are 1-based (the step within the
    epoch), ``global_step`` counts updates over the run; ``leaves`` are the tree paths of the non-finite
    state after the update (``params/...``, ``batch_stats/...``, ``opt_state/...``)."""

    def __init__(self, epoch: int, step: int, global_step: int, loss_finite: bool, reward_finite: bool,
                 leaves: list[str]):
        self.epoch, self.step, self.global_step = epoch, step, global_step
        self.loss_finite, self.reward_finite, self.leaves = loss_finite, reward_finite, leaves
        what = [w for w, ok in (("loss", loss_finite), ("reward", reward_finite)) if not ok]
        parts = [f"non-finite {' and '.join(what)}"] if what else []
        if leaves:
            shown = ", ".join(leaves[:8]) + (f" and {len(leaves) - 8} more" if len(leaves) > 8 else "")
            parts.append(f"non-finite after the update: {shown}")
        super().__init__(f"training diverged in epoch {epoch}, step {step} (update {global_step} of the "
                         f"run): {'; '.join(parts)}. No checkpoint of this state was written; lower the "
                         f"learning rate or set optimizer.clip_norm.")

    def to_json(self) -> dict:
        return {"error": str(self), "kind": "divergence", "epoch": self.epoch, "step": self.step,
                "global_step": self.global_step, "loss_finite": self.loss_finite,
                "reward_finite": self.reward_finite, "nonfinite_leaves": self.leaves}


def _warn(message: str) -> None:
    warnings.warn(message, ResumeWarning, stacklevel=3)


# --- files that survive a kill -------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tmp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp")


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``path`` so that it holds either its old or its new content, never a part: a temporary file
    in the same folder, flushed and fsync-ed, renamed onto ``path``, the folder fsync-ed. A failure
    (a full disk) leaves the old file and removes the temporary one."""
    tmp = _tmp_name(path)
    try:
        _write_synced(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _test_delay() -> None:
    """The test hook ``LFP_JAX_CHECKPOINT_WRITE_DELAY`` (see the module docstring)."""
    delay = os.environ.get(WRITE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def json_safe(obj):
    """``obj`` with non-finite floats replaced by ``None``, so that ``json.dumps(allow_nan=False)`` writes
    valid JSON (``NaN`` and ``Infinity`` are not JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return None
    return obj


def json_line(obj) -> str:
    return json.dumps(json_safe(obj), allow_nan=False)


# --- checkpoint format -----------------------------------------------------------------------------------


def encode_checkpoint(payload: bytes) -> bytes:
    """The checkpoint file: a header line with format version, SHA-256 and length of ``payload``, then
    ``payload`` (flax msgpack)."""
    digest = hashlib.sha256(payload).hexdigest()
    return b"%s %d sha256=%s bytes=%d\n" % (MAGIC, FORMAT_VERSION, digest.encode(), len(payload)) + payload


def decode_checkpoint(blob: bytes, source: str) -> dict:
    """The state dict of a checkpoint file's bytes, after checking its integrity; raises
    :class:`CheckpointError` naming ``source`` if the file is empty, truncated, altered or not a
    checkpoint. A file without the header (written by an older trainer) is read with a warning."""
    if not blob:
        raise CheckpointError(f"{source} is empty (0 bytes): its write was interrupted")
    if not blob.startswith(MAGIC):
        try:  # a checkpoint of the trainer before the header: plain flax msgpack
            state = flax.serialization.msgpack_restore(blob)
        except Exception as e:
            raise CheckpointError(f"{source} is not an lfp_jax checkpoint (no {MAGIC.decode()} header, "
                                  f"not msgpack: {e})") from None
        if not isinstance(state, dict) or not {"params", "opt_state", "epoch"} <= set(state):
            raise CheckpointError(f"{source} is not an lfp_jax checkpoint (no {MAGIC.decode()} header)")
        _warn(f"{source} has no integrity header (written by an older trainer): its bytes cannot be "
              f"verified, only its structure and values")
        return state
    newline = blob.find(b"\n", 0, 256)
    fields = blob[:newline].split(b" ") if newline > 0 else []
    try:
        version = int(fields[1])
        digest = fields[2].removeprefix(b"sha256=").decode()
        length = int(fields[3].removeprefix(b"bytes="))
        assert len(fields) == 4 and len(digest) == 64 and int(digest, 16) >= 0
    except (IndexError, ValueError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{source} has a damaged header: {blob[:80]!r}") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source} has checkpoint format version {version}; this trainer reads "
                              f"version {FORMAT_VERSION}")
    payload = blob[newline + 1:]
    if len(payload) != length:
        raise CheckpointError(f"{source} is truncated or extended: the header promises {length} bytes of "
                              f"payload, the file has {len(payload)}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{source} is damaged: the SHA-256 of its payload does not match its header")
    try:
        state = flax.serialization.msgpack_restore(payload)
    except Exception as e:  # a payload that hashes right but does not parse: written wrongly
        raise CheckpointError(f"{source}: the payload does not parse as msgpack ({e})") from None
    if not isinstance(state, dict) or not {"params", "opt_state", "epoch"} <= set(state):
        raise CheckpointError(f"{source} does not hold a training state (params, opt_state, epoch)")
    return state


def read_checkpoint(path: str) -> dict:
    """The verified (integrity only) state dict of the checkpoint file ``path``: nested dicts of numpy
    arrays with ``params``, ``batch_stats``, ``opt_state`` and ``epoch``."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    return decode_checkpoint(blob, path)


def _flatten(tree, prefix: str = "") -> dict:
    """``{"a/b/c": leaf}`` of a state dict (nested dicts); empty dicts and ``None`` are kept as leaves so
    that the structure compares too."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): ({} if isinstance(tree, dict) else tree)}


def _describe_leaf(x) -> str:
    if x is None or isinstance(x, dict):
        return repr(x)
    a = np.asarray(x)
    return f"{a.dtype}{list(a.shape)}"


def nonfinite_leaves(state: dict) -> list[str]:
    """Tree paths of the floating-point leaves of a state dict that hold NaN or inf."""
    return [path for path, x in _flatten(state).items()
            if x is not None and not isinstance(x, dict) and np.issubdtype(np.asarray(x).dtype, np.inexact)
            and not np.all(np.isfinite(np.asarray(x)))]


def _path_name(path) -> str:
    """``params/Dense_0/kernel`` of a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _float_leaves(tree) -> list:
    """(tree path, leaf) of the floating-point leaves of ``tree``, in a fixed order (the step's finiteness
    flags and their names on the host come from the same traversal)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(_path_name(p), x) for p, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def reward_fn(cfg: dict):
    """The configured reward: a function of ``lfp_jax.rewards`` with its options; ``scale`` multiplies it
    (the reference divides its spike reward by the number of time steps)."""
    spec = dict(cfg["reward"])
    name = spec.pop("name")
    scale = spec.pop("scale", None)
    fn = getattr(lfp_jax.rewards, name, None)
    if fn is None or name not in lfp_jax.rewards.__all__:
        raise ValueError(f"unknown reward {name!r}; choose one of {lfp_jax.rewards.__all__}")
    fn = functools.partial(fn, **spec) if spec else fn
    if scale is None:
        return fn
    return lambda z, y: fn(z, y) * scale


def composite_of(cfg: dict) -> lfp_jax.Composite:
    """The LFP composite of a run: ``lfp_epsilon`` (AttnLRP's rules at softmax and product sites, or with
    ``products: gradient`` the plain gradient at products), ``reference_vit`` (the reference's
    transformer behaviour: the plain gradient at softmax, products and sums), or ``gradient_control``
    (a control for studies, not LFP's rules: the gradient at products, activations and normalisations
    too, so that every rule is the gradient in normalised form and the feedback is ``-|θ| ⊙ ∇``)."""
    name = cfg.get("composite", "lfp_epsilon")
    if name == "lfp_epsilon":
        return lfp_jax.lfp_epsilon(cfg["epsilon"], dropout_rescale=cfg["dropout_rescale"],
                                   products=cfg.get("products", "uniform"))
    if name == "reference_vit":
        return lfp_jax.composites.reference_vit(cfg["epsilon"])
    if name == "gradient_control":  # every rule the gradient: feedback -|θ| ⊙ ∇ (a control)
        base = lfp_jax.lfp_epsilon(cfg["epsilon"], dropout_rescale=cfg["dropout_rescale"],
                                   products="gradient")
        return base.with_rules((lfp_jax.Match(kind="activation"), lfp_jax.rules.Gradient()),
                               (lfp_jax.Match(kind="normalization"), lfp_jax.rules.Gradient()))
    raise ValueError(f"composite must be one of {config_lib.COMPOSITES}, got {name!r}")


def cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves cast to ``dtype`` (other leaves, and ``None``, as they are)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, tree)


class Trainer:
    """Everything of one run but the loop: data, model, optimiser, jitted step and evaluation."""

    def __init__(self, cfg: dict, dataset: data_lib.Dataset | None = None, *, fresh: bool = True):
        """``fresh=False``: the state is about to be replaced by a checkpoint of this run (``--resume``,
        or loading a trained run), so ``init.from`` is not read; the model's own initialisation is
        the placeholder."""
        self.cfg = config_lib.validate(cfg)
        d = cfg["data"]
        self.data = dataset or data_lib.load(d["name"], root=d.get("root"), seed=cfg["seed"],
                                             **(d.get("options") or {}))
        if d.get("classes"):
            self.data = self.data.select_classes(d["classes"])
        if d.get("subset"):
            self.data = self.data.subset(int(d["subset"]))
        if d.get("train_examples"):  # fewer labelled examples; the test set stays whole
            self.data = self.data.subset(int(d["train_examples"]), len(self.data.x_test))
        model_kw = {k: v for k, v in cfg["model"].items() if k != "name"}
        self.model = models.build(cfg["model"]["name"], self.data.num_classes, **model_kw)
        self.spiking = cfg["model"]["name"] in models.SPIKING
        if self.spiking and not cfg["reward"]["name"].startswith("spike_"):
            raise ValueError(f"model {cfg['model']['name']!r} outputs spike trains (T, batch, classes): "
                             f"set reward.name to a spike reward (spike_rate_coded or "
                             f"spike_count_softmax_loss), not {cfg['reward']['name']!r}")
        self.key = jax.random.key(cfg["seed"])
        self.compute_dtype = jnp.dtype(cfg.get("dtype") or "float32")
        variables = self.model.init(self.key, self._inputs(self.data.x_train[:2], self.key), train=False)
        self.params, self.batch_stats = variables["params"], variables.get("batch_stats")
        if fresh:
            self.params, self.batch_stats = self._initial(self.params, self.batch_stats)
        self.steps_per_epoch = max(len(self.data.x_train) // cfg["batch_size"], 1)
        self.optimizer = optim.make(cfg["optimizer"], cfg["epochs"] * self.steps_per_epoch)
        self.opt_state = self.optimizer.init(self.params)
        # names of the step's finiteness flags: loss, reward, then every float leaf of the state
        self.flag_names = ["loss", "reward"] + [name for name, _ in _float_leaves(self._tracked(
            self.params, self.batch_stats, self.opt_state))]
        self.train_step = jax.jit(self._make_step())
        self.predict = jax.jit(self._predict)
        self.eval_key = jax.random.fold_in(self.key, 2**31 - 1)  # rate coding of test batches

    def _initial(self, params, batch_stats):
        """The initial parameters and BatchNorm statistics under ``cfg["init"]``.

        * ``scale``: every initial float parameter multiplied by it (kernels and biases; 1 keeps the
          model's initialisation). LFP's feedback is proportional to ``|θ|``, so this sets how fast
          each weight can move at the start.
        * ``from``: a run folder (its ``checkpoint.msgpack``) or a checkpoint file of the trainer: the
          parameters and statistics start from those, verified like a ``--resume`` (integrity, finite
          values, and every array's shape and dtype must be this model's). The optimiser starts
          afresh. ``reset`` names top-level parameter collections (``Dense_2``, see ``describe``) that
          keep their fresh initialisation instead: a new head for a new task. ``scale`` applies to the
          fresh initialisation only.
        """
        init = self.cfg["init"]
        if init["scale"] != 1:
            params = jax.tree.map(lambda p: p * jnp.asarray(init["scale"], p.dtype)
                                  if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        if not init["from"]:
            return params, batch_stats
        source = init["from"]
        path = os.path.join(source, CHECKPOINT) if os.path.isdir(source) else source
        if not os.path.exists(path):
            raise CheckpointError(
                f"init.from: no run folder with a {CHECKPOINT} and no checkpoint file at {source!r} "
                f"(relative paths are read from {os.getcwd()}): train the run to start from first, or "
                f"correct the path")
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"init.from: {e}") from None
        loaded = {"params": state["params"], "batch_stats": state.get("batch_stats")}
        fresh = {"params": flax.serialization.to_state_dict(params),
                 "batch_stats": flax.serialization.to_state_dict(batch_stats)}
        unknown = sorted(set(init["reset"]) - set(fresh["params"]))
        if unknown:
            raise config_lib.ConfigError(f"init.reset: {unknown} are not parameters of this model; its "
                                         f"top-level parameters are {sorted(fresh['params'])}")
        for part in ("params", "batch_stats"):
            for name in init["reset"]:
                if isinstance(loaded[part], dict) and isinstance(fresh[part], dict) and name in fresh[part]:
                    loaded[part] = {**loaded[part], name: fresh[part][name]}
        self._check_structure(loaded, fresh, f"init.from: {path}", advice=(
            "the checkpoint's model differs from this config's. Start from a run of the same model; a "
            "layer whose shape changes with the task (the classifier of another number of classes) "
            f"belongs in init.reset (top-level parameters: {sorted(fresh['params'])})"))
        bad = nonfinite_leaves(loaded)
        if bad:
            raise CheckpointError(f"init.from: {path} holds non-finite values in {', '.join(bad[:8])}")
        restored = flax.serialization.from_state_dict({"params": params, "batch_stats": batch_stats}, loaded)
        return restored["params"], restored["batch_stats"]

    # -- the step -----------------------------------------------------------------------------

    @staticmethod
    def _tracked(params, batch_stats, opt_state) -> dict:
        """The state whose finiteness the step reports (and a checkpoint must have)."""
        return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}

    def _inputs(self, x, key):
        """The model's input for images ``x`` (rate-coded frames for ``encoding: rate`` spiking models)."""
        return models.encode_inputs(self.model, x, key)

    def _logits(self, out):
        return models.logits_of(self.cfg["model"]["name"], out)

    def _apply(self, params, batch_stats, x, key, train: bool):
        """The model in the compute dtype: float32 state in, float32 logits and statistics out."""
        if self.compute_dtype != jnp.float32:
            params, batch_stats, x = cast_floats((params, batch_stats, x), self.compute_dtype)
            out, new_stats = self._apply_model(params, batch_stats, x, key, train)
            return out.astype(jnp.float32), cast_floats(new_stats, jnp.float32)
        return self._apply_model(params, batch_stats, x, key, train)

    def _apply_model(self, params, batch_stats, x, key, train: bool):
        variables = {"params": params}
        if batch_stats is not None:
            variables["batch_stats"] = batch_stats
            out, updates = self.model.apply(variables, x, train=train, rngs={"dropout": key},
                                            mutable=["batch_stats"])
            return out, updates["batch_stats"]
        return self.model.apply(variables, x, train=train, rngs={"dropout": key}), None

    def _make_step(self):
        cfg = self.cfg
        has_bn = self.batch_stats is not None
        reward = reward_fn(cfg)
        noise = cfg["input_noise"]

        if cfg["method"] == "lfp":
            def fun(params, batch_stats, x, key):
                out, new_stats = self._apply(params, batch_stats, x, key, True)
                return (out, new_stats) if has_bn else out

            direction = lfp_jax.lfp_value_and_grad(
                fun, reward, reward_argnums=(4,), has_aux=has_bn, allow_frozen=True,
                composite=composite_of(cfg))

            def update_direction(params, batch_stats, x, key, y):
                value, neg_feedback = direction(params, batch_stats, x, key, y)
                out, new_stats = value if has_bn else (value, None)
                return out, new_stats, neg_feedback
        else:
            def loss_fn(params, batch_stats, x, key, y):
                out, new_stats = self._apply(params, batch_stats, x, key, True)
                if self.spiking:  # surrogate-gradient descent: cross-entropy of the spikes per step
                    loss = models.ce_rate_loss(out, y)
                else:
                    loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
                return loss, (out, new_stats)

            grad_fn = jax.grad(loss_fn, has_aux=True)

            def update_direction(params, batch_stats, x, key, y):
                grads, (out, new_stats) = grad_fn(params, batch_stats, x, key, y)
                return out, new_stats, grads

        def step(params, batch_stats, opt_state, x, y, key):
            k_noise, k_mask, k_drop = jax.random.split(key, 3)
            if noise["std"]:
                hit = jax.random.uniform(k_mask, (x.shape[0],) + (1,) * (x.ndim - 1)) < noise["prob"]
                x = x + hit * noise["std"] * jax.random.normal(k_noise, x.shape, x.dtype)
            x = self._inputs(x, jax.random.fold_in(key, 3))
            out, new_stats, direction_ = update_direction(params, batch_stats, x, k_drop, y)
            updates, opt_state = self.optimizer.update(direction_, opt_state, params)
            params = optax.apply_updates(params, updates)
            logits = self._logits(out)
            new_stats = new_stats if has_bn else batch_stats
            metrics = {
                "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
                "reward": jnp.sum(reward(out, y)) / y.shape[0],  # per sample, summed over outputs
            }
            # one flag per name in self.flag_names: a few reductions, read by the host a step later
            leaves = [x for _, x in _float_leaves(self._tracked(params, new_stats, opt_state))]
            metrics["finite"] = jnp.stack([jnp.isfinite(metrics["loss"]), jnp.isfinite(metrics["reward"])]
                                          + [jnp.all(jnp.isfinite(x)) for x in leaves])
            return params, new_stats, opt_state, metrics

        return step

    def _predict(self, params, batch_stats, x, key):
        x = self._inputs(x, key)
        return self._logits(self._apply(params, batch_stats, x, self.key, False)[0])

    # -- evaluation and state -----------------------------------------------------------------

    def evaluate(self, params=None) -> dict:
        params = self.params if params is None else params
        bs = self.cfg["eval_batch_size"]
        correct, loss = 0, 0.0
        for i in range(0, len(self.data.x_test), bs):
            logits = self.predict(params, self.batch_stats, self.data.x_test[i:i + bs],
                                  jax.random.fold_in(self.eval_key, i))
            y = self.data.y_test[i:i + bs]
            correct += int(jnp.sum(jnp.argmax(logits, -1) == y))
            loss += float(optax.softmax_cross_entropy_with_integer_labels(logits, y).sum())
        n = self.data.y_test.size  # predictions: one per image, or one per character
        out = {"test_accuracy": correct / n, "test_loss": loss / n}
        if self.data.y_test.ndim > 1:  # language modelling: cross-entropy in bits per character
            out["test_bits_per_char"] = out["test_loss"] / np.log(2)
        return out

    def state(self, epoch: int) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats, "opt_state": self.opt_state,
                "epoch": epoch}

    def checkpoint_bytes(self, epoch: int) -> bytes:
        """The checkpoint file of the current state (see the module docstring); refuses a non-finite
        state, which could only be resumed into the same divergence."""
        state = flax.serialization.to_state_dict(self.state(epoch))
        bad = nonfinite_leaves(state)
        if bad:
            raise CheckpointError(f"refusing to checkpoint a non-finite state (epoch {epoch}): {bad[:8]}")
        return encode_checkpoint(flax.serialization.msgpack_serialize(state))

    def save_checkpoint(self, folder: str, epoch: int) -> str:
        """Write ``folder/checkpoint.msgpack`` so that a kill at any moment leaves a complete checkpoint:
        the new one goes to a temporary file first (fsync-ed); the latest one becomes
        ``checkpoint.prev.msgpack``; the temporary file is renamed onto ``checkpoint.msgpack``; the folder
        is fsync-ed. A kill between the two renames leaves the previous checkpoint, from which
        ``--resume`` continues."""
        blob = self.checkpoint_bytes(epoch)
        latest, prev = os.path.join(folder, CHECKPOINT), os.path.join(folder, PREVIOUS)
        tmp = _tmp_name(latest)
        try:
            _write_synced(tmp, blob)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _test_delay()
        if os.path.exists(latest):
            os.replace(latest, prev)
            _test_delay()
        os.replace(tmp, latest)
        _fsync_dir(folder)
        return latest

    def load_state(self, blob: bytes, source: str = "the checkpoint") -> int:
        """Restore the state from a checkpoint file's bytes; returns its epoch. Verifies integrity,
        structure (every array has the shape and dtype of this config's model and optimiser) and finite
        values; raises :class:`CheckpointError` naming ``source`` otherwise."""
        restored = decode_checkpoint(blob, source)
        target = flax.serialization.to_state_dict(self.state(0))
        self._check_structure(restored, target, source)
        bad = nonfinite_leaves({k: restored[k] for k in ("params", "batch_stats", "opt_state")})
        if bad:
            shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
            raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {shown}")
        epoch = restored["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int | np.integer) or epoch < 0:
            raise CheckpointError(f"{source} has an invalid epoch {epoch!r}")
        restored = flax.serialization.from_state_dict(self.state(0), restored)
        self.params, self.batch_stats = restored["params"], restored["batch_stats"]
        self.opt_state = restored["opt_state"]
        return int(epoch)

    def load_checkpoint(self, path: str) -> int:
        """:meth:`load_state` of the file ``path``."""
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
        return self.load_state(blob, path)

    @staticmethod
    def _check_structure(restored: dict, target: dict, source: str, advice: str | None = None) -> None:
        got, want = _flatten(restored), _flatten(target)
        got.pop("epoch", None)
        want.pop("epoch", None)
        problems = [f"{k}: missing in the checkpoint" for k in want if k not in got]
        problems += [f"{k}: in the checkpoint, not in this model/optimiser" for k in got if k not in want]
        for k in want:
            if k in got and _describe_leaf(got[k]) != _describe_leaf(want[k]):
                problems.append(f"{k}: {_describe_leaf(got[k])} in the checkpoint, {_describe_leaf(want[k])} "
                                f"for this config")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            advice = advice or ("the config (model, optimizer, dtype) or the code changed since it was "
                                "written. Resume with the config of the run (its config.yaml), or start a "
                                "new run (another name or out_dir, or delete the run folder)")
            raise CheckpointError(
                f"{source} does not match the model and optimiser of this config ({shown}): {advice}")

    def run_epoch(self, epoch: int, progress: bool = True) -> dict:
        """One epoch; ``progress``: a progress bar on stderr, drawn only where stderr is a terminal."""
        cfg = self.cfg
        order = np.random.default_rng([cfg["seed"], epoch]).permutation(len(self.data.x_train))
        epoch_key = jax.random.fold_in(self.key, epoch + 1)
        sums = {"loss": 0.0, "accuracy": 0.0, "reward": 0.0}
        progress = progress and stderr_is_terminal()
        bar = tqdm(range(self.steps_per_epoch), desc=f"{cfg['name']} epoch {epoch + 1}/{cfg['epochs']}",
                   leave=False, disable=not progress, mininterval=0.5, file=sys.stderr)
        pending = None  # (step, finiteness flags) of the step before, read once the next one is queued
        for b in bar:
            idx = order[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            self.params, self.batch_stats, self.opt_state, m = self.train_step(
                self.params, self.batch_stats, self.opt_state, self.data.x_train[idx],
                self.data.y_train[idx], jax.random.fold_in(epoch_key, b))
            if pending is not None:
                self._check_finite(epoch, *pending)
            pending = (b, m["finite"])
            sums = {k: sums[k] + m[k] for k in sums}
            if progress and (b % 25 == 0 or b == self.steps_per_epoch - 1):
                bar.set_postfix({k: f"{float(v) / (b + 1):.3f}" for k, v in sums.items()})
        self._check_finite(epoch, *pending)
        return {f"train_{k}": float(v) / self.steps_per_epoch for k, v in sums.items()}

    def _check_finite(self, epoch: int, b: int, flags) -> None:
        """Raise :class:`DivergenceError` if step ``b`` of ``epoch`` (0-based) flagged a non-finite value."""
        flags = np.asarray(flags)
        if flags.all():
            return
        leaves = [name for name, ok in zip(self.flag_names[2:], flags[2:]) if not ok]
        order = {"params": 0, "batch_stats": 1, "opt_state": 2}
        leaves.sort(key=lambda name: order.get(name.split("/")[0], 3))  # parameters first, stable within
        raise DivergenceError(epoch + 1, b + 1, epoch * self.steps_per_epoch + b + 1, bool(flags[0]),
                              bool(flags[1]), leaves)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: progress bars are drawn only there (in a file or a pipe their
    carriage-return updates would pile up)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced by an object without isatty, or closed
        return False


def _flat_config(cfg, prefix: str = "") -> dict:
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): cfg}


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old → new`` for every dotted key (but :data:`CONFIG_IGNORED`) where two configs differ."""
    a, b = _flat_config(old), _flat_config(new)
    show = lambda d, key: json.dumps(d[key]) if key in d else "(absent)"  # noqa: E731
    return [f"{key}: {show(a, key)} → {show(b, key)}" for key in sorted(set(a) | set(b))
            if key.split(".")[0] not in CONFIG_IGNORED and a.get(key, KeyError) != b.get(key, KeyError)]


def _check_config(out: str, cfg: dict, allow_change: bool) -> None:
    """Refuse (before anything is written) to resume the run in ``out`` with a config other than its
    ``config.yaml``, unless ``allow_change``."""
    path = os.path.join(out, "config.yaml")
    try:
        with open(path) as f:
            stored = yaml.safe_load(f)
        if not isinstance(stored, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as e:
        if allow_change:
            _warn(f"cannot read {path} ({e}); resuming with the given config (--allow-config-change)")
            return
        raise ConfigChangedError(f"--resume: cannot check the config against the run's {path} ({e}). "
                                 f"Pass --allow-config-change to resume with the given config, or delete "
                                 f"the run folder {out} to start again") from None
    # keys added to the trainer after the run was written count at their defaults, not as changes
    changes = config_changes(config_lib.merge(config_lib.DEFAULTS, stored), cfg)
    if not changes:
        return
    listed = "\n  ".join(changes)
    if allow_change:
        _warn(f"resuming {out} with a changed config (--allow-config-change):\n  {listed}")
        return
    raise ConfigChangedError(
        f"--resume: the config differs from the run's {path} (old → new):\n  {listed}\nPass "
        f"--allow-config-change to resume with the new config, or give the run another name or out_dir")


def _resume_checkpoint(trainer: Trainer, out: str) -> int:
    """Load the run's checkpoint, falling back (with a warning) to the previous one if the latest is
    damaged or missing; returns the epoch reached."""
    latest, prev = os.path.join(out, CHECKPOINT), os.path.join(out, PREVIOUS)
    problems = []
    if os.path.exists(latest):
        try:
            return trainer.load_checkpoint(latest)
        except CheckpointError as e:
            problems.append(str(e))
    else:
        problems.append(f"{latest} is missing (a checkpoint write was interrupted)")
    if os.path.exists(prev):
        try:
            epoch = trainer.load_checkpoint(prev)
        except CheckpointError as e:
            problems.append(str(e))
        else:
            if os.path.exists(latest):  # kept for a look, out of the way of the next checkpoint's renames
                os.replace(latest, os.path.join(out, DAMAGED))
            _warn(f"{problems[0]}; resuming from the previous checkpoint {prev} (epoch {epoch}) instead"
                  + (f"; the damaged file is kept as {os.path.join(out, DAMAGED)}" if "missing" not in
                     problems[0] else ""))
            return epoch
    raise CheckpointError(
        "cannot resume: " + "; ".join(problems) + f". No usable checkpoint is left in {out}: delete the run "
        f"folder (or run without --resume) to start the run again")


def _repair_metrics(path: str, epoch: int) -> float:
    """Cut ``metrics.jsonl`` back to the rows of epochs ``≤ epoch`` (those of the checkpoint) and drop a
    torn last line, with a warning, rewriting the file atomically; returns the training seconds so far.
    A damaged line before the last is an error naming the file and line."""
    if not os.path.exists(path):
        if epoch:
            _warn(f"{path} is missing: the epochs before {epoch} have no metrics rows")
        return 0.0
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, dropped = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                raise ValueError("not a row with an epoch")
        except ValueError:
            if i == last:
                dropped.append(f"the torn last line {i + 1} ({line[:60]!r})")
                continue
            raise MetricsError(f"{path}, line {i + 1}: not a JSON metrics row ({line[:60]!r}). The file is "
                               f"damaged before its last line: repair or delete that line, or delete the run "
                               f"folder to start again") from None
        if row["epoch"] > epoch:
            dropped.append(f"the row of epoch {row['epoch']} (after the checkpoint's epoch {epoch})")
            continue
        rows.append(row)
    if dropped:
        _warn(f"{path}: dropped " + ", ".join(dropped))
    epochs = [r["epoch"] for r in rows]
    if epochs != list(range(1, epoch + 1)):
        _warn(f"{path} holds the rows of epochs {epochs}, not 1..{epoch}")
    text = "".join(json_line(r) + "\n" for r in rows)
    if dropped or "\n".join(lines) != text:
        atomic_write(path, text)
    return float(rows[-1].get("train_seconds") or 0.0) if rows else 0.0


def _append_synced(path: str, line: str) -> None:
    """Append one line and make it durable before the checkpoint that refers to it is written."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def train(cfg: dict, *, resume: bool = False, allow_config_change: bool = False, progress: bool = True,
          dataset: data_lib.Dataset | None = None) -> dict:
    """Run ``cfg`` to the end (or continue it with ``resume``); returns the summary.

    Raises :class:`config_lib.ConfigError` for an invalid config, :class:`ConfigChangedError`,
    :class:`CheckpointError` or :class:`MetricsError` for a run folder that cannot be resumed as asked
    (in every case before anything in the folder is changed, except the repairs the module docstring
    lists) and :class:`DivergenceError` when the training produces non-finite numbers."""
    cfg = config_lib.validate(copy.deepcopy(cfg))
    out = config_lib.run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    checkpoints = [os.path.join(out, n) for n in (CHECKPOINT, PREVIOUS, DAMAGED)]
    resuming = resume and any(os.path.exists(p) for p in checkpoints[:2])
    if resuming:
        _check_config(out, cfg, allow_config_change)
    trainer = Trainer(cfg, dataset, fresh=not resuming)
    start, elapsed = 0, 0.0
    if resuming:
        start = _resume_checkpoint(trainer, out)
        elapsed = _repair_metrics(metrics_path, start)
        if not os.path.exists(os.path.join(out, CHECKPOINT)):  # resumed from the previous checkpoint:
            trainer.save_checkpoint(out, start)  # make checkpoint.msgpack whole again for readers of it
    else:  # a new run: the checkpoints of an earlier run here must not become this one's fallback
        for path in checkpoints:
            if os.path.exists(path):
                os.unlink(path)
        atomic_write(metrics_path, b"")
    atomic_write(os.path.join(out, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
    row = {}
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        row = trainer.run_epoch(epoch, progress)
        jax.block_until_ready(trainer.params)
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch + 1, **row, **trainer.evaluate(), "train_seconds": round(elapsed, 3)}
        _append_synced(metrics_path, json_line(row))
        trainer.save_checkpoint(out, epoch + 1)
        if progress:
            tqdm.write(f"{cfg['name']} seed {cfg['seed']} epoch {epoch + 1}: "
                       f"train acc {row['train_accuracy']:.4f}, test acc {row['test_accuracy']:.4f}")
    if not row:  # resumed a finished run
        row = {"epoch": cfg["epochs"], **trainer.evaluate(), "train_seconds": round(elapsed, 3)}
    summary = {
        "name": cfg["name"], "method": cfg["method"], "seed": cfg["seed"],
        "dataset": cfg["data"]["name"], "model": cfg["model"]["name"],
        "activation": cfg["model"].get("activation", "relu"), "epochs": cfg["epochs"],
        "test_accuracy": row["test_accuracy"], "test_loss": row["test_loss"],
        "train_accuracy": row.get("train_accuracy"), "train_seconds": row["train_seconds"],
        "run_dir": out,
    }
    if "test_bits_per_char" in row:
        summary["test_bits_per_char"] = row["test_bits_per_char"]
    atomic_write(os.path.join(out, "summary.json"), json.dumps(json_safe(summary), indent=1, allow_nan=False))
    return summary


def _fail(message: str, kind: str, code: int = EXIT_ERROR, extra: dict | None = None):
    """Print the JSON error line (the last stdout line) and the message (stderr); exit with ``code``."""
    print(json_line({"error": message, "kind": kind, **(extra or {})}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Train one LFP or gradient-descent run.")
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optimizer.lr=0.05 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept a config that differs from the run's config.yaml")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars and no line per epoch (bars are drawn only on a terminal)")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.set)
    except config_lib.ConfigError as e:
        _fail(f"invalid config {args.config}:\n{e}", "config")
    except OSError as e:
        _fail(f"cannot read config {args.config}: {e}", "config")
    try:
        summary = train(cfg, resume=args.resume, allow_config_change=args.allow_config_change,
                        progress=not args.no_progress)
    except data_lib.DatasetNotFound as e:
        _fail(f"dataset not available: {e}", "dataset")
    except DivergenceError as e:
        extra = e.to_json()
        _fail(extra.pop("error"), extra.pop("kind"), EXIT_DIVERGED, extra)
    except config_lib.ConfigError as e:
        _fail(f"invalid config {args.config}:\n{e}", "config")
    except CheckpointError as e:
        _fail(str(e), "checkpoint")
    except ConfigChangedError as e:
        _fail(str(e), "config_changed")
    except RunFolderError as e:
        _fail(str(e), "run_folder")
    print(json_line(summary))
    return summary


if __name__ == "__main__":
    main()
