"""`lmforge ckpt average`: the mean of a run's checkpoints as a verified model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, lmforge_in_process
from lmforge import artifacts as A
from lmforge.average import average
from lmforge.config import load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.train.loop import build, train


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory) -> Path:
    cfg = load_config(TINY_CONFIG, [f"data.path={tiny_dataset}", "model.vocab_size=512", "train.max_steps=30",
                                    "train.eval_every=0", "train.keep_last=10"])
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    run_dir.mkdir()
    assert train(build(cfg, run_dir)) == 0
    return run_dir


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return A.load_safetensors(ckpt / A.MODEL_FILE)


def test_uniform_average_is_the_mean_of_the_weights_and_loads(run: Path, tmp_path: Path) -> None:
    rec = average(run, tmp_path / "avg", last=3)
    assert [c["step"] for c in rec["checkpoints"]] == [10, 20, 30] and rec["method"] == "uniform"
    src = [tensors(run / "checkpoints" / f"step-{s:06d}") for s in (10, 20, 30)]
    got = tensors(tmp_path / "avg")
    assert set(got) == set(src[0])
    for name, t in got.items():
        mean = sum(s[name].double() for s in src) / 3
        torch.testing.assert_close(t, mean.float(), rtol=0, atol=1e-7)
        assert not torch.equal(t, src[-1][name]) or name.endswith("norm.weight")  # really averaged
    assert A.verify_model_dir(tmp_path / "avg") == [] and A.is_model_dir(tmp_path / "avg")
    loaded = A.load_model(tmp_path / "avg")
    assert loaded.origin.kind == "model" and loaded.config.data.path  # the run's config, data.path included
    source = json.loads((tmp_path / "avg" / A.SOURCE_FILE).read_text())
    assert source["checkpoints"][0]["model_sha256"] == A.read_manifest(run / "checkpoints" / "step-000010").sha256(A.MODEL_FILE)


def test_ema_weights_and_chosen_steps(run: Path, tmp_path: Path) -> None:
    rec = average(run, tmp_path / "ema", steps=[0, 20, 30], ema=0.9)
    w = [c["weight"] for c in rec["checkpoints"]]
    raw = [0.9 ** 30, 0.9 ** 10, 1.0]
    assert w == pytest.approx([r / sum(raw) for r in raw])
    src = [tensors(run / "checkpoints" / f"step-{s:06d}") for s in (0, 20, 30)]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sum(wi * s[name].double() for wi, s in zip(w, src)).float()
    torch.testing.assert_close(tensors(tmp_path / "ema")[name], expected, rtol=0, atol=1e-7)


def test_sample_and_eval_accept_the_averaged_model(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg"
    p = lmforge_in_process(["ckpt", "average", str(run), "--last", "2", "--out", str(out)])
    assert p.returncode == 0 and "averaged 2 checkpoints" in p.stdout, p.stderr
    p = lmforge_in_process(["sample", str(out), "--prompt", "ROMEO:", "--max-tokens", "8", "--seed", "1"])
    assert p.returncode == 0 and "(model directory)\nROMEO:" in p.stdout, p.stderr
    p = lmforge_in_process(["eval", str(out), "--json", "--max-batches", "2"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["metrics"]["loss"] > 0


def test_bad_requests_are_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="either --last N or --steps"):
        average(run, tmp_path / "x")
    with pytest.raises(CheckpointError, match=r"--last 50: .* has only 4 checkpoint\(s\) \(0, 10, 20, 30\)"):
        average(run, tmp_path / "x", last=50)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step\(s\) 15"):
        average(run, tmp_path / "x", steps=[10, 15])
    with pytest.raises(ConfigError, match=r"--ema must be within \(0, 1\) \(a decay per step"):
        average(run, tmp_path / "x", last=2, ema=1.5)
    with pytest.raises(CheckpointError, match="inside a run's checkpoints/"):
        average(run, run / "checkpoints" / "avg", last=2)
    # A damaged source checkpoint is refused by name, never skipped.
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(run, damaged)
    f = damaged / "checkpoints" / "step-000020" / A.MODEL_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged: .*step-000020.*model.safetensors"):
        average(damaged, tmp_path / "x", last=3)
    assert not (tmp_path / "x").exists()
    p = lmforge_in_process(["ckpt", "average", str(run), "--steps", "10,x", "--out", str(tmp_path / "y")])
    assert p.returncode == 2 and "--steps must be comma-separated step numbers" in p.stderr and "Traceback" not in p.stderr
