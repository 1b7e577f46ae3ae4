"""The search index (lmforge/understand/index): chunk spans, exact and approximate search, BM25 and
reciprocal rank fusion, build / add / info / verify / tune through the CLI, refusals of bad input,
and `index add` killed with SIGKILL at several points leaving a verifiable index."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env

from lmforge import artifacts, convert
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.understand.index import search as S
from lmforge.understand.index.chunk import Chunking, check_size, cut, record_span, text_spans
from lmforge.understand.index.store import VECTORS, Index, verify_index

DOCS = {
    "printer.md": "# Printers\n\nTo reset the printer on floor 3, hold the power button for ten seconds.\n"
                  "Then wait until the green light blinks twice.\n\nToner lives in the cupboard by the lift.\n",
    "vpn.md": "# VPN\n\nIf the VPN drops every hour, renew the client certificate in the settings.\n"
              "The certificate expires after 60 minutes when the clock is wrong.\n",
    "code/util.py": "def read_config(path):\n    \"\"\"Read a YAML config file and return a dict.\"\"\"\n"
                    "    with open(path) as f:\n        return yaml.safe_load(f)\n\n\n"
                    "def parse_port(text):\n    return int(text)\n",
}
RECORDS = [{"id": "T-17", "text": "The coffee machine on floor 2 needs descaling every month."},
           {"id": 18, "text": "Badge access for visitors is granted at the front desk."},
           {"text": "Parking spaces are assigned by the facilities team."}]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The error line of a refused command (rich may wrap it: joined back)."""
    text = " ".join(err.split())
    assert "error:" in text and "Traceback" not in err, err
    return text[text.index("error:"):]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = list(DOCS.values()) + [r["text"] for r in RECORDS]
    return Tokenizer.train(texts * 5, vocab_size=400, min_frequency=1)


def model_dir(tok: Tokenizer, root: Path, seed: int, max_seq_len: int = 256) -> Path:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    max_seq_len=max_seq_len))
    return artifacts.write_model_dir(convert.bundle_from_model(model, tok), root / f"model{seed}")


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return model_dir(tok, root, 0), model_dir(tok, root, 1)


def write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    for name, text in DOCS.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text)
    (corpus / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")  # not UTF-8: skipped and counted
    return corpus


@pytest.fixture(scope="module")
def built(models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("built")
    corpus = write_corpus(root)
    assert main(["index", "build", str(models[0]), str(corpus), "--out", str(root / "idx" / "a"),
                 "--chunk-size", "24", "--chunk-overlap", "4"]) == 0
    return root / "idx" / "a"


# ---- chunking --------------------------------------------------------------------------------------


def byte_tokenizer() -> Tokenizer:
    """The smallest byte-level BPE: one token per byte, so token windows are byte windows."""
    tok = Tokenizer.train(["x"], vocab_size=259)
    assert tok.vocab_size == 259
    return tok


def test_chunker_golden_spans() -> None:
    tok = byte_tokenizer()
    text = "".join(f"line{i}\n" for i in range(10))  # 10 lines of 6 bytes
    pieces = cut(text, tok.hf.encode(text, add_special_tokens=False).offsets, Chunking(16, 4))
    spans = [(s.line_start, s.line_end, s.byte_start, s.byte_end) for s in text_spans(text.encode(), 0, text, pieces)]
    # a window of 16 bytes ends after its last whole line (12 bytes); the next starts at a line start
    # inside (or, when none is, just before) the overlap: two lines a chunk, one line shared
    assert spans == [(1, 2, 0, 12), (2, 3, 6, 18), (3, 4, 12, 24), (4, 5, 18, 30), (5, 6, 24, 36),
                     (6, 7, 30, 42), (7, 8, 36, 48), (8, 9, 42, 54), (9, 10, 48, 60)]
    assert [p.tokens for p in pieces] == [12] * 9

    # multi-byte characters, a line longer than a window, a document that starts mid-file
    doc = "héllo wörld\n" + "x" * 40 + "\nend\n"
    data = b"HEADER\n\n" + doc.encode()
    pieces = cut(doc, tok.hf.encode(doc, add_special_tokens=False).offsets, Chunking(16, 4))
    spans = list(text_spans(data, 8, doc, pieces))
    assert [(s.line_start, s.line_end, s.byte_start, s.byte_end) for s in spans] == \
        [(3, 3, 8, 22), (4, 4, 22, 38), (4, 4, 34, 50), (4, 4, 46, 62), (4, 5, 58, 67)]
    for s, p in zip(spans, pieces):  # every span's bytes are the chunk's text
        assert data[s.byte_start:s.byte_end].decode() == doc[p.start:p.end]
    assert max(p.tokens for p in pieces) <= 16

    # a JSONL record: its line and that line's bytes, and its id
    jsonl = b'{"text": "a"}\n{"id": 7, "text": "b"}\n'
    assert record_span(jsonl, 14, "7") == type(spans[0])(2, 2, 14, 36, "7")  # up to its newline


def test_chunk_size_checks() -> None:
    check_size(Chunking(64, 8), context=64)
    with pytest.raises(LmforgeError, match="--chunk-size 65 is larger than the model's context of 64 tokens"):
        check_size(Chunking(65, 8), context=64)
    with pytest.raises(LmforgeError, match="3 of them taken by the document prefix"):
        check_size(Chunking(63, 8), context=64, reserved=3)
    with pytest.raises(LmforgeError, match="--chunk-overlap"):
        check_size(Chunking(32, 17), context=64)


# ---- search primitives -------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_equals_brute_force(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((5000, 32))).astype(np.float16)
    queries = unit(rng.standard_normal((7, 32)))
    brute = vectors.astype(np.float32) @ queries.T  # (N, Q)
    for block in (S._BLOCK, 700):  # one block, and many blocks merged
        monkeypatch.setattr(S, "_BLOCK", block)
        rows, scores = S.exact_search(vectors, queries, 10)
        for q in range(len(queries)):
            want = np.argsort(-brute[:, q], kind="stable")[:10]
            assert rows[q].tolist() == want.tolist()
            assert np.allclose(scores[q], brute[want, q], atol=1e-6)
    rows, _ = S.exact_search(vectors[:3], queries[:1], 10)  # fewer rows than k
    assert sorted(rows[0].tolist()) == [0, 1, 2]


def test_ann_recall_on_synthetic_data() -> None:
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((50, 32))
    vectors = unit(centers[rng.integers(0, 50, 20_000)] + 0.6 * rng.standard_normal((20_000, 32))).astype(np.float16)
    queries = unit(centers[rng.integers(0, 50, 100)] + 0.6 * rng.standard_normal((100, 32)))
    exact, _ = S.exact_search(vectors, queries, 10)
    ann = S.Ann.build(vectors)
    rows, _ = S.rescore(vectors, queries, ann.search(queries, S.CANDIDATES), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    assert recall >= 0.95, recall


def test_rrf_golden_order() -> None:
    fused = S.rrf([[1, 2, 3], [3, 1, 4]], k=60)
    assert [r for r, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62) and fused[3][1] == pytest.approx(1 / 63)
    assert [r for r, _ in S.rrf([[5, 6], [6, 5]])] == [5, 6]  # a tie keeps the first ranking's order


def test_weighted_rrf_golden() -> None:
    fused = S.rrf([[1, 2, 3], [3, 1, 4]], k=1, weights=(1.0, 0.3))
    assert [r for r, _ in fused] == [1, 3, 2, 4]  # row 3: 1/4 + 0.3/2 = 0.40 above row 2: 1/3
    assert fused[0][1] == pytest.approx(1 / 2 + 0.3 / 3) and fused[1][1] == pytest.approx(1 / 4 + 0.3 / 2)
    assert fused[2][1] == pytest.approx(1 / 3) and fused[3][1] == pytest.approx(0.3 / 4)
    s = S.Settings("hybrid", 1, 0.3)
    assert s.fuse([1, 2, 3], [3, 1, 4]) == fused and S.Settings().fuse([1, 2], [2, 1]) == S.rrf([[1, 2], [2, 1]])


def test_tune_grid_scores_golden() -> None:
    from lmforge.understand.index import tune as T

    # query 0: the model ranks its text (row 0) 2nd, BM25 1st; query 1: the model 1st, BM25 3rd
    dense, bm25 = [[5, 0, 6], [1, 7, 8]], [[0, 9, 4], [7, 8, 1]]
    scored = dict(T.score_grid(dense, bm25))
    g = 1 / np.log2(3)  # the gain at rank 2
    assert scored[S.Settings("dense")] == pytest.approx((g + 1) / 2)
    assert scored[S.Settings("bm25")] == pytest.approx((1 + 1 / np.log2(4)) / 2)
    # rrf k=1, bm25 weight 0.5: query 0 -> row 0 (1/3 + 0.5/2) above row 5 (1/2);
    # query 1 -> row 1 (1/2 + 0.5/4) above row 7 (1/3 + 0.5/2): both first
    assert scored[S.Settings("hybrid", 1, 0.5)] == pytest.approx(1.0)
    # plain rrf (k=60, equal weights): query 1 -> row 7 (1/62 + 1/61) above row 1 (1/61 + 1/63)
    assert scored[S.Settings("hybrid", 60, 1.0)] == pytest.approx((1 + g) / 2)
    chosen, score = T.best(T.score_grid(dense, bm25))
    assert score == pytest.approx(1.0) and chosen.mode == "hybrid"
    assert T.best([(S.Settings("dense"), 0.5), (S.Settings("bm25"), 0.5)])[0] == S.Settings("dense")


def test_bm25_words_split_identifiers() -> None:
    assert S.words("read_config(HTTPServer) readConfig 42 the") == ["read", "config", "http", "server", "read",
                                                                      "config", "42"]


def test_bm25_words_of_any_script() -> None:
    assert S.words("Café CAFÉ naïve Straße ÜberClass ＡＢＣ ２０２６") == ["cafe", "cafe", "naive", "strasse", "uberclass",
                                                                    "abc", "2026"]
    assert S.words("プリンターの再起動 한국어 文") == ["プリ", "リン", "ンタ", "ター", "ーの", "の再", "再起", "起動", "한국", "국어", "文"]
    # on ASCII text the older rule and this one agree, so an index of the older rule keeps answering alike
    text = "read_config(HTTPServer) readConfig 42 the x_y z9 HTMLParser2Go"
    assert S.words(text) == S.words(text, "words-v1")
    assert S.words("Café", "words-v1") == ["caf"]  # what it did to accents: why v2


def test_bm25_finds_words_of_other_scripts_and_survives_a_corpus_without_terms() -> None:
    bm = S.Bm25.build(["プリンターの再起動は電源ボタンを長押し", "VPNが切れる場合は証明書を更新", "Un café crème, s'il vous plaît"])
    assert bm.search("再起動", 3)[0].tolist() == [0] and bm.search("証明書", 3)[0].tolist() == [1]
    assert bm.search("cafe creme", 3)[0].tolist() == [2]
    empty = S.Bm25.build(["!!!", "..."])  # nothing to index: no crash, and nothing found
    assert empty.search("anything", 2)[0].tolist() == []


def test_an_index_of_the_older_term_rule_splits_queries_by_it(built, tmp_path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(built, old)
    m = json.loads((old / "MANIFEST.json").read_text())
    assert m["bm25"]["terms"] == S.TERMS
    m["bm25"]["terms"] = "words-v1"
    m["manifest_sha256"] = artifacts.manifest_checksum(m)
    (old / "MANIFEST.json").write_text(json.dumps(m))
    with Index.open(old) as index:
        assert S.Searcher(index).bm25().terms == "words-v1"
    with Index.open(built) as index:
        assert S.Searcher(index).bm25().terms == S.TERMS


# ---- build, search, info, verify -------------------------------------------------------------------------


def test_build_search_info_verify(built, models, capsys) -> None:
    corpus = built.parent.parent / "corpus"
    code, out, _ = run_cli(capsys, "index", "info", str(built), "--json")
    info = json.loads(out)
    assert code == 0 and info["files"] == 4 and info["skipped"] == 1 and info["chunk_size"] == 24
    assert info["search"].startswith("hybrid (rrf_k 60, bm25 weight 1), the default (not tuned")
    assert info["model_sha256"] == artifacts.read_manifest(models[0]).sha256("model.safetensors")
    m = artifacts.read_manifest(built)
    assert m.kind == "index" and m.fields["skipped"][0]["path"].endswith("logo.png")
    assert set(m.files) >= {VECTORS, "chunks.sqlite", "bm25/params.index.json"}

    code, out, _ = run_cli(capsys, "index", "verify", str(built))
    assert code == 0 and out.startswith("ok")

    code, out, _ = run_cli(capsys, "search", str(built), "reset the printer", "-k", "3", "--mode", "bm25", "--json")
    res = json.loads(out)["results"]
    assert code == 0 and res[0]["path"] == str((corpus / "printer.md").resolve())
    top = res[0]
    data = (corpus / "printer.md").read_bytes()
    assert data[top["byte_start"]:top["byte_end"]].decode() == top["text"]  # the span is the chunk's bytes
    assert "reset the printer" in top["text"] and top["line_start"] <= 3 <= top["line_end"]

    code, out, _ = run_cli(capsys, "search", str(built), "coffee descaling", "--mode", "bm25", "--json")
    rec = json.loads(out)["results"][0]
    assert rec["record"] == "T-17" and rec["line_start"] == rec["line_end"] == 1 and rec["where"].endswith("tickets.jsonl:1#T-17")

    for mode in ("dense", "hybrid"):
        code, out, _ = run_cli(capsys, "search", str(built), "printer", "-k", "2", "--mode", mode)
        assert code == 0 and out.startswith("1. ") and "2. " in out and "corpus/" in out


def test_dense_search_uses_exact_rows(built, models) -> None:
    from lmforge.understand.embed import Embedder

    with Index.open(built) as index:
        emb = Embedder.load(models[0], device="cpu")
        hits = S.Searcher(index, emb).search("green light", k=index.rows, mode="dense")
        q = S.normalize(emb.embed(["green light"], kind="query"))[0]
        brute = np.asarray(index.vectors, dtype=np.float32) @ q
        assert [h.row for h in hits] == np.argsort(-brute, kind="stable").tolist()


def test_verify_names_a_flipped_byte(built, tmp_path, capsys) -> None:
    import shutil

    for name in (VECTORS, "MANIFEST.json", "chunks.sqlite"):
        copy = tmp_path / name.replace(".", "-")
        shutil.copytree(built, copy)
        path = copy / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        code, out, _ = run_cli(capsys, "index", "verify", str(copy))
        assert code == 1 and name in out and "bad:" in out
        code, _, err = run_cli(capsys, "search", str(copy), "printer", "--mode", "bm25")
        assert code == 2 and name in one_line(err)
    assert verify_index(built) == []


def test_query_by_another_model_is_refused(built, models, capsys) -> None:
    from lmforge.serve.api import open_index

    code, _, err = run_cli(capsys, "search", str(built), "printer", "--model", str(models[1]))
    line = one_line(err)
    mine = artifacts.read_manifest(models[0]).sha256("model.safetensors")
    theirs = artifacts.read_manifest(models[1]).sha256("model.safetensors")
    assert code == 2 and "built by another model" in line and mine[:12] in line and theirs[:12] in line
    with pytest.raises(LmforgeError, match=f"{theirs[:12]}.*{mine[:12]}"):  # the server refuses it at start too
        open_index(built, artifacts.load_model(models[1], device="cpu"))


def test_bad_inputs_are_one_line_errors(models, tmp_path, capsys) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "empty.txt").write_text("  \n\n")
    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(blank), "--out", str(tmp_path / "i1"))
    assert code == 2 and "empty corpus" in one_line(err) and not (tmp_path / "i1").exists()

    corpus = write_corpus(tmp_path)
    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(corpus), "--out", str(tmp_path / "i2"), "--strict")
    assert code == 2 and "logo.png: not UTF-8" in one_line(err) and not (tmp_path / "i2").exists()

    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(corpus), "--out", str(tmp_path / "i3"),
                           "--chunk-size", "300")
    assert code == 2 and "--chunk-size 300 is larger than the model's context of 256 tokens" in one_line(err)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(corpus), "--out", str(other), "--overwrite")
    assert code == 2 and "not an index directory" in one_line(err) and (other / "notes.txt").read_text() == "mine"

    out = tmp_path / "i4"
    assert main(["index", "build", str(models[0]), str(corpus / "vpn.md"), "--out", str(out)]) == 0
    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(corpus), "--out", str(out))
    assert code == 2 and "already exists (pass --overwrite" in one_line(err)
    assert main(["index", "build", str(models[0]), str(corpus), "--out", str(out), "--overwrite"]) == 0
    assert Index.open(out).rows > 1 and [p.name for p in tmp_path.glob(".i4.*")] == [".i4.lock"]

    code, _, err = run_cli(capsys, "index", "build", str(models[0]), str(corpus), "--out", str(corpus / "idx"))
    assert code == 2 and "inside the input" in one_line(err)
    code, _, err = run_cli(capsys, "search", str(tmp_path / "nope"), "x")
    assert code == 2 and "no such index" in one_line(err)


# ---- add -----------------------------------------------------------------------------------------------


def test_add_skips_unchanged_replaces_changed_adds_new(models, tmp_path, capsys) -> None:
    corpus = write_corpus(tmp_path)
    idx = tmp_path / "idx"
    assert main(["index", "build", str(models[0]), str(corpus), "--out", str(idx), "--chunk-size", "24"]) == 0
    before = Index.open(idx)
    rows, paths = before.rows, before.paths()
    code, _, err = run_cli(capsys, "index", "add", str(idx), str(corpus))
    assert code == 0 and "nothing to add" in err and "5 file(s) unchanged" in err  # logo.png: skipped as before

    (corpus / "vpn.md").write_text("# VPN\n\nThe VPN gateway moved to vpn2.example.com in May.\n")
    (corpus / "new.md").write_text("Lunch is served from noon in the canteen on floor 1.\n")
    code, _, err = run_cli(capsys, "index", "add", str(idx), str(corpus))
    assert code == 0 and "1 file(s) added, 1 replaced, 4 unchanged" in " ".join(err.split())
    after = Index.open(idx)
    assert verify_index(idx) == [] and after.paths()[:len(paths) - 1] == [p for p in paths if not p.endswith("vpn.md")]
    texts = after.texts()
    assert any("gateway" in t for t in texts) and not any("certificate" in t for t in texts)  # vpn.md replaced
    assert any("canteen" in t for t in texts) and after.rows != rows
    hits = S.Searcher(after).search("canteen lunch", k=1, mode="bm25")
    assert hits[0].path.endswith("new.md")
    # an unchanged file's chunks were copied as they were: the same vectors
    with Index.open(idx) as a:
        old = {t: before.vectors[i] for i, t in enumerate(before.texts())}
        for i, t in enumerate(a.texts()):
            if t in old and "printer" in t:
                assert np.array_equal(a.vectors[i], old[t])
    assert not list(tmp_path.glob(".idx.*.tmp"))


def test_an_index_above_the_ann_threshold(models, tmp_path, monkeypatch) -> None:
    from lmforge.understand.embed import Embedder
    from lmforge.understand.index.build import add_to_index, build_index

    monkeypatch.setattr(S, "ANN_MIN_ROWS", 5)  # what 200,000 chunks do, on a few
    corpus = write_corpus(tmp_path)
    idx = tmp_path / "idx"
    manifest = build_index(models[0], [corpus / "printer.md", corpus / "vpn.md"], idx, chunk_size=16)
    assert manifest["ann"]["library"] == "faiss" and "ann.faiss" in manifest["files"]
    emb = Embedder.load(models[0], device="cpu")

    def agree() -> None:  # an IVF index this small scans every cell: the ANN answers exactly
        with Index.open(idx) as index:
            searcher = S.Searcher(index, emb)
            assert searcher.ann() is not None
            q = searcher.embed_query("green light")
            exact, _ = S.exact_search(index.vectors, q, index.rows)
            assert searcher.dense(q, index.rows)[0].tolist() == exact[0].tolist()
            assert index.rows == S.Ann.load(idx / "ann.faiss").index.ntotal

    agree()
    add_to_index(idx, [corpus / "code"])  # only new rows: the graph is extended
    agree()
    (corpus / "vpn.md").write_text("# VPN\n\nThe gateway moved.\n")
    add_to_index(idx, [corpus / "vpn.md"])  # a replaced file: rebuilt
    agree()


KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import lmforge.understand.index.build as b
    import lmforge.util as u
    import lmforge.understand.embed as e
    point = sys.argv[1]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "embedding":
        e.Embedder.embed = die
    elif point == "bm25":
        b.Bm25.build = staticmethod(die)
    elif point == "manifest":
        b.write_manifest = die
    elif point == "before-swap":
        u.exchange_paths = die
    elif point == "after-swap":  # the new index is in place; the old one not yet removed
        u._remove = die
    from lmforge.cli import main
    sys.exit(main(["index", "add", sys.argv[2], *sys.argv[3:]]))
""")


def test_add_killed_at_any_point_leaves_a_verifiable_index(models, tmp_path) -> None:
    corpus = write_corpus(tmp_path)
    idx = tmp_path / "idx"
    assert main(["index", "build", str(models[0]), str(corpus), "--out", str(idx), "--chunk-size", "24"]) == 0
    old_texts = Index.open(idx).texts()
    extra = tmp_path / "extra.md"
    extra.write_text("The fire drill is on the first Tuesday of every month at ten.\n")
    env = subprocess_env(PYTHONPATH=str(REPO))
    for point in ("embedding", "bm25", "manifest", "before-swap", "after-swap"):
        proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, point, str(idx), str(extra)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        assert verify_index(idx) == [], point
        texts = Index.open(idx).texts()
        if point == "after-swap":  # killed after the exchange: the new index, complete
            assert texts[:len(old_texts)] == old_texts and "fire drill" in "".join(texts[len(old_texts):])
            old_texts = Index.open(idx).texts()
            extra.write_text(extra.read_text() + "Meet at the car park.\n")  # something to add next time
        else:
            assert texts == old_texts, point
    # kill -9 at arbitrary moments of the real command
    cmd = [sys.executable, "-m", "lmforge", "index", "add", str(idx), str(extra)]
    for delay in (0.5, 1.5, 3.0):
        extra.write_text(extra.read_text() + f"Line added before a kill after {delay} s.\n")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert verify_index(idx) == [], delay
    # the next add cleans up what the killed ones left and completes
    assert main(["index", "add", str(idx), str(extra)]) == 0
    assert verify_index(idx) == [] and not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.") and
                                            not p.name.endswith(".lock")]
    assert any("car park" in t for t in Index.open(idx).texts())


def test_a_second_writer_is_refused(models, tmp_path) -> None:
    import fcntl

    from lmforge.understand.index.build import writing

    idx = tmp_path / "idx"
    idx.mkdir()
    with open(tmp_path / ".idx.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(LmforgeError, match="another lmforge is writing"):
            with writing(idx):
                pass
    with writing(idx):
        pass


def test_replace_path_exchanges_directories(tmp_path) -> None:
    from lmforge.util import exchange_paths, replace_path

    old, new = tmp_path / "idx", tmp_path / ".idx.new.tmp"
    old.mkdir()
    (old / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    if not exchange_paths(new, old):
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    assert (old / "v").read_text() == "new" and (new / "v").read_text() == "old"  # swapped in one step
    exchange_paths(new, old)
    replace_path(new, old)  # the exchange, then the old directory (now at the temporary name) removed
    assert (old / "v").read_text() == "new" and not new.exists()
    with pytest.raises(OSError):
        exchange_paths(tmp_path / "missing", old)


# ---- ask -----------------------------------------------------------------------------------------------


def test_cited_sources_are_parsed() -> None:
    from lmforge.understand.ask import cited

    assert cited("Hold the button [2]. Then wait [1][2] and see [7].", 3) == [2, 1]
    assert cited("no citation", 3) == []


def test_ask_prints_the_answer_and_its_sources(built, models, capsys) -> None:
    code, out, _ = run_cli(capsys, "ask", str(built), "How do I reset the printer?", "--model", str(models[0]),
                           "-k", "3", "--max-tokens", "8", "--mode", "bm25")
    assert code == 0 and "[1] " in out and "printer.md:" in out
    code, out, _ = run_cli(capsys, "ask", str(built), "How do I reset the printer?", "--model", str(models[0]),
                           "-k", "3", "--max-tokens", "8", "--json")
    res = json.loads(out)
    assert code == 0 and len(res["sources"]) == 3 and res["answer_tokens"] <= 8
    assert all(s["in_prompt"] for s in res["sources"][:3 - res["dropped"]])


def test_ask_decodes_in_the_decoding_layout_with_the_same_answer(built, models, capsys, monkeypatch, tmp_path) -> None:
    from lmforge import quant

    args = ("ask", str(built), "How do I reset the printer?", "--model", str(models[0]), "-k", "2", "--max-tokens", "12",
            "--json", "--threads", "1")
    prepared: list[str] = []
    real = quant.prepare
    monkeypatch.setattr(quant, "prepare", lambda model, weights="fp32", stored=None, **kw: prepared.append(weights) or real(model, weights, stored, **kw))
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and prepared == ["fp32"]  # laid out for decoding, as sample does
    monkeypatch.setattr(quant, "prepare", lambda model, weights="fp32", stored=None, **kw: model)  # as before: plain weights
    code, plain, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["answer"] == json.loads(plain)["answer"]
    # --compile: the answer's decode step compiled (ahead of time: a package appears), the same answer
    monkeypatch.undo()
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    code, compiled, err = run_cli(capsys, *args, "--compile")
    assert code == 0 and json.loads(compiled)["answer"] == json.loads(plain)["answer"]
    assert "compiling the decode step (--compile)" in err and len(list((tmp_path / "aot").glob("decode-*.pt2"))) == 1
    code, _, err = run_cli(capsys, "ask", str(built), "printer?", "--model", str(models[0]), "--threads", "512")
    assert code != 0 and "--threads" in one_line(err)


def test_ask_drops_sources_that_do_not_fit(built, models, tok, tmp_path, capsys) -> None:
    small = model_dir(tok, tmp_path, 0, max_seq_len=192)  # a context that holds the instruction and a source or two
    code, out, err = run_cli(capsys, "ask", str(built), "printer?", "--model", str(small), "--embed-model",
                             str(models[0]), "-k", "4", "--max-tokens", "8", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["dropped"] >= 1 and "lowest-ranked" in err and res["prompt_tokens"] <= 192 - 8
    assert [s["in_prompt"] for s in res["sources"]] == [True] * (4 - res["dropped"]) + [False] * res["dropped"]
    small = model_dir(tok, tmp_path / "tiny", 0, max_seq_len=64)
    code, _, err = run_cli(capsys, "ask", str(built), "printer?", "--model", str(small), "--embed-model", str(models[0]))
    assert code == 2 and "without sources" in one_line(err)


# ---- the server ----------------------------------------------------------------------------------------


def test_server_search_route(built, models) -> None:
    import asyncio

    from fastapi.testclient import TestClient

    from lmforge.serve.api import create_app, open_index
    from lmforge.serve.protocol import ApiError

    loaded = artifacts.load_model(models[0], device="cpu")
    searcher = open_index(built, loaded)
    app = create_app(loaded.model, loaded.tokenizer, api_key="k", max_queue=1, searcher=searcher)
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as c:
        r = c.post("/v1/search", json={"query": "reset the printer", "k": 2, "mode": "bm25"}, headers=auth)
        assert r.status_code == 200 and r.json()["data"][0]["path"].endswith("printer.md")
        assert r.json()["data"][0]["rank"] == 1 and "line_start" in r.json()["data"][0]
        assert c.post("/v1/search", json={"query": "printer"}).status_code == 401
        bad = c.post("/v1/search", json={"query": "printer", "k": 0}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "k"
        assert c.post("/v1/search", json={"query": "x", "mode": "fuzzy"}, headers=auth).status_code == 400
        r = c.post("/v1/search", json={"query": "printer", "k": 3}, headers=auth)
        assert r.status_code == 200 and r.json()["mode"] == "hybrid" and len(r.json()["data"]) == 3

        # backpressure: a search runs on the embedding worker, whose queue is bounded by --max-queue
        worker = app.state.embed_worker
        assert worker.max_queue == 1

        async def crowd() -> list[object]:
            return await asyncio.gather(worker.run(time.sleep, 0.5), worker.run(time.sleep, 0.0), return_exceptions=True)

        first, second = asyncio.run(crowd())
        assert first is None and isinstance(second, ApiError) and second.status == 429
        assert second.headers["Retry-After"] == "1"
        app.state.bridge.closing = True  # what a SIGTERM does first
        r = c.post("/v1/search", json={"query": "printer"}, headers=auth)
        assert r.status_code == 503


def write_pairs(path: Path, n: int) -> Path:
    """n held-out pairs: a fact as the query, the sentence stating it as the positive."""
    topics = ["printer", "vpn", "badge", "parking", "coffee", "toner", "laptop", "monitor", "keyboard", "mouse",
              "chair", "desk", "locker", "shower", "bike", "train", "bus", "car", "lunch", "canteen", "window", "door",
              "heating", "light", "phone", "wifi", "mail", "post", "meeting", "room"]
    with path.open("w") as f:
        for t in topics[:n]:
            f.write(json.dumps({"query": f"where is the {t}", "positive": f"The {t} is on floor {len(t)} by the lift."}) + "\n")
    return path


def test_tune_records_the_best_setting_and_search_uses_it(models, tmp_path, capsys) -> None:
    from lmforge.understand.index import tune as T

    idx = tmp_path / "idx" / "t"
    assert main(["index", "build", str(models[0]), str(write_corpus(tmp_path)), "--out", str(idx), "--chunk-size", "24"]) == 0
    pairs = write_pairs(tmp_path / "pairs.jsonl", 30)
    code, out, _ = run_cli(capsys, "index", "tune", str(idx), "--pairs", str(pairs), "--json")
    record = json.loads(out)
    assert code == 0 and record["tuned"]["queries"] == 30 and record["tuned"]["texts"] == 30
    grid = record["tuned"]["grid"]
    assert len(grid) == len(T.GRID) and record["tuned"]["score"] == max(r["score"] for r in grid)
    first_best = next(r for r in grid if r["score"] == record["tuned"]["score"])
    assert {k: record[k] for k in ("mode", "rrf_k", "bm25_weight")} == {k: first_best[k] for k in ("mode", "rrf_k", "bm25_weight")}
    bm25_row = next(r for r in grid if r["mode"] == "bm25")
    assert bm25_row["score"] > 0.9  # each query shares its topic word with its own positive only
    # recorded in the manifest (its checksum still holds) and used when no mode is named
    assert artifacts.read_manifest(idx).fields["search"] == record
    code, out, _ = run_cli(capsys, "index", "info", str(idx), "--json")
    assert code == 0 and json.loads(out)["search"].startswith(f"{T.describe(record)}, tuned: nDCG@10 {record['tuned']['score']}")
    code, out, _ = run_cli(capsys, "index", "verify", str(idx))
    assert code == 0 and out.startswith("ok")
    code, out, _ = run_cli(capsys, "search", str(idx), "reset the printer", "--json")
    assert code == 0 and json.loads(out)["mode"] == record["mode"]
    with Index.open(idx) as index:
        assert S.Searcher(index).settings == S.Settings(record["mode"], record["rrf_k"], record["bm25_weight"])
    # `index add` keeps it
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "new.md").write_text("The fire exit is behind the canteen.\n")
    assert main(["index", "add", str(idx), str(extra)]) == 0
    assert artifacts.read_manifest(idx).fields["search"] == record


def test_tune_refusals_are_one_line(built, models, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "index", "tune", str(built))  # a model dir that is no contrastive run
    assert code != 0 and "--pairs FILE" in one_line(err)
    few = write_pairs(tmp_path / "few.jsonl", 5)
    code, _, err = run_cli(capsys, "index", "tune", str(built), "--pairs", str(few))
    assert code != 0 and "5 held-out pairs" in one_line(err) and "at least 20" in one_line(err)
    code, _, err = run_cli(capsys, "index", "tune", str(built), "--pairs", str(tmp_path / "missing.jsonl"))
    assert code != 0 and "missing.jsonl" in one_line(err)
    assert "search" not in artifacts.read_manifest(built).fields  # nothing recorded by a refused tune


def test_index_cli_help_lists_the_verbs(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    out = capsys.readouterr().out
    assert all(v in out for v in ("build", "add", "info", "verify", "tune"))
