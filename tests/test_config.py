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


# ---- bundled recipes by name (lmforge/bundled.py) ----------------------------------------------


def test_bundled_recipe_by_name_from_any_directory(tmp_path, monkeypatch):
    from lmforge.bundled import bundled_dir, resolve_bundled

    repo = Path(__file__).resolve().parents[1]
    # in a checkout, configs/ and tasks/ are the package's directories (git symlinks), not copies
    assert (repo / "configs").resolve() == bundled_dir("config") == repo / "lmforge" / "configs"
    assert (repo / "tasks").resolve() == bundled_dir("task") == repo / "lmforge" / "tasks"
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_config("small-cpu") == load_config("small-cpu.yaml") == load_config(repo / "configs" / "small-cpu.yaml")
    assert resolve_bundled("python-mc", "task") == bundled_dir("task") / "python-mc.jsonl"
    # a path that exists wins over the bundled file of the same name
    (tmp_path / "small-cpu").write_text("train:\n  max_steps: 7\n")
    assert load_config("small-cpu").train.max_steps == 7
    # neither a path nor a bundled name: the error lists the bundled names
    with pytest.raises(ConfigError, match=r"config file not found: configs/small-cpu\.yaml \(or give a bundled "
                                          r"one by name: .*small-cpu, tiny-cpu\)"):
        load_config("configs/small-cpu.yaml")  # a path with a directory part is never looked up by name
    with pytest.raises(ConfigError, match="config file not found: smal-cpu"):
        load_config("smal-cpu")


# ---- the config reference (docs/config.md) -----------------------------------------------------


def test_config_reference_is_up_to_date():
    from lmforge.config import reference_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.is_file() and doc.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/config.md is out of date with lmforge/config.py: run `python3 scripts/gen_config_doc.py`"
    )


def test_config_reference_lists_every_key_with_its_meaning():
    from dataclasses import fields

    from lmforge.config import field_docs, reference_markdown

    text = reference_markdown()
    cfg = Config()
    for section in fields(Config):
        assert f"\n## {section.name}\n" in text
        for key in cfg.to_dict()[section.name]:
            assert f"\n| `{key}` | " in text  # `from` (the field from_) as the YAML key
    assert "| `lr` | float | `0.0003` | > 0 | peak learning rate (after warmup) |" in text
    assert "| `schedule` | str | `\"cosine\"` | one of cosine, wsd, constant | learning-rate schedule: cosine \\| wsd \\| constant" in text
    assert "| `threads` | int | `0` | within 0..1024 (0 = lmforge chooses) |" in text  # the valid column: the rule of the field
    # a comment block right above a field is its meaning when its own line has none
    assert field_docs()[("ModelConfig", "rope_scaling")][1].startswith("RoPE frequency scaling (HF `rope_scaling`)")


def test_config_reference_refuses_a_key_without_meaning(monkeypatch):
    import lmforge.config as config

    docs = config.field_docs()
    docs[("TrainConfig", "lr")] = ("float", "")
    monkeypatch.setattr(config, "field_docs", lambda: docs)
    with pytest.raises(AssertionError, match=r"write a `# meaning` comment for TrainConfig\.lr"):
        config.reference_markdown()
