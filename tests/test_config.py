"""The config schema of experiments.config: every mistake a user can make in a YAML file, ``base=`` or
``--set`` is an error naming the dotted key (and, for a misspelt key, the closest valid one)."""

import glob
import os
import types

import pytest

from experiments import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
DIGITS = os.path.join(ROOT, "configs", "digits_mlp_lfp.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_passes_the_schema(path):
    cfg = config_lib.load(path)
    assert config_lib.validate(cfg) is cfg


MISTAKES = [
    # (--set override, pattern the message must contain)
    ("epoch=3", r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"),
    ("optimzer.lr=0.1", r"unknown config key 'optimzer' \(did you mean 'optimizer'\?\)"),
    ("data.subet=64", r"unknown config key 'data.subet' \(did you mean 'data.subset'\?\)"),
    ("optimizer.clipnorm=1", r"'optimizer.clipnorm' \(did you mean 'optimizer.clip_norm'\?\)"),
    ("epochs=-5", r"epochs must be ≥ 1, got -5"),
    ("epochs=0", r"epochs must be ≥ 1, got 0"),
    ("epochs=true", r"epochs must be an integer, got True \(bool\)"),
    ("epochs=2.5", r"epochs must be an integer, got 2.5 \(float\)"),
    ("batch_size=-8", r"batch_size must be ≥ 1, got -8"),
    ("eval_batch_size=0", r"eval_batch_size must be ≥ 1"),
    ("seed=-1", r"seed must be ≥ 0"),
    ("optimizer.lr=-0.03", r"optimizer.lr must be > 0, got -0.03"),
    ("optimizer.lr=0", r"optimizer.lr must be > 0, got 0"),
    ("optimizer.lr=abc", r"optimizer.lr must be a number, got 'abc' \(str\)"),
    ("optimizer.lr=.nan", r"optimizer.lr must be finite"),
    ("optimizer.lr=true", r"optimizer.lr must be a number, got True \(bool\)"),
    ("optimizer.momentum=1.0", r"optimizer.momentum must be in \[0, 1\), got 1.0"),
    ("optimizer.clip_norm=0", r"optimizer.clip_norm must be > 0"),
    ("optimizer.weight_decay=-1e-4", r"optimizer.weight_decay must be ≥ 0"),
    ("optimizer.schedule=cosin", r"optimizer.schedule must be one of .* \(did you mean 'cosine'\?\)"),
    ("optimizer.name=adamw", r"optimizer.name must be one of \['sgd', 'adam'\]"),
    ("optimizer.nesterov=1", r"optimizer.nesterov must be true or false, got 1 \(int\)"),
    ("epsilon=-1", r"epsilon must be ≥ 0, got -1"),
    ("method=sgd", r"method must be one of \['lfp', 'gd'\]"),
    ("dtype=float16", r"dtype must be one of"),
    ("composite=lfp", r"composite must be one of"),
    ("dropout_rescale=yes please", r"dropout_rescale must be true or false"),
    ("input_noise.std=-0.1", r"input_noise.std must be ≥ 0"),
    ("input_noise.prob=1.5", r"input_noise.prob must be in \[0, 1\], got 1.5"),
    ("data.subset=0", r"data.subset must be ≥ 1"),
    ("data.subset=ten", r"data.subset must be an integer or null, got 'ten' \(str\)"),
    ("data.name=digit", r"data.name must be one of .* \(did you mean 'digits'\?\)"),
    ("data.options.n=100", r"unknown config key 'data.options.n'"),  # digits takes no options
    ("model.hiden=[32]", r"unknown config key 'model.hiden' \(did you mean 'model.hidden'\?\)"),
    ("model.hidden=[32, x]", r"model.hidden must be a list of integers"),
    ("model.dropout=high", r"model.dropout must be a number, got 'high' \(str\)"),
    ("model.activation=rleu", r"model.activation must be one of .* \(did you mean 'relu'\?\)"),
    ("model.name=transformer", r"model.name must be one of"),
    ("reward.temperature=2", r"unknown config key 'reward.temperature'"),
    ("reward.name=softmax", r"reward.name must be one of .* \(did you mean 'softmax_loss'\?\)"),
    ("reward.scale=x", r"reward.scale must be a number"),
    ("optimizer=3", r"optimizer must be a mapping"),
    ("epochs.max=3", r"'epochs' is not a section"),
    ("nonsense", r"--set expects key=value"),
]


@pytest.mark.parametrize("override,message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_config_mistake_names_its_key(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(DIGITS, [override])


def test_mistakes_in_the_yaml_file_and_in_base_get_the_same_checks(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epoch: 3\noptimizer: {lr: -0.03}\ndata: {subet: 5}\nepsilon: -1\n")
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.load(str(path))
    problems = info.value.problems  # all of them at once, not only the first
    assert any("'epoch' (did you mean 'epochs'?)" in p for p in problems)
    assert any("optimizer.lr must be > 0" in p for p in problems)
    assert any("'data.subet' (did you mean 'data.subset'?)" in p for p in problems)
    assert any("epsilon must be ≥ 0" in p for p in problems)
    with pytest.raises(config_lib.ConfigError, match="batch_size must be ≥ 1, got -8"):
        config_lib.load(DIGITS, base={"batch_size": -8})
    path.write_text("- a list\n")
    with pytest.raises(config_lib.ConfigError, match="must hold a mapping"):
        config_lib.load(str(path))


def test_open_sections_are_checked_against_the_code_they_configure():
    # model fields: the chosen model's dataclass fields (vit has no 'hidden', mlp no 'patch')
    cfg = config_lib.load(os.path.join(ROOT, "configs", "vit_mnist_lfp.yaml"), ["model.depth=2"])
    assert cfg["model"]["depth"] == 2
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'model.hidden'"):
        config_lib.load(os.path.join(ROOT, "configs", "vit_mnist_lfp.yaml"), ["model.hidden=[3]"])
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'model.patch'"):
        config_lib.load(DIGITS, ["model.patch=4"])
    # toy_mlp fixes its widths itself: 'hidden' would be passed twice
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'model.hidden'"):
        config_lib.load(os.path.join(ROOT, "configs", "toy_mlp_lfp.yaml"), ["model.hidden=[8]"])
    # reward options: the reward function's keyword arguments, plus name and scale
    cfg = config_lib.load(DIGITS, ["reward.name=bounded_softmax", "reward.upper=0.9", "reward.scale=0.5"])
    assert cfg["reward"] == {"name": "bounded_softmax", "upper": 0.9, "scale": 0.5}
    with pytest.raises(config_lib.ConfigError, match=r"reward.sign_only must be true or false"):
        config_lib.load(DIGITS, ["reward.name=bounded_softmax", "reward.sign_only=1"])
    with pytest.raises(config_lib.ConfigError, match=r"'reward.uper' \(did you mean 'reward.upper'\?\)"):
        config_lib.load(DIGITS, ["reward.name=bounded_softmax", "reward.uper=0.9"])
    # a spiking model outputs spike trains: its reward must be a spike reward
    with pytest.raises(config_lib.ConfigError, match=r"reward.name must be a spike reward .* for the "
                                                     r"spiking model 'snn_mlp', got 'softmax_loss'"):
        config_lib.load(os.path.join(ROOT, "configs", "snn_mnist_lfp.yaml"), ["reward.name=softmax_loss"])
    # data options: the loader's keyword arguments
    cfg = config_lib.load(os.path.join(ROOT, "configs", "toy_mlp_lfp.yaml"), ["data.options.n=90"])
    assert cfg["data"]["options"]["n"] == 90
    with pytest.raises(config_lib.ConfigError, match=r"'data.options.nosie' \(did you mean "
                                                     r"'data.options.noise'\?\)"):
        config_lib.load(os.path.join(ROOT, "configs", "toy_mlp_lfp.yaml"), ["data.options.nosie=0.2"])
    with pytest.raises(config_lib.ConfigError, match=r"data.options.context must be an integer"):
        config_lib.load(os.path.join(ROOT, "configs", "gpt_text_lfp.yaml"), ["data.options.context=long"])


def test_numbers_spelled_as_yaml_strings_are_read_as_numbers():
    # YAML 1.1 reads 1e-3 (no dot) as a string; float("1e-3") worked before the schema, so it still does
    cfg = config_lib.load(DIGITS, ["optimizer.lr=1e-3", "epsilon=1e-8"])
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["epsilon"] == 1e-8
    assert isinstance(cfg["optimizer"]["lr"], float)


def test_the_study_runner_validates_its_set_overrides(tmp_path):
    from experiments import study

    args = types.SimpleNamespace(set=["optimzer.lr=0.1"], out_dir=str(tmp_path), quick=True)
    with pytest.raises(config_lib.ConfigError, match=r"'optimzer' \(did you mean 'optimizer'\?\)"):
        study.Runner(args).cfg("digits_mlp_lfp.yaml")
    args.set = ["optimizer.lr=0.1"]
    cfg = study.Runner(args).cfg("digits_mlp_lfp.yaml")
    assert cfg["optimizer"]["lr"] == 0.1 and cfg["epochs"] == 1 and cfg["data"]["subset"] == 256
