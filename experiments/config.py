"""Run configurations: YAML files in ``configs/`` merged over :data:`DEFAULTS`, plus ``--set`` overrides.

A config is a nested dict; ``--set optimizer.lr=0.05 --set data.subset=512`` changes single keys (the
value is parsed as YAML, so numbers, booleans, lists and ``null`` work).

Every config is checked against a schema (:func:`validate`) after merging, so values from the file,
from ``base=`` and from ``--set`` get the same checks, and a mistake stops the run before it starts
instead of being ignored or failing deep inside jax with a message that never names the key:

* every key must be known: the fixed keys of :data:`DEFAULTS`, and for the open-ended sections the
  chosen model's constructor fields (``model``), the reward function's keyword options plus ``name``
  and ``scale`` (``reward``) and the data loader's keyword options (``data.options``). An unknown key
  is reported with its full dotted name and the closest valid key (``unknown config key 'optimzer'
  (did you mean 'optimizer'?)``);
* types and ranges: ``epochs``, ``batch_size``, ``eval_batch_size`` integers ≥ 1, ``seed`` ≥ 0,
  ``optimizer.lr`` a finite number > 0, ``momentum`` in [0, 1), ``clip_norm`` null or > 0, and so on
  (see :data:`SCHEMA`). Booleans are not accepted as numbers (``epochs: true`` is an error). A string
  that spells a number (``1e-3``, which YAML 1.1 reads as a string) is accepted where a float is
  expected and converted.

* across keys: a spiking model (``snn_mlp``, ``snn_cnn``) needs a spike reward (``reward.name:
  spike_...``); ``init.reset`` needs ``init.from``.

All problems of a config are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
from collections.abc import Callable
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "name": None,             # run name; defaults to the config file's stem
    "seed": 0,
    "method": "lfp",          # lfp | gd
    "data": {"name": "digits", "root": None, "subset": None, "classes": None, "train_examples": None,
             "options": {}},
    "model": {"name": "mlp"},  # further keys are the model's fields (activation, hidden, ...)
    "init": {"scale": 1.0, "from": None, "reset": []},  # initial parameters: see experiments.train.Trainer
    "input_noise": {"std": 0.0, "prob": 1.0},  # Gaussian noise on training inputs
    "reward": {"name": "softmax_loss"},        # lfp: a function of lfp_jax.rewards (+ its options)
    "epsilon": 1e-6,                           # lfp: ε of the LFP-ε composite
    "composite": "lfp_epsilon",                # lfp: lfp_epsilon | reference_vit | gradient_control
    "products": "uniform",                     # lfp_epsilon at products: uniform (AttnLRP) | gradient
    "dropout_rescale": True,                   # lfp: the reference's 1/(1-p) at dropout
    "dtype": "float32",       # float32 | bfloat16: compute dtype of the training and evaluation passes
    "epochs": 10,
    "batch_size": 128,
    "eval_batch_size": 1000,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "beta2": 0.999,
                  "clip_norm": None, "weight_decay": 0.0, "schedule": "constant"},
    "out_dir": "runs",
}


DTYPES = ("float32", "bfloat16")
METHODS = ("lfp", "gd")
COMPOSITES = ("lfp_epsilon", "reference_vit", "gradient_control")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "onecycle")


class ConfigError(ValueError):
    """A config mistake (unknown key, wrong type, value out of range). The message names every offending
    key by its full dotted name, one problem per line."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# --- the schema ------------------------------------------------------------------------------------
#
# A check takes (dotted key, value) and returns the value to keep (numbers spelled as strings become
# floats) or raises _Bad with the message. Sections are dicts of checks; the open-ended sections (model,
# reward, data.options) get their keys from the code they configure, see _model_fields and friends.


class _Bad(Exception):
    pass


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_number(key: str, value) -> float | int:
    """``value`` as a number: ints and floats (not booleans), or a string spelling one."""
    if isinstance(value, bool):
        raise _Bad(f"{key} must be a number, got {_describe(value)}")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    raise _Bad(f"{key} must be a number, got {_describe(value)}")


def integer(minimum: int | None = None, optional: bool = False) -> Callable:
    """An int (not a bool, not a float) ``≥ minimum``; ``None`` too if ``optional``."""
    def check(key, value):
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            null = " or null" if optional else ""
            raise _Bad(f"{key} must be an integer{null}, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise _Bad(f"{key} must be ≥ {minimum}, got {value}")
        return value
    return check


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Callable:
    """A finite number in the interval ``[low, high]`` (``(`` / ``)`` with ``low_open`` / ``high_open``);
    ``None`` too if ``optional``."""
    if low is not None and high is not None:
        interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        interval = f"{'>' if low_open else '≥'} {low}"
    else:
        interval = f"{'<' if high_open else '≤'} {high}"

    def check(key, value):
        if value is None and optional:
            return value
        value = _as_number(key, value)
        if not math.isfinite(value):
            raise _Bad(f"{key} must be finite, got {value}")
        if ((low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise _Bad(f"{key} must be {interval}, got {value}")
        return value
    return check


def integers(minimum: int | None = None, optional: bool = False, distinct: bool = False) -> Callable:
    """A non-empty list of integers ≥ ``minimum`` (all different with ``distinct``); ``null`` with
    ``optional``."""
    def check(key, value):
        if value is None and optional:
            return value
        if (not isinstance(value, list | tuple) or not value
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
            raise _Bad(f"{key} must be a non-empty list of integers{' or null' if optional else ''}, "
                       f"got {_describe(value)}")
        if minimum is not None and min(value) < minimum:
            raise _Bad(f"{key} must hold integers ≥ {minimum}, got {list(value)}")
        if distinct and len(set(value)) != len(value):
            raise _Bad(f"{key} lists an integer twice: {list(value)}")
        return list(value)
    return check


def strings() -> Callable:
    """A list of strings (possibly empty)."""
    def check(key, value):
        if not isinstance(value, list | tuple) or any(not isinstance(v, str) for v in value):
            raise _Bad(f"{key} must be a list of strings, got {_describe(value)}")
        return list(value)
    return check


def choice(*options, optional: bool = False) -> Callable:
    """One of ``options`` (strings); ``None`` too if ``optional``."""
    def check(key, value):
        if value is None and optional:
            return value
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _Bad(f"{key} must be one of {list(options)}, got {_describe(value)}{hint}")
        return value
    return check


def boolean(key, value):
    if not isinstance(value, bool):
        raise _Bad(f"{key} must be true or false, got {_describe(value)}")
    return value


def string(optional: bool = False) -> Callable:
    def check(key, value):
        if value is None and optional:
            return value
        if not isinstance(value, str) or not value:
            null = " or null" if optional else ""
            raise _Bad(f"{key} must be a non-empty string{null}, got {_describe(value)}")
        return value
    return check


def _any(key, value):
    return value


#: The fixed keys and their checks. ``model``, ``reward`` and ``data.options`` are open-ended: their
#: keys are checked against the code they configure (see :func:`validate`).
SCHEMA: dict[str, Any] = {
    "name": string(),
    "seed": integer(0),
    "method": choice(*METHODS),
    "data": {"name": string(), "root": string(optional=True), "subset": integer(1, optional=True),
             "classes": integers(0, optional=True, distinct=True),
             "train_examples": integer(1, optional=True), "options": "open"},
    "model": "open",
    "init": {"scale": number(0, low_open=True), "from": string(optional=True), "reset": strings()},
    "input_noise": {"std": number(0), "prob": number(0, 1)},
    "reward": "open",
    "epsilon": number(0),
    "composite": choice(*COMPOSITES),
    "products": choice("uniform", "gradient"),
    "dropout_rescale": boolean,
    "dtype": choice(*DTYPES),
    "epochs": integer(1),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "optimizer": {"name": choice(*OPTIMIZERS), "lr": number(0, low_open=True),
                  "momentum": number(0, 1, high_open=True, optional=True), "nesterov": boolean,
                  "beta2": number(0, 1, high_open=True),
                  "clip_norm": number(0, low_open=True, optional=True), "weight_decay": number(0),
                  "schedule": choice(*SCHEDULES)},
    "out_dir": string(),
}


def _from_annotation(annotation, default) -> Callable:
    """A check for a constructor field or keyword argument, from its annotation (a string under
    ``from __future__ import annotations``: ``int``, ``float``, ``str``, ``bool``, ``None``,
    ``Sequence[int]`` and unions of them) or, without one, from the type of its default. Anything else
    is accepted as it is: the code it configures checks it."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if annotation is inspect.Parameter.empty or not text:
        text = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(default), "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1] + " | None"
    parts = [p.strip() for p in text.split("|")] if text else []
    simple = {"int", "float", "str", "bool", "None", "Sequence[int]", "Sequence[float]"}
    if not parts or not set(parts) <= simple:
        return _any

    def check(key, value):
        for part in parts:
            if part == "None" and value is None:
                return value
            if part == "bool" and isinstance(value, bool):
                return value
            if part == "int" and isinstance(value, int) and not isinstance(value, bool):
                return value
            if part == "float" and not isinstance(value, bool):
                try:
                    return number()(key, value)
                except _Bad:
                    pass
            if part == "str" and isinstance(value, str):
                return value
            if part.startswith("Sequence[") and isinstance(value, list | tuple):
                kind = part[len("Sequence["):-1]
                ok = all((isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else
                         (isinstance(v, int | float) and not isinstance(v, bool)) for v in value)
                if ok:
                    return value
        names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                 "None": "null", "Sequence[int]": "a list of integers",
                 "Sequence[float]": "a list of numbers"}
        raise _Bad(f"{key} must be {' or '.join(names[p] for p in parts)}, got {_describe(value)}")
    return check


# The models of experiments.models.build by name: (class, fields build sets itself). Kept here rather than
# in models.py so that config.py does not import jax until a config is validated.
_MODELS = {"mlp": ("MLP", ()), "toy_mlp": ("MLP", ("hidden",)), "lenet": ("LeNet", ()),
           "cifar_vgg": ("CifarVGGLike", ()), "resnet": ("ResNet", ()),
           "resnet18": ("ResNet", ("widths", "blocks")), "snn_mlp": ("SpikingMLP", ()),
           "snn_cnn": ("SpikingCNN", ()), "vit": ("ViT", ()), "gpt": ("GPT", ())}

# The loaders of experiments.data.load by dataset name.
_DATASETS = {"blobs": "_toy", "circles": "_toy", "swirls": "_toy", "digits": "_digits", "mnist": "_mnist",
             "fashion_mnist": "_fashion_mnist", "cifar10": "_cifar", "cifar100": "_cifar", "text": "_text"}


def model_fields(name: str) -> dict[str, Callable]:
    """The config keys of model ``name`` (besides ``name``): its flax dataclass fields, minus those
    :func:`experiments.models.build` sets (``num_classes`` and the fixed widths of ``toy_mlp`` and
    ``resnet18``)."""
    from experiments import models

    cls_name, fixed = _MODELS[name]
    cls = getattr(models, cls_name)
    skip = {"parent", "name", "num_classes", *fixed}
    return {f.name: _model_field_check(f.name, f.type, f.default) for f in dataclasses.fields(cls)
            if f.name not in skip and f.init}


def _model_field_check(field: str, annotation, default) -> Callable:
    if field == "activation":
        from experiments import models
        return choice(*models.ACTIVATIONS)
    return _from_annotation(annotation, default)


def _keyword_options(fn, skip: int | set[str]) -> dict[str, Callable]:
    """The keyword arguments of ``fn`` after its first ``skip`` parameters (or minus the names in
    ``skip``), with checks from their annotations and defaults."""
    params = list(inspect.signature(fn).parameters.values())
    params = params[skip:] if isinstance(skip, int) else [p for p in params if p.name not in skip]
    return {p.name: _from_annotation(p.annotation, p.default) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def reward_options(name: str) -> dict[str, Callable]:
    """The config keys of reward ``name`` (besides ``name``): ``scale`` and the reward function's options
    (its parameters after the outputs and the labels)."""
    import lfp_jax

    return {"scale": number(optional=True), **_keyword_options(getattr(lfp_jax.rewards, name), 2)}


def data_options(name: str) -> dict[str, Callable]:
    """The keys of ``data.options`` for dataset ``name``: the loader's keyword arguments besides those
    the trainer passes itself (``name``, ``root``, ``seed``)."""
    from experiments import data as data_lib

    return _keyword_options(getattr(data_lib, _DATASETS[name]), {"name", "root", "seed"})


def _unknown(key: str, valid) -> str:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[:-len(leaf)]
    close = difflib.get_close_matches(leaf, list(valid), n=1)
    if close:
        hint = f" (did you mean {prefix + close[0]!r}?)"
    else:
        hint = f"; valid keys here: {sorted(valid)}" if valid else "; this section takes no keys here"
    return f"unknown config key {key!r}{hint}"


def _check_section(cfg: dict, schema: dict[str, Callable | dict | str], prefix: str, problems: list,
                   open_sections: dict[str, Callable[[dict, list], dict | None]],
                   required: bool = True) -> None:
    """Check the keys of ``cfg`` against ``schema`` in place (converted values are written back); with
    ``required`` every key of ``schema`` must be there (the open-ended sections leave theirs to the
    defaults of the code they configure)."""
    for key in cfg:
        dotted = prefix + key
        if key not in schema:
            problems.append(_unknown(dotted, schema))
            continue
        spec, value = schema[key], cfg[key]
        if isinstance(spec, dict) or spec == "open":
            if value is None and spec == "open" and dotted == "data.options":
                cfg[key] = value = {}
            if not isinstance(value, dict):
                problems.append(f"{dotted} must be a mapping (a section of keys), got {_describe(value)}")
                continue
            if isinstance(spec, dict):
                _check_section(value, spec, dotted + ".", problems, open_sections)
            else:
                inner = open_sections[dotted](value, problems)
                if inner is not None:
                    _check_section(value, inner, dotted + ".", problems, open_sections, required=False)
            continue
        try:
            cfg[key] = spec(dotted, value)
        except _Bad as e:
            problems.append(str(e))
    for key, spec in schema.items():
        if required and key not in cfg and not isinstance(spec, dict) and spec != "open":
            problems.append(f"missing config key {prefix + key!r}")


def _named(section: str, known, fields_of: Callable[[str], dict]) -> Callable:
    """The check of an open-ended section whose ``name`` picks the code it configures."""
    def schema_of(value: dict, problems: list) -> dict | None:
        name = value.get("name")
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{section}.name must be one of {sorted(known)}, got {_describe(name)}{hint}")
            return None
        return {"name": _any, **fields_of(name)}
    return schema_of


def validate(cfg: dict) -> dict:
    """Check ``cfg`` against the schema (see the module docstring), in place; returns it. Raises
    :class:`ConfigError` listing every problem, each naming its dotted key."""
    import lfp_jax

    if not isinstance(cfg, dict):
        raise ConfigError(f"a config must be a mapping of keys, got {_describe(cfg)}")
    problems: list[str] = []
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}

    def options_schema(value: dict, problems: list) -> dict | None:
        name = data.get("name")
        return data_options(name) if name in _DATASETS else None  # data.name reports the problem

    open_sections = {
        "model": _named("model", _MODELS, model_fields),
        "reward": _named("reward", lfp_jax.rewards.__all__, reward_options),
        "data.options": options_schema,
    }
    schema = dict(SCHEMA)
    schema["data"] = {**SCHEMA["data"], "name": choice(*_DATASETS)}
    _check_section(cfg, schema, "", problems, open_sections)
    model, reward = cfg.get("model"), cfg.get("reward")
    if (not problems and model["name"] in ("snn_mlp", "snn_cnn")
            and not str(reward["name"]).startswith("spike_")):  # spike trains (T, batch, classes) out
        problems.append(f"reward.name must be a spike reward (spike_rate_coded or spike_count_softmax_loss) "
                        f"for the spiking model {model['name']!r}, got {reward['name']!r}")
    init = cfg.get("init")
    if not problems and init["reset"] and not init["from"]:
        problems.append("init.reset names parameters to keep fresh when starting from a checkpoint; set "
                        "init.from too, or leave init.reset empty")
    if problems:
        raise ConfigError(problems)
    return cfg


# --- loading -----------------------------------------------------------------------------------------


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_key(cfg: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place (the key is checked later, by :func:`validate`,
    so that a misspelt key is reported with the closest valid one)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({e})") from None
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment}: {'.'.join(parts[:i + 1])!r} is not a section")
    node[parts[-1]] = value


def load(path: str | None = None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """DEFAULTS, then the YAML file at ``path``, then ``base``, then the ``overrides``; validated
    (:func:`validate`) after merging, so all three sources get the same checks."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            try:
                from_file = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {_describe(from_file)}")
        cfg = merge(cfg, from_file)
        if cfg.get("name") is None:
            cfg["name"] = os.path.splitext(os.path.basename(path))[0]
    if base:
        cfg = merge(cfg, base)
    for assignment in overrides:
        set_key(cfg, assignment)
    if cfg.get("name") is None and isinstance(cfg.get("data"), dict) and isinstance(cfg.get("model"), dict):
        cfg["name"] = f"{cfg['data'].get('name')}_{cfg['model'].get('name')}_{cfg.get('method')}"
    return validate(cfg)


def run_dir(cfg: dict) -> str:
    return os.path.join(cfg["out_dir"], cfg["name"], f"seed{cfg['seed']}")
