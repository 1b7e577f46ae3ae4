"""`lmforge prepare` and `lmforge data info/verify/inspect`: contents, stability, atomicity, errors.

CLI behaviour is tested through real subprocesses (`python -m lmforge ...`): message and exit code.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import lmforge_in_process
from lmforge.data import prepare as prep
from lmforge.data.hygiene import Settings
from lmforge.data.inspect import DocumentIndex
from lmforge.data.manifest import verify_dataset
from lmforge.data.loader import TokenDataset
from lmforge.errors import DataError
from lmforge.tokenizer import EOS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def lmforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI through its `main`, in this process (conftest.lmforge_in_process): an exception other
    than an exit fails the test, as a traceback on a user's screen would."""
    return lmforge_in_process([*map(str, args)], env={"COLUMNS": "200"}, cwd=cwd)


def write_corpus(root: Path) -> Path:
    """A small mixed corpus: text, markdown, code in a subdirectory, JSONL, and files to skip."""
    corpus = root / "corpus"
    (corpus / "src").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden: never read
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (i + 3) + "\n")
    (corpus / "notes.md").write_text("# Notes\n\nGrüße — naïve café 😀\n")
    (corpus / "src" / "main.py").write_text("def main() -> int:\n    return 42\n")
    (corpus / "src" / "skip.log").write_text("noise " * 50)
    lines = [json.dumps({"text": f"ticket {i}: printer on floor {i} is on fire", "id": i}) for i in range(20)]
    (corpus / "tickets.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    return corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prep")
    corpus = write_corpus(root)
    # Hygiene off: these tests are about the format (tests/test_hygiene.py covers the stages); the
    # corpus repeats one sentence on purpose, which the quality filters would rightly remove.
    out = prep.prepare([corpus], root / "ds", vocab_size=300, exclude=["*.log"], val_fraction=0.2, shard_tokens=200,
                       hygiene=Settings.off())
    return corpus, out


def read_split(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=m["dtype"])


def test_manifest_fields_and_shards(built) -> None:
    corpus, out = built
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["manifest.json", "tokenizer.json"]
    assert m["format_version"] == 1 and m["dtype"] == "uint16" and m["vocab_size"] <= 300
    assert m["tokenizer_sha256"] == Tokenizer.load(out).sha256
    assert m["eos_id"] == Tokenizer.load(out).eos_id
    assert len(m["fingerprint"]) == 16
    names = sorted(Path(s["path"]).name for s in m["sources"])
    assert names == sorted([f"doc{i:02d}.txt" for i in range(12)] + ["notes.md", "main.py", "tickets.jsonl"])
    assert {s["path"]: s["bytes"] for s in m["sources"]} == {s["path"]: Path(s["path"]).stat().st_size for s in m["sources"]}
    assert sum(s["documents"] for s in m["sources"]) == 12 + 1 + 1 + 20
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) > 0
        assert all(0 < s["tokens"] <= 200 for s in info["shards"])  # bounded shards
        assert all((out / s["file"]).stat().st_size == 2 * s["tokens"] for s in info["shards"])
    assert len(m["splits"]["train"]["shards"]) > 1
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 34


def test_streams_are_documents_followed_by_eos(built) -> None:
    """Decoding each indexed document's tokens gives back exactly its source text + eos."""
    _, out = built
    m = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.load(out)
    for split in ("train", "val"):
        stream = read_split(out, split)
        index = DocumentIndex.from_manifest(m, split)
        ends = list(index.starts[1:]) + [len(stream)]
        for start, end, src, off in zip(index.starts, ends, index.sources, index.byte_offsets):
            text = tok.decode(stream[start:end])
            source = m["sources"][src]
            assert text.endswith(EOS) and EOS not in text[: -len(EOS)]
            raw = Path(source["path"]).read_bytes()
            if source["kind"] == "text":
                assert raw[off:].decode().startswith(text[: -len(EOS)])
            else:
                line = raw[off:].split(b"\n", 1)[0]
                assert json.loads(line)["text"] == text[: -len(EOS)]


def test_split_is_by_content_and_stable_when_the_corpus_grows(built, tmp_path) -> None:
    corpus, out = built

    def splits(ds: Path) -> dict[tuple[str, int], int]:
        m = json.loads((ds / "manifest.json").read_text())
        return {(m["sources"][r[3]]["path"], r[4]): r[0] for r in m["document_index"]["rows"]}

    before = splits(out)
    grown = tmp_path / "grown"
    shutil.copytree(corpus, grown)
    for i in range(30):
        (grown / f"new{i:02d}.txt").write_text(f"A new document number {i} about something else entirely.\n")
    out2 = prep.prepare([grown], tmp_path / "ds2", tokenizer=out / "tokenizer.json", exclude=["*.log"], val_fraction=0.2,
                        hygiene=Settings.off())
    after = {(p.replace(str(grown), str(corpus)), o): s for (p, o), s in splits(out2).items()}
    assert before.items() <= after.items()  # every old document kept its split
    assert 0 < sum(after.values()) < len(after)  # both splits used


def test_big_text_file_is_cut_at_blank_lines_and_val_is_never_silently_empty(tmp_path) -> None:
    out = prep.prepare([SHAKESPEARE], tmp_path / "ds", vocab_size=300, val_fraction=0.001)
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"][0]["documents"] == 1_115_394 // prep.DOC_MAX_BYTES  # ~64 KiB pieces
    # 0.1% of 17 documents rounds to none; the document with the smallest hash goes to val
    assert m["splits"]["val"]["documents"] == 1
    raw = SHAKESPEARE.read_bytes()
    assert all(raw[r[4] - 2 : r[4]] == b"\n\n" for r in m["document_index"]["rows"] if r[4] > 0)


def test_cut_points_table() -> None:
    data = b"aaaa\n\nbbbb\n\ncccc"
    assert prep._cut_points(data, 100) == [0]
    assert prep._cut_points(data, 3) == [0, 6, 12, 15]  # "cccc" has no newline: cut at the limit
    assert prep._cut_points(b"x" * 10, 4) == [0, 4, 8]  # no newline: cut anyway
    assert prep._cut_points("ééééé".encode(), 3) == [0, 4, 8]  # ... but never inside a character


def test_uint32_shards_for_large_vocabularies(tmp_path) -> None:
    tok = Tokenizer.train(["hello world " * 50], vocab_size=300)
    tok.hf.add_tokens([f"zq{i}x" for i in range(65_600)])  # pushes ids past 65535
    tok.save(tmp_path / "big.json")
    (tmp_path / "c.txt").write_text("hello zq65500x world\n")
    out = prep.prepare([tmp_path / "c.txt"], tmp_path / "ds", tokenizer=tmp_path / "big.json", val_fraction=0.0,
                       hygiene=Settings.off())  # a three-word document
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint32"
    stream = read_split(out, "train")
    assert stream.max() > 65_535 and Tokenizer.load(out).decode(stream) == "hello zq65500x world\n" + EOS


def test_extra_special_tokens(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    r = lmforge("prepare", tmp_path / "a.txt", "--out", tmp_path / "ds", "--vocab-size", 300,
                "--special-tokens", "<|bos|>,<|eos|>,<|pad|>,<|sep|>", "--val-fraction", 0)
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.load(tmp_path / "ds")
    assert [tok.hf.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|sep|>")] == [0, 1, 2, 3]


def test_include_and_duplicates(tmp_path) -> None:
    corpus = write_corpus(tmp_path)
    sources = prep.collect_sources([corpus, corpus / "notes.md"], include=["*.md", "src/*"], exclude=["*.log"])
    assert [s.path.name for s in sources] == ["notes.md", "main.py"]


def test_non_utf8_is_skipped_and_reported_or_fatal_with_strict(tmp_path) -> None:
    corpus = write_corpus(tmp_path)
    (corpus / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    out = prep.prepare([corpus], tmp_path / "ds", vocab_size=300)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == [{"path": str((corpus / "latin1.txt").resolve()), "reason": "not UTF-8"}]
    assert all(s["documents"] == 0 for s in m["sources"] if s["path"].endswith("latin1.txt"))
    r = lmforge("prepare", corpus, "--out", tmp_path / "strict", "--vocab-size", 300, "--strict")
    assert r.returncode == 2, r.stderr
    assert "latin1.txt: not UTF-8" in r.stderr and "--strict" in r.stderr
    assert not (tmp_path / "strict").exists()


def test_full_disk_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path)
    calls = {"n": 0}
    real_add = prep._SplitWriter.add

    def add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "train-00000.bin"))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(prep._SplitWriter, "add", add)
    with pytest.raises(DataError, match="disk full"):
        prep.prepare([corpus], tmp_path / "out" / "ds", vocab_size=300)
    assert list((tmp_path / "out").iterdir()) == []  # no dataset, no temporary directory


def test_cli_end_to_end_info_verify_inspect(tmp_path) -> None:
    corpus = write_corpus(tmp_path)
    r = lmforge("prepare", corpus, "--out", tmp_path / "ds", "--vocab-size", 300, "--val-fraction", 0.2, "--exclude", "*.log")
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stderr  # the summary (progress bars are drawn only on a terminal: util.progress_bar)
    info = json.loads(lmforge("data", "info", tmp_path / "ds", "--json").stdout)
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert info["train_tokens"] == m["splits"]["train"]["tokens"] and info["sources"] == 15
    r = lmforge("data", "verify", tmp_path / "ds")
    assert r.returncode == 0 and "ok" in r.stdout  # results go to stdout
    r = lmforge("data", "inspect", tmp_path / "ds", "--step", 2, "--seq-len", 16, "--global-batch", 4, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["step"] == 2 and len(shown["samples"]) == 4
    for sample in shown["samples"]:
        first = sample["documents"][0]
        raw = Path(first["source"]).read_bytes()
        if first["kind"] == "text":  # traced to the exact byte where the window starts
            assert raw[first["byte_offset"] :].decode().startswith(sample["text"].split(EOS)[0])
    r = lmforge("data", "inspect", tmp_path / "ds", "--step", 0, "--seq-len", 16, "--global-batch", 2)
    assert r.returncode == 0 and "source @ byte offset" in r.stdout


def test_verify_names_the_shard_with_a_flipped_byte(built, tmp_path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(built[1], ds)
    assert verify_dataset(ds) == []
    shard = ds / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_dataset(ds) == ["train-00001.bin: sha256 mismatch (the shard is corrupt; re-run prepare)"]
    r = lmforge("data", "verify", ds)
    assert r.returncode == 1 and "train-00001.bin" in r.stdout and "train-00000.bin" not in r.stdout
    (ds / "val-00000.bin").unlink()
    assert "val-00000.bin: missing" in verify_dataset(ds)


def test_verify_names_a_changed_tokenizer_and_a_malformed_manifest(built, tmp_path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(built[1], ds)
    Tokenizer.train(["other text"] * 3, vocab_size=270).save(ds / "tokenizer.json")
    (problem,) = verify_dataset(ds)
    assert problem.startswith("tokenizer.json: sha256") and "does not match the manifest" in problem
    m = json.loads((ds / "manifest.json").read_text())
    del m["splits"]
    (ds / "manifest.json").write_text(json.dumps(m))
    assert verify_dataset(ds) == ["manifest.json: malformed (KeyError: 'splits'); re-run prepare"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "input not found: {tmp}/nope"),
        ("empty_dir", "empty corpus: no files found in {tmp}/empty"),
        ("blank_file", "empty corpus: no text found in 1 file(s)"),
        ("jsonl_field", "{tmp}/t.jsonl:2: no field 'text' (found: ['body']); choose the field with --text-field"),
        ("jsonl_bad", "{tmp}/t.jsonl:1: invalid JSON (Expecting property name enclosed in double quotes at column 2); "
                      "expected one JSON object per line with a 'text' field"),
        ("exists", "output already exists and is not a prepared dataset: {tmp}/out (no manifest.json: keep.txt)"),
        ("unwritable", "cannot write dataset {tmp}/afile/out"),
        ("val_fraction", "argument --val-fraction: must be within [0, 1), got 1.5"),
        ("tokenizer", "tokenizer not found: {tmp}/tok.json"),
        ("not_dataset", "not a prepared dataset: {tmp} has no manifest.json"),
        ("specials", "special tokens must include '<|pad|>'"),
    ],
)
def test_cli_bad_inputs(case: str, message: str, tmp_path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("some text\n")
    out = tmp_path / "out"
    args: list = ["prepare", good, "--out", out, "--vocab-size", 300]
    if case == "missing":
        args[1] = tmp_path / "nope"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif case == "blank_file":
        good.write_text("  \n\n")
    elif case in ("jsonl_field", "jsonl_bad"):
        lines = ['{"text": "fine"}', '{"body": "no text field"}'] if case == "jsonl_field" else ["{oops"]
        (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
        args[1] = tmp_path / "t.jsonl"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "unwritable":
        (tmp_path / "afile").write_text("a file, not a directory")
        args[3] = tmp_path / "afile" / "out"
    elif case == "val_fraction":
        args += ["--val-fraction", 1.5]
    elif case == "tokenizer":
        args += ["--tokenizer", tmp_path / "tok.json"]
    elif case == "not_dataset":
        args = ["data", "verify", tmp_path]
    elif case == "specials":
        args += ["--special-tokens", "<|bos|>,<|eos|>"]
    r = lmforge(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message.format(tmp=tmp_path) in " ".join(r.stderr.split()), r.stderr
    assert "Traceback" not in r.stderr
    if case == "exists":
        assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    elif case != "not_dataset":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_overwrite_replaces_atomically(built, tmp_path) -> None:
    corpus, _ = built
    out = prep.prepare([corpus / "notes.md"], tmp_path / "ds", vocab_size=300, val_fraction=0.0)
    first = json.loads((out / "manifest.json").read_text())["fingerprint"]
    prep.prepare([corpus / "src"], out, vocab_size=300, val_fraction=0.0, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] != first
    assert TokenDataset(out).n_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_overwrite_replaces_an_empty_directory(built, tmp_path) -> None:
    (tmp_path / "ds").mkdir()
    r = lmforge("prepare", built[0] / "notes.md", "--out", tmp_path / "ds", "--tokenizer", built[1], "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ds" / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def snapshot(root: Path) -> list[tuple[str, str, bytes]]:
    """Every entry under root (hidden ones included) with its kind and, for files and links, content."""
    def entry(p: Path) -> tuple[str, str, bytes]:
        if p.is_symlink():
            return (str(p.relative_to(root)), "link", os.readlink(p).encode())
        return (str(p.relative_to(root)), "file", p.read_bytes()) if p.is_file() else (str(p.relative_to(root)), "dir", b"")
    return sorted(entry(p) for p in root.rglob("*"))


@pytest.mark.parametrize("case", ["notes_dir", "manifest_and_notes", "file", "symlink"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_that_is_not_a_dataset_is_never_replaced(case: str, overwrite: bool, built, tmp_path) -> None:
    """--overwrite only replaces a prepared dataset: a user's directory or file is left exactly as it was."""
    out = tmp_path / "victim"
    if case == "notes_dir":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        message = "output already exists and is not a prepared dataset: {out} (no manifest.json: notes.txt)"
    elif case == "manifest_and_notes":  # a manifest.json alone does not make it ours to delete
        shutil.copytree(built[1], out)
        (out / "notes.txt").write_text("precious")
        message = "output already exists and is not a prepared dataset: {out} (files a dataset does not have: notes.txt)"
    elif case == "file":
        out.write_text("precious")
        message = "output already exists and is a file, not a dataset: {out}; choose another --out"
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "notes.txt").write_text("precious")
        out.symlink_to(tmp_path / "real")
        message = "output {out} is a symbolic link; pass the directory it points to as --out"
    before = snapshot(tmp_path)
    r = lmforge("prepare", built[0] / "notes.md", "--out", out, "--tokenizer", built[1], *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message.format(out=out) in " ".join(r.stderr.split()), r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr  # one line, refused before any work
    assert snapshot(tmp_path) == before  # untouched, and no .victim.old / temporary left beside it


@pytest.mark.parametrize("case", ["same", "out_inside_input", "out_contains_input"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_overlapping_an_input_is_refused_before_any_work(case: str, overwrite: bool, built, tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("my only copy\n")
    inp, out = {
        "same": (corpus, corpus),
        "out_inside_input": (corpus, corpus / "ds"),
        "out_contains_input": (corpus / "a.txt", corpus),
    }[case]
    message = {
        "same": f"--out {out} is also an input",
        "out_inside_input": f"--out {out} is inside the input {inp}",
        "out_contains_input": f"--out {out} contains the input {inp}",
    }[case]
    r = lmforge("prepare", inp, "--out", out, "--tokenizer", built[1], *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "corpus"]
    assert (corpus / "a.txt").read_text() == "my only copy\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("one_document", "the val split is empty (the corpus is a single document"),
        ("zero_fraction", "the val split is empty (--val-fraction is 0)"),
        ("short", "fewer than one window of seq_len + 1 = 257 at the default data.seq_len"),
    ],
)
def test_val_split_too_small_to_validate_on_warns(case: str, message: str, built, tmp_path) -> None:
    """The dataset is written, but prepare says (not the first validation, after training) that val is unusable."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    n_docs = 1 if case == "one_document" else 3
    for i in range(n_docs):
        (corpus / f"d{i}.txt").write_text(f"document {i}: a few words of text\n")
    fraction = "0" if case == "zero_fraction" else "0.01"
    r = lmforge("prepare", corpus, "--out", tmp_path / "ds", "--tokenizer", built[1], "--val-fraction", fraction)
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "warning:" in err and message in err, err
    assert "train.eval_every=0" in err
    assert ("add more documents" in err) if case != "zero_fraction" else ("--val-fraction > 0" in err)
    if case == "short":
        val = json.loads((tmp_path / "ds" / "manifest.json").read_text())["splits"]["val"]
        assert f"the val split has {val['tokens']} tokens" in err and "raise --val-fraction" in err


def test_no_val_warning_when_val_holds_a_window(tmp_path, capsys) -> None:
    prep.prepare([SHAKESPEARE], tmp_path / "ds", vocab_size=300, val_fraction=0.1)
    assert "warning:" not in capsys.readouterr().err


def test_inspect_bad_step_and_seq_len_are_clean_errors(built, tmp_path) -> None:
    _, ds = built
    r = lmforge("data", "inspect", ds, "--step", -1, "--seq-len", 16, "--global-batch", 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "argument --step: must be >= 0 (data steps count from 0; a run's training steps from 1), got -1" in r.stderr
    r = lmforge("data", "inspect", ds, "--step", 0, "--seq-len", 10_000_000, "--global-batch", 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    n = json.loads((ds / "manifest.json").read_text())["splits"]["train"]["tokens"]
    want = f"{ds}: the train split has {n} tokens, fewer than one sample of seq_len + 1 = 10000001; use a smaller seq_len"
    assert want in " ".join(r.stderr.split()), r.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data: {}\n")
    r = lmforge("data", "inspect", run, "--step", 0)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--step with a run directory is a training step as logged (1, 2, ...), got 0" in r.stderr
