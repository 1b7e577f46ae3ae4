"""Checkpoints: complete, atomic, verified; damaged ones are refused with a clear message and
resume falls back to the previous intact one; retention keeps what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG
from lmforge import artifacts as A
from lmforge.artifacts import load_model
from lmforge.config import load_config
from lmforge.errors import CheckpointError, WriteError
from lmforge.train import checkpoint as ck
from lmforge.train.loop import build, save, train


@pytest.fixture()
def run(tiny_dataset, tmp_path):
    cfg = load_config(TINY_CONFIG, [f"data.path={tiny_dataset}", "model.vocab_size=512", "train.max_steps=20",
                                    "train.eval_every=0", "train.keep_last=10"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert train(build(cfg, run_dir)) == 0
    return cfg, run_dir


def test_checkpoint_is_complete_and_manifest_round_trips(run):
    cfg, run_dir = run
    names = [p.name for p in A.list_checkpoints(run_dir)]
    assert names == ["step-000000", "step-000010", "step-000020"]  # step 0: a rollback target
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000020"
    c = run_dir / "checkpoints" / "step-000020"
    manifest = json.loads((c / "MANIFEST.json").read_text())
    assert manifest["format_version"] == A.FORMAT_VERSION and manifest["step"] == 20
    listed = set(manifest["files"])
    on_disk = {p.relative_to(c).as_posix() for p in c.rglob("*") if p.is_file() and p.name != "MANIFEST.json"}
    assert listed == on_disk
    assert {"model.safetensors", "tokenizer.json", "config.yaml", "trainer.json"} <= listed
    assert any(name.startswith("train_state/") for name in listed)
    assert "tokenizer_config.json" not in listed  # a run without an origin (init.from) records no tokenizer facts
    state = json.loads((c / "trainer.json").read_text())
    assert state["step"] == 20 and state["loader"]["step"] == 20
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    assert A.read_config(c) == cfg
    assert A.verify_checkpoint(c) == []


def test_load_model_matches_trained_weights(run):
    cfg, run_dir = run
    loaded = load_model(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    ckpt = run_dir / "checkpoints" / "step-000020"
    assert loaded.config == cfg and tok.vocab_size == 512 and not model.training
    assert loaded.origin == A.Origin("checkpoint", ckpt, 20, "run", A.read_manifest(ckpt).sha256("model.safetensors"))
    tensors = A.load_safetensors(ckpt / "model.safetensors")
    for name, t in tensors.items():
        assert torch.equal(model.state_dict()[name], t)
    if cfg.model.tie_embeddings:
        assert "lm_head.weight" not in tensors
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors fails its sha256 check"),
        (lambda c: (c / "trainer.json").write_text((c / "trainer.json").read_text()[:50]), "trainer.json has"),
        (lambda c: (c / "MANIFEST.json").unlink(), "incomplete: MANIFEST.json is missing"),
        (lambda c: (c / "tokenizer.json").unlink(), "missing file tokenizer.json"),
        (lambda c: _flip_byte(next((c / "train_state").glob("*.distcp"))), "fails its sha256 check"),
    ],
    ids=["flipped-weights", "truncated-state", "no-manifest", "missing-file", "flipped-dcp"],
)
def test_damaged_newest_checkpoint_falls_back(run, damage, message):
    cfg, run_dir = run
    newest = run_dir / "checkpoints" / "step-000020"
    damage(newest)
    problems = A.verify_checkpoint(newest)
    assert any(message in p for p in problems), problems
    with pytest.raises(CheckpointError, match="checkpoint refused"):
        A.resolve_checkpoint(newest)
    found, skipped = A.find_resume_checkpoint(run_dir)
    assert found.name == "step-000010" and skipped
    resumed = build(cfg, run_dir)
    assert resumed.step == 10
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "checkpoint_corrupt" and message in events[-1]["problem"]


def test_every_checkpoint_damaged_is_a_clear_error(run):
    cfg, run_dir = run
    for c in A.list_checkpoints(run_dir):
        (c / "MANIFEST.json").unlink()
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="every checkpoint is damaged"):
        build(cfg, run_dir)


def test_every_damaged_checkpoint_is_warned_and_recorded_at_its_step(run, capsys):
    cfg, run_dir = run
    ckpts = A.list_checkpoints(run_dir)
    for c in ckpts:
        _flip_byte(c / "model.safetensors")
    (ckpts[0] / "MANIFEST.json").write_text('{"format_version": 1, "files": []}')  # malformed: a problem, not a crash
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError) as e:
        build(cfg, run_dir)
    assert "every checkpoint is damaged (step-000000, step-000010, step-000020)" in str(e.value)
    err = capsys.readouterr().err
    assert [c.name in err for c in ckpts] == [True, True, True]  # a warning for each one
    assert "corrupt: MANIFEST.json (step must be an integer >= 0, got None)" in err
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    corrupt = [(e["step"], e["path"]) for e in events if e["kind"] == "checkpoint_corrupt"]
    assert corrupt == [(20, str(ckpts[2])), (10, str(ckpts[1])), (0, str(ckpts[0]))]  # the damaged checkpoint's step


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such run or checkpoint"):
        A.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a run, checkpoint or model directory"):
        A.resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="holds no intact checkpoint"):
        A.resolve_checkpoint(tmp_path / "empty")


def test_retention_keeps_last_k_and_every_m(tmp_path):
    run_dir = tmp_path / "r"
    for step in range(10, 101, 10):
        d = A.checkpoints_dir(run_dir) / A.checkpoint_name(step)
        d.mkdir(parents=True)
    deleted = ck.apply_retention(run_dir, keep_last=2, keep_every=40)
    kept = [p.name for p in A.list_checkpoints(run_dir)]
    assert kept == ["step-000040", "step-000080", "step-000090", "step-000100"]
    assert len(deleted) == 6


def test_a_kill_during_retention_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Deletion renames the checkpoint to a hidden name before removing files, so a kill in the
    middle (simulated: the removal dies after one file) leaves no damaged checkpoint behind, and
    the next retention pass removes the leftover."""
    run_dir = tmp_path / "r"
    for step in (10, 20, 30):
        d = A.checkpoints_dir(run_dir) / A.checkpoint_name(step)
        d.mkdir(parents=True)
        for name in ("a.bin", "b.bin"):
            (d / name).write_bytes(b"x")
    real_rmtree = ck.shutil.rmtree

    def killed(path, *a, **k):
        path = Path(path)
        if path.name.startswith(".deleting-") and path.exists():
            (path / "a.bin").unlink()
            raise KeyboardInterrupt  # the process dies here
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.apply_retention(run_dir, keep_last=1, keep_every=0)
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    names = sorted(p.name for p in A.checkpoints_dir(run_dir).iterdir())
    assert names == [".deleting-step-000010", "step-000020", "step-000030"]
    assert [p.name for p in A.list_checkpoints(run_dir)] == ["step-000020", "step-000030"]  # both complete
    assert all(sorted(f.name for f in p.iterdir()) == ["a.bin", "b.bin"] for p in A.list_checkpoints(run_dir))
    ck.apply_retention(run_dir, keep_last=1, keep_every=0)
    assert sorted(p.name for p in A.checkpoints_dir(run_dir).iterdir()) == ["step-000030"]


def test_failed_write_leaves_previous_checkpoint_intact(run, monkeypatch):
    cfg, run_dir = run
    r = build(cfg, run_dir)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "write_manifest", disk_full)
    r.step = 30
    with pytest.raises(WriteError, match=r"^disk full at .*checkpoints, [\d,]+ bytes free; training stopped at step 30 "
                       r"before its checkpoint was published; the newest checkpoint \(.*step-000020\) is intact"):
        save(r)
    assert [p.name for p in A.list_checkpoints(run_dir)] == ["step-000000", "step-000010", "step-000020"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000020"
    assert A.verify_checkpoint(run_dir / "checkpoints" / "step-000020") == []
