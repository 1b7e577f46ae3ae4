"""Strict config: every shipped recipe loads; typos, wrong types and impossible values are errors
that say what to do; the resolved config round-trips exactly."""

from pathlib import Path

import pytest

from lmforge.config import Config, load_config
from lmforge.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"tiny-cpu", "small-cpu", "gpu-125m", "gpu-350m", "gpu-1b"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.lr=3e-4", "model.n_layer=6", "train.compile=true", "data.path=x/y"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 6
    assert cfg.train.compile is True
    assert cfg.data.path == "x/y"


def test_init_from_key_is_spelled_from():
    cfg = load_config(None, ["init.from=models/smol"])
    assert cfg.init.from_ == "models/smol"
    assert cfg.to_dict()["init"] == {"from": "models/smol"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1e-3"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (["trian.lr=1e-3"], "unknown section 'trian'; did you mean 'train'?"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["train.lr=fast"], "train.lr: expected a number"),
        (["model.n_layer=2.5"], "model.n_layer: expected an integer"),
        (["train.compile=maybe"], "expected true or false"),
        (["train.micro_batch=5"], "train.global_batch (32) must be divisible by train.micro_batch (5)"),
        (["train.schedule=linear"], "train.schedule must be one of cosine, wsd, constant"),
        (["model.d_model=100", "model.n_head=3"], "must be divisible by model.n_head"),
        (["model.n_kv_head=3"], "model.n_kv_head (3) must divide model.n_head (4)"),
        (["data.seq_len=512"], "data.seq_len (512) is longer than model.max_seq_len (256)"),
        (["train.lr"], "must look like section.key=value"),
        (["lr=1"], "must be section.key"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "did you mean 'warmup_steps'?" in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_diff_lists_changed_keys():
    a = load_config(None)
    b = load_config(None, ["train.lr=1e-3", "guard.spike_factor=3"])
    assert a.diff(b) == {"train.lr": (3e-4, 1e-3), "guard.spike_factor": (6.0, 3.0)}


def test_set_errors_name_the_set_not_the_file(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("train:\n  lr: 1.0e-3\n  compile: maybe\n")
    with pytest.raises(ConfigError) as e:  # the file's own bad value is still blamed on the file
        load_config(p)
    assert str(e.value).startswith(f"{p}: train.compile: expected true or false")
    with pytest.raises(ConfigError) as e:  # a --set value is blamed on that --set
        load_config(p, ["train.compile=false", "train.lr=abc"])
    assert str(e.value) == "--set train.lr=abc: train.lr: expected a number, got 'abc'"
    with pytest.raises(ConfigError) as e:  # the last --set of a key is the one that counts
        load_config(None, ["model.n_layer=2", "model.n_layer=two"])
    assert str(e.value).startswith("--set model.n_layer=two: model.n_layer: expected an integer")
