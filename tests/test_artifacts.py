"""artifacts.py: manifests that verify themselves, what a path names, and the one loader.

Issue 21.2: a checkpoint without its manifest is a damaged checkpoint, never a model directory.
Issue 21.5: any damage to MANIFEST.json is "corrupt: MANIFEST.json", never a KeyError/TypeError.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from lmforge import artifacts as A
from lmforge.config import load_config
from lmforge.errors import CheckpointError
from lmforge.model import Transformer
from lmforge.train.checkpoint import save_checkpoint
from lmforge.util import sha256_file


@pytest.fixture(scope="module")
def source_run(tiny_dataset: Path, tmp_path_factory) -> Path:
    """A run directory `exp1` with checkpoints at steps 10 and 20 (random weights, no training)."""
    cfg = load_config(TINY_CONFIG, [f"data.path={tiny_dataset}", "model.vocab_size=512"])
    rd = tmp_path_factory.mktemp("artifacts") / "exp1"
    rd.mkdir()
    cfg.save(rd / A.CONFIG_FILE)
    for step in (10, 20):
        torch.manual_seed(step)
        model = Transformer(cfg.model)
        save_checkpoint(rd, step, model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                        trainer_state={}, tokenizer_path=tiny_dataset / "tokenizer.json")
    return rd


@pytest.fixture()
def run(source_run: Path, tmp_path: Path) -> Path:
    """A copy of the source run that a test may damage."""
    return Path(shutil.copytree(source_run, tmp_path / "exp1"))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


# ---- the loader on each kind of path --------------------------------------------------------------


def test_load_model_accepts_a_run_a_checkpoint_and_a_model_directory(run: Path, tmp_path: Path) -> None:
    step20, step10 = run / "checkpoints" / "step-000020", run / "checkpoints" / "step-000010"
    by_run = A.load_model(run, device="cpu")
    assert by_run.origin == A.Origin("checkpoint", step20, 20, "exp1", A.read_manifest(step20).sha256(A.MODEL_FILE))
    assert same(weights(by_run.model), A.load_safetensors(step20 / A.MODEL_FILE))
    assert not by_run.model.training and by_run.config == A.read_config(step20)
    by_ckpt = A.load_model(step10, device="cpu")
    assert (by_ckpt.origin.kind, by_ckpt.origin.step, by_ckpt.origin.name) == ("checkpoint", 10, "exp1")
    assert not same(weights(by_ckpt.model), weights(by_run.model))

    mdir = A.write_model_dir(A.read_bundle(run), tmp_path / "models" / "m")  # what import/average write
    manifest = A.read_manifest(mdir)
    assert manifest.kind == "model" and manifest.step is None and A.verify_model_dir(mdir) == []
    assert set(manifest.files) == {A.MODEL_FILE, A.CONFIG_FILE, A.TOKENIZER_FILE, A.TOKENIZER_CONFIG, A.SOURCE_FILE}
    by_model = A.load_model(mdir, device="cpu")
    assert by_model.origin == A.Origin("model", mdir, None, "m", manifest.sha256(A.MODEL_FILE))
    assert same(weights(by_model.model), weights(by_run.model)) and by_model.origin.describe() == "model directory"
    assert A.is_model_dir(mdir) and not A.is_checkpoint_dir(mdir)

    (mdir / A.MANIFEST).unlink()  # a model directory imported by an earlier lmforge: still loads
    legacy = A.load_model(mdir, device="cpu")
    assert legacy.origin.model_sha256 == sha256_file(mdir / A.MODEL_FILE) == manifest.sha256(A.MODEL_FILE)
    assert A.is_model_dir(mdir) and A.verify_model_dir(mdir) == []

    half = A.load_model(run, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}


def test_load_model_into_an_existing_model_checks_its_shape(run: Path) -> None:
    cfg = A.read_config(run / "checkpoints" / "step-000020")
    target = Transformer(cfg.model)
    loaded = A.load_model(run, into=target)
    assert loaded.model is target and same(weights(target), A.load_safetensors(loaded.origin.path / A.MODEL_FILE))
    from dataclasses import replace

    wider = Transformer(replace(cfg.model, d_ff=cfg.model.ff_dim * 2))
    with pytest.raises(CheckpointError, match="do not fit the model's shape: .*mlp"):
        A.load_model(run, into=wider)


def test_paths_that_name_nothing_loadable_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run, checkpoint or model directory"):
        A.load_model(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        A.load_model(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a run, checkpoint or model directory"):
        A.load_model(tmp_path / "empty")


def test_artifacts_imports_no_torch() -> None:
    """The store and the dashboard read file names from artifacts; that must not cost a torch import."""
    code = "import sys, lmforge.artifacts; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# ---- 21.2: a checkpoint without its manifest is not a model ---------------------------------------


def _damage_floats(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-400:-200] = bytes(range(200))  # overwrite some floats of the last tensor: garbage, still loadable
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_manifest_is_deleted_is_refused_by_every_loader(run: Path, capsys) -> None:
    """The issue's recipe: rm MANIFEST.json of the newest checkpoint, damage its weights; every
    verb refuses it with one line and exit 2 (before: loaded as a model directory, step 0, garbage)."""
    ckpt = run / "checkpoints" / "step-000020"
    (ckpt / A.MANIFEST).unlink()
    _damage_floats(ckpt / A.MODEL_FILE)
    assert A.is_checkpoint_dir(ckpt) and not A.is_model_dir(ckpt)
    assert A.verify_checkpoint(ckpt) == [f"{ckpt}: incomplete: MANIFEST.json is missing"]
    for load in (A.load_model, A.read_bundle, A.resolve_origin):
        with pytest.raises(CheckpointError, match=r"^checkpoint refused: .*step-000020: incomplete: MANIFEST.json is missing$"):
            load(ckpt)
    renamed = ckpt.rename(run / "best")  # no longer named step-N nor under checkpoints/: trainer.json still tells
    assert A.is_checkpoint_dir(renamed) and not A.is_model_dir(renamed)
    with pytest.raises(CheckpointError, match="checkpoint refused"):
        A.load_model(renamed)
    renamed.rename(ckpt)
    # the run falls back to its newest intact checkpoint, saying why
    assert A.load_model(run, device="cpu").origin.step == 10
    assert "skipping" in capsys.readouterr().err

    for verb in (["sample", str(ckpt), "--prompt", "ROMEO:", "--max-tokens", "4"], ["eval", str(ckpt)],
                 ["export", str(ckpt), "--format", "hf", "--out", str(run.parent / "hf")],
                 ["serve", str(ckpt), "--port", "0"]):
        if verb[0] == "serve":  # a real process: a server that did start would not block this test forever
            r = subprocess.run(lmforge_cmd(*verb), capture_output=True, text=True, env=subprocess_env(), timeout=300)
        else:
            r = lmforge_in_process(verb)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (verb, r.stdout, r.stderr)
        assert "checkpoint refused" in lines[0] and "incomplete: MANIFEST.json is missing" in lines[0], verb
        assert r.stdout == "", verb
    assert not (run.parent / "hf").exists()


def test_a_model_directory_verifies_like_a_checkpoint(source_run: Path, tmp_path: Path) -> None:
    mdir = A.write_model_dir(A.read_bundle(source_run), tmp_path / "m")
    _damage_floats(mdir / A.MODEL_FILE)
    with pytest.raises(CheckpointError, match=r"model directory refused: .*model.safetensors fails its sha256 check"):
        A.load_model(mdir)
    r = subprocess.run(lmforge_cmd("ckpt", "verify", str(mdir)), capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 1 and "corrupt" in r.stdout and "fails its sha256 check" in r.stdout, r.stdout + r.stderr


# ---- 21.5: the manifest verifies itself ------------------------------------------------------


def test_every_damaged_manifest_byte_is_corrupt_never_a_crash(run: Path) -> None:
    """Each byte of a checkpoint's manifest inverted, and 400 seeded single-bit flips: verify
    reports "corrupt: MANIFEST.json" every time and the loader raises CheckpointError (before: 587
    of 7,928 flips passed, some as KeyError/TypeError or a wrong step)."""
    ckpt = run / "checkpoints" / "step-000020"
    good = (ckpt / A.MANIFEST).read_bytes()
    assert json.loads(good)["format_version"] == A.FORMAT_VERSION == 2
    rnd = random.Random(0)
    damaged = [(i, 0xFF) for i in range(len(good))] + [(rnd.randrange(len(good)), 1 << rnd.randrange(8)) for _ in range(400)]
    for i, mask in damaged:
        data = bytearray(good)
        data[i] ^= mask
        (ckpt / A.MANIFEST).write_bytes(bytes(data))
        problems = A.verify_checkpoint(ckpt)
        assert len(problems) == 1 and "corrupt: MANIFEST.json (" in problems[0], (i, mask, problems)
        with pytest.raises(CheckpointError, match="checkpoint refused: .*corrupt: MANIFEST.json"):
            A.resolve_origin(ckpt)
    (ckpt / A.MANIFEST).write_bytes(good)
    assert A.verify_checkpoint(ckpt) == []
    found, skipped = A.find_resume_checkpoint(run)
    assert found == ckpt and skipped == []


def _rewrite(ckpt: Path, change, *, reseal: bool) -> None:
    m = json.loads((ckpt / A.MANIFEST).read_text())
    change(m)
    if reseal:
        m["manifest_sha256"] = A.manifest_checksum(m)
    (ckpt / A.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change, reseal, message", [
    (lambda m: m.update(format_version="2"), True, r"corrupt: MANIFEST.json \(format_version must be an integer"),
    (lambda m: m.update(step=-1), True, r"corrupt: MANIFEST.json \(step must be an integer >= 0, got -1\)"),
    (lambda m: m.update(step=True), True, r"corrupt: MANIFEST.json \(step must be an integer"),
    (lambda m: m.update(rtep=m.pop("step")), True, r"corrupt: MANIFEST.json \(step must be an integer >= 0, got None\)"),
    (lambda m: m.update(step=21), True, r"records step 21, but the directory is named step-000020"),
    (lambda m: m.update(files=[]), True, r"corrupt: MANIFEST.json \(files must be a non-empty mapping"),
    (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), True, r"is not a relative path inside"),
    (lambda m: m["files"][A.MODEL_FILE].update(sha256="ab"), True, r"sha256 must be 64 hex digits"),
    (lambda m: m["files"][A.MODEL_FILE].update(bytes="12"), True, r"bytes must be an integer >= 0"),
    (lambda m: m.update(kind=None), True, r"kind must be a non-empty string"),
    (lambda m: m.update(kind="model"), True, r"describes a model directory, not a checkpoint directory"),
    (lambda m: m.pop("manifest_sha256"), False, r"corrupt: MANIFEST.json \(no manifest_sha256"),
    (lambda m: m.update(step=19), False, r"corrupt: MANIFEST.json \(its contents do not match its manifest_sha256"),
    (lambda m: m.update(format_version=3), True, r"format version 3 is newer than this lmforge understands \(2\); upgrade"),
])
def test_manifest_fields_are_schema_checked(run: Path, change, reseal, message) -> None:
    ckpt = run / "checkpoints" / "step-000020"
    _rewrite(ckpt, change, reseal=reseal)
    problems = A.verify_checkpoint(ckpt)
    assert any(__import__("re").search(message, p) for p in problems), problems
    with pytest.raises(CheckpointError):
        A.load_model(ckpt)


def test_format_1_manifests_still_verify_by_their_schema(run: Path) -> None:
    ckpt = run / "checkpoints" / "step-000020"
    _rewrite(ckpt, lambda m: [m.pop("manifest_sha256"), m.pop("kind"), m.update(format_version=1)], reseal=False)
    assert A.verify_checkpoint(ckpt) == [] and A.read_manifest(ckpt).kind == "checkpoint"
    assert A.load_model(ckpt, device="cpu").origin.step == 20
    _rewrite(ckpt, lambda m: m.update(format_version="1"), reseal=False)  # before: a TypeError in all 9 verbs
    assert "format_version must be an integer" in A.verify_checkpoint(ckpt)[0]


def test_write_manifest_covers_extra_keys_of_other_kinds(tmp_path: Path) -> None:
    d = tmp_path / "idx"
    (d / "sub").mkdir(parents=True)
    (d / "vectors.f16").write_bytes(b"\x00" * 10)
    (d / "sub" / "chunks.txt").write_text("a")
    written = A.write_manifest(d, kind="index", extra={"model_sha256": "f" * 64, "pooling": "mean"})
    assert set(written["files"]) == {"vectors.f16", "sub/chunks.txt"}
    assert A.verify_manifest(d, "index", ("vectors.f16",)) == []
    assert A.read_manifest(d).fields["pooling"] == "mean"
    _rewrite(d, lambda m: m.update(pooling="cls"), reseal=False)
    assert "corrupt: MANIFEST.json" in A.verify_manifest(d, "index")[0]
    with pytest.raises(ValueError, match="core field"):
        A.write_manifest(d, kind="index", extra={"step": 3})


# ---- every file of a checkpoint deleted or flipped, through every verb that loads one ----------------


def _checkpoint_files(run: Path) -> list[str]:
    ckpt = run / "checkpoints" / "step-000020"
    return [A.MANIFEST, *sorted(A.read_manifest(ckpt).files)]  # model, config, tokenizer, trainer, train_state/*


DAMAGES = [(name, kind) for name in ("MANIFEST.json", "model.safetensors", "config.yaml", "tokenizer.json", "trainer.json",
                                     "train_state/.metadata", "train_state/<shard>") for kind in ("delete", "flip")]


@pytest.mark.parametrize("name, kind", DAMAGES, ids=[f"{k}-{n}" for n, k in DAMAGES])
def test_a_damaged_checkpoint_file_is_refused_by_every_verb_naming_it(name: str, kind: str, tiny_run: Path, tiny_dataset: Path,
                                                                       tmp_path: Path, capsys, monkeypatch) -> None:
    """Each file of the newest checkpoint of a trained run, deleted or with one byte flipped: every verb
    given that checkpoint refuses it in one line naming the file (exit 2; `ckpt verify`: exit 1 and the
    file named in its report); `serve` refuses before it listens; given the run, the loaders and
    `train` (resume) fall back to the previous checkpoint with a warning naming the file."""
    from lmforge.cli import main
    import lmforge.serve.api as api

    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")  # main() sets it; monkeypatch puts it back
    monkeypatch.setattr(api, "listen", lambda *a: pytest.fail("serve listened with a damaged checkpoint"))
    monkeypatch.setattr(sys, "setswitchinterval", lambda _: None)  # serve_command's, process-wide
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    ckpt = run / "checkpoints" / "step-000020"
    if name == "train_state/<shard>":
        (name,) = [f for f in _checkpoint_files(run) if f.startswith("train_state/") and f != "train_state/.metadata"]
    assert name in _checkpoint_files(run)
    target = ckpt / name
    if kind == "delete":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x20
        target.write_bytes(bytes(data))
    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n", encoding="utf-8")
    labelled = tmp_path / "labelled.jsonl"  # what classify train reads: valid, so only the checkpoint is wrong
    labelled.write_text("".join(json.dumps({"text": f"{w} speaks {i}", "label": w}) + "\n"
                                for i in range(6) for w in ("ROMEO", "JULIET")), encoding="utf-8")

    def cli(*argv: str) -> tuple[int, str, list[str]]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, (argv, captured.err)
        return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]

    for argv in (["sample", str(ckpt), "--max-tokens", "2"], ["eval", str(ckpt), "--text", str(text)],
                 ["serve", str(ckpt), "--port", "0"],
                 ["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")],
                 ["export", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                 ["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "branch"), "--set", f"data.path={tiny_dataset}",
                  "--set", f"init.from={ckpt}"],
                 # the understanding verbs load the same way (issue 21's "new verbs get the same treatment")
                 ["embed", str(ckpt), str(text), "--out", str(tmp_path / "v.npy")],
                 ["index", "build", str(ckpt), str(text), "--out", str(tmp_path / "idx")],
                 ["topics", str(ckpt), str(labelled), "--out", str(tmp_path / "topics"), "--min-cluster-size", "2"],
                 ["classify", "train", str(ckpt), str(labelled), "--out", str(tmp_path / "clf")],
                 ["ckpt", "average", str(run), "--steps", "10,20", "--out", str(tmp_path / "avg")]):
        code, out, err = cli(*argv)
        assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (argv, code, err)
        assert name in err[0] and "step-000020" in err[0], (argv, err)
        assert out == "" or argv[0] == "sample" and not out.strip(), (argv, out)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists() and not (tmp_path / "branch").exists()
    assert not any((tmp_path / n).exists() for n in ("v.npy", "idx", "topics", "clf", "avg"))

    code, out, err = cli("ckpt", "verify", str(run))  # the report names the file; the older checkpoint is ok
    assert code == 1 and name in out and "1 ok, 1 damaged" in out, out

    code, out, err = cli("sample", str(run), "--max-tokens", "2")  # a run: its newest intact checkpoint
    assert code == 0 and "(step 10)" in out and any("skipping" in line and name in line for line in err), (out, err)
    code, out, err = cli("data", "inspect", str(run), "--step", "3", "--json")  # reads no checkpoint
    assert code == 0 and json.loads(out)["step"] == 2, out

    code, out, err = cli("train", "--run-dir", str(run), "--set", "train.max_steps=11")  # resume: from step 10
    assert code == 0 and any("skipping a damaged checkpoint" in line and name in line for line in err), err
    assert A.checkpoint_step(A.find_resume_checkpoint(run)[0]) == 11
