"""Run configurations: YAML files in ``configs/`` merged over :data:`DEFAULTS`, plus ``--set`` overrides.

A config is a nested dict; ``--set optimizer.lr=0.05 --set data.subset=512`` changes single keys (the
value is parsed as YAML, so numbers, booleans, lists and ``null`` work).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": None,             # run name; defaults to the config file's stem
    "seed": 0,
    "method": "lfp",          # lfp | gd
    "data": {"name": "digits", "root": None, "subset": None, "options": {}},
    "model": {"name": "mlp"},  # further keys are the model's fields (activation, hidden, ...)
    "input_noise": {"std": 0.0, "prob": 1.0},  # Gaussian noise on training inputs
    "reward": {"name": "softmax_loss"},        # lfp: a function of lfp_jax.rewards (+ its options)
    "epsilon": 1e-6,                           # lfp: ε of the LFP-ε composite
    "composite": "lfp_epsilon",                # lfp: lfp_epsilon (AttnLRP at attention) | reference_vit
    "dropout_rescale": True,                   # lfp: the reference's 1/(1-p) at dropout
    "dtype": "float32",       # float32 | bfloat16: compute dtype of the training and evaluation passes
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 1000,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "clip_norm": None,
                  "weight_decay": 0.0, "schedule": "constant"},
    "out_dir": "runs",
}


DTYPES = ("float32", "bfloat16")


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(cfg: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment}: {part!r} is not a section")
    node[parts[-1]] = value


def load(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """DEFAULTS, then the YAML file at ``path``, then ``base``, then the ``overrides``."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            cfg = merge(cfg, yaml.safe_load(f) or {})
        if cfg.get("name") is None:
            cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    if base:
        cfg = merge(cfg, base)
    for assignment in overrides:
        set_key(cfg, assignment)
    if cfg["method"] not in ("lfp", "gd"):
        raise ValueError(f"method must be 'lfp' or 'gd', got {cfg['method']!r}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {cfg['dtype']!r}")
    cfg["name"] = cfg["name"] or f"{cfg['data']['name']}_{cfg['model']['name']}_{cfg['method']}"
    return cfg


def run_dir(cfg: dict) -> str:
    return os.path.join(cfg["out_dir"], cfg["name"], f"seed{cfg['seed']}")
