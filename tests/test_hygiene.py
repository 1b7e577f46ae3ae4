"""Corpus hygiene in `lmforge prepare` (data/hygiene.py, data/mix.py): dedup, quality rules, PII stage,
cross-split copies, the record and `lmforge data report`, mixing, and one-line refusals."""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import hygiene as H
from lmforge.data import mix as M
from lmforge.data import prepare as prep
from lmforge.data.hygiene import Settings
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WORDS = ("river stone lantern market harbour winter garden letter window signal copper meadow engine "
         "candle orchard bridge valley thunder velvet compass ladder silver pocket island mirror basket "
         "forest kettle marble feather canyon saddle anchor violin").split()


def prose(seed: int, n_words: int = 120) -> str:
    """Clean, varied prose: sentences of random words, one sentence per line, each ending in a full stop."""
    rng = random.Random(seed)
    lines, words = [], 0
    while words < n_words:
        k = rng.randint(6, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return "\n".join(lines) + "\n"


def lmforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def train_text(out: Path) -> str:
    m = manifest(out)
    parts = [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"]["train"]["shards"]]
    return Tokenizer.load(out).decode(np.concatenate(parts))


def kept_sources(out: Path) -> list[str]:
    m = manifest(out)
    return sorted(Path(m["sources"][r[3]]["path"]).name for r in m["document_index"]["rows"])


# ---- dedup -------------------------------------------------------------------------------------


def dedup_corpus(root: Path) -> Path:
    """a (original), b (a re-spaced: exact dup), c (a with 2 of 300 words changed: near dup), d (unrelated)."""
    corpus = root / "corpus"
    corpus.mkdir()
    a = prose(1, 300)
    (corpus / "a.txt").write_text(a)
    (corpus / "b.txt").write_text("  " + a.replace(" ", "   ").replace("\n", "\n\n") + "\n\n")
    words = a.split(" ")
    for i in (60, 200):
        words[i] = "zebra"
    (corpus / "c.txt").write_text(" ".join(words))
    (corpus / "d.txt").write_text(prose(2, 300))
    return corpus


def test_exact_and_near_duplicates_keep_the_first_occurrence(tmp_path) -> None:
    corpus = dedup_corpus(tmp_path)
    out = prep.prepare([corpus], tmp_path / "ds", vocab_size=300, val_fraction=0.0, hygiene=Settings(quality=False))
    assert kept_sources(out) == ["a.txt", "d.txt"]
    h = manifest(out)["hygiene"]
    assert h["removed"] == {"exact_dup": {"corpus": {"documents": 1, "bytes": (corpus / "b.txt").stat().st_size}},
                            "near_dup": {"corpus": {"documents": 1, "bytes": (corpus / "c.txt").stat().st_size}}}
    assert [e["source"] for e in h["examples"]["near_dup"]] == [str(corpus / "c.txt")]
    assert h["examples"]["near_dup"][0]["copy_of"] == {"source": str(corpus / "a.txt"), "byte_offset": 0}
    # The first occurrence in corpus order is the one kept: rename the copy so that it comes first.
    (corpus / "a.txt").rename(corpus / "z.txt")
    out2 = prep.prepare([corpus], tmp_path / "ds2", vocab_size=300, val_fraction=0.0, hygiene=Settings(quality=False))
    assert kept_sources(out2) == ["b.txt", "d.txt"]  # b (re-spaced) is now first; a (z) and c are its copies
    assert manifest(out2)["hygiene"]["removed"]["exact_dup"]["corpus"]["documents"] == 1
    # With --no-dedup everything stays.
    out3 = prep.prepare([corpus], tmp_path / "ds3", vocab_size=300, val_fraction=0.0, hygiene=Settings.off())
    assert kept_sources(out3) == ["b.txt", "c.txt", "d.txt", "z.txt"]


def test_near_dup_threshold_decides(tmp_path) -> None:
    """A pair at Jaccard ~0.6 (word 5-grams) is kept at 0.8 and removed at 0.5."""
    a = prose(3, 400)
    words = a.split(" ")
    for i in range(0, len(words), 20):
        words[i] = "zebra"
    b = " ".join(words)
    est = float(np.mean(H.signature(H.words(a).hashes) == H.signature(H.words(b).hashes)))
    sa = set(H.ngram_hashes(H.words(a).hashes, 5).tolist())
    sb = set(H.ngram_hashes(H.words(b).hashes, 5).tolist())
    true = len(sa & sb) / len(sa | sb)
    assert 0.5 < true < 0.8 and abs(est - true) < 0.12, (true, est)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(a)
    (tmp_path / "c" / "b.txt").write_text(b)
    for threshold, kept in ((0.8, ["a.txt", "b.txt"]), (0.5, ["a.txt"])):
        out = prep.prepare([tmp_path / "c"], tmp_path / f"ds{threshold}", vocab_size=300, val_fraction=0.0,
                           hygiene=Settings(quality=False, near_dup_threshold=threshold))
        assert kept_sources(out) == kept


def test_signature_estimates_jaccard() -> None:
    """The vectorised MinHash is an unbiased-looking estimator over many pairs (mean error small)."""
    errors = []
    for seed in range(20):
        a = prose(100 + seed, 300).split(" ")
        b = list(a)
        rng = random.Random(seed)
        for i in rng.sample(range(len(b)), seed + 1):
            b[i] = "zebra"
        ha, hb = H.words(" ".join(a)).hashes, H.words(" ".join(b)).hashes
        sa, sb = set(H.ngram_hashes(ha, 5).tolist()), set(H.ngram_hashes(hb, 5).tolist())
        errors.append(float(np.mean(H.signature(ha) == H.signature(hb))) - len(sa & sb) / len(sa | sb))
    assert abs(np.mean(errors)) < 0.03 and max(map(abs, errors)) < 0.15


def test_cross_split_copies_are_removed_and_counted(tmp_path) -> None:
    """Originals and near copies whose content hashes put them in different splits: the later one
    goes, whichever split it is in, and the report counts each direction."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    val_fraction = 0.5
    split = lambda text: "val" if prep._u(text.encode()) < val_fraction else "train"  # noqa: E731
    pairs = {"val_dropped_as_copy_of_train": 0, "train_dropped_as_copy_of_val": 0}
    n = 0
    for seed in range(200):
        original = prose(1000 + seed)
        copy = original.replace(".\n", ". \n", 1)  # exact dup after normalisation, another content hash
        if split(original) != split(copy):
            (corpus / f"p{n:03d}a.txt").write_text(original)
            (corpus / f"p{n:03d}b.txt").write_text(copy)
            pairs["val_dropped_as_copy_of_train" if split(copy) == "val" else "train_dropped_as_copy_of_val"] += 1
            n += 1
        if min(pairs.values()) >= 3:
            break
    out = prep.prepare([corpus], tmp_path / "ds", vocab_size=300, val_fraction=val_fraction,
                       hygiene=Settings(quality=False))
    h = manifest(out)["hygiene"]
    assert h["cross_split"] == pairs and min(pairs.values()) >= 3
    assert kept_sources(out) == sorted(p.name for p in corpus.iterdir() if p.name.endswith("a.txt"))


# ---- quality rules -----------------------------------------------------------------------------

CLEAN = prose(7, 300)
PARAGRAPH = prose(8, 60)


def failing(rule: str) -> tuple[str, str]:
    """(text, genre) crafted to fail `rule`."""
    return crafted()[rule]


@functools.lru_cache(maxsize=1)
def crafted() -> dict[str, tuple[str, str]]:
    code_ok = "def f(x):\n    return x + 1\n\n\nclass Point:\n    x: int = 0\n"
    cases = {
        "binary": ("hello world this is text\x00\x01\x02\x03 " * 3, "prose"),
        "min_words": ("Too short a ticket.", "prose"),
        "max_words": (prose(99, 100_050), "prose"),
        "mean_word_length": ("A " + "I a o u e. " * 30, "prose"),
        "symbol_ratio": (CLEAN.replace(".\n", " # ... #.\n"), "prose"),
        "bullet_lines": ("\n".join("- " + line for line in CLEAN.splitlines()), "prose"),
        "ellipsis_lines": (CLEAN.replace(".\n", "...\n"), "prose"),
        "alpha_words": (CLEAN.replace(".\n", " 12 34 56 78 90.\n"), "prose"),
        "punctuation_lines": (CLEAN.replace(".\n", "\n"), "prose"),
        "dup_lines": (prose(9, 200) + "Thanks.\nOk.\n" * 25, "prose"),
        "dup_paragraphs": ("\n\n".join([prose(10 + i, 20) for i in range(6)] + ["Yes sir.\nNo sir."] * 5), "prose"),
        "dup_line_chars": (prose(11, 400) + prose(12, 200) * 2, "prose"),
        "dup_paragraph_chars": ((prose(13, 400) + "\n\n" + (PARAGRAPH.replace("\n", " ") + "\n\n") * 3), "prose"),
        "top_2gram": ((CLEAN.replace(".\n", " copper kettle copper kettle copper kettle.\n")), "prose"),
        "top_3gram": (CLEAN.replace(".\n", " copper kettle river.\n"), "prose"),
        "top_4gram": (CLEAN.replace(".\n", " copper kettle river stone.\n"), "prose"),
        "generated": ("# Auto-generated by tools/gen.py. DO NOT EDIT.\n" + code_ok, "code"),
        "max_line_length": (code_ok + "X = [" + "1, " * 400 + "]\n", "code"),
        "mean_line_length": ("\n".join("v%d = '%s'" % (i, "y" * 120) for i in range(30)), "code"),
        "alnum_fraction": ("{}()[];;;;" * 50 + "\nx\n", "code"),
    }
    block = " ".join(prose(20, 60).split()[:40])  # a 40-word passage said twice: > 15% of the words
    for n in range(5, 11):
        cases[f"dup_{n}gram"] = (prose(30 + n, 300) + block + ".\n" + prose(50 + n, 30) + block + ".\n", "prose")
    return cases


def test_every_rule_has_a_crafted_failure() -> None:
    missing = []
    for rule in H.RULE_NAMES:
        try:
            failing(rule)
        except KeyError:
            missing.append(rule)
    assert not missing, missing


@pytest.mark.parametrize("rule", H.RULES, ids=H.RULE_NAMES)
def test_each_quality_rule_fires_on_its_crafted_input_and_not_on_clean_text(rule: H.Rule) -> None:
    text, genre = failing(rule.name)
    assert rule.genre in (genre, "any")
    assert H.failed_rule(text, genre, [rule]) == rule.name, H.measure(text, genre)
    clean = CLEAN if genre == "prose" else "def f(x):\n    return x + 1\n\n\nclass Point:\n    x: int = 0\n"
    assert H.failed_rule(clean, genre, [rule]) is None, H.measure(clean, genre)


def test_the_first_failing_rule_is_reported_and_skipped_rules_do_not_fire() -> None:
    text = CLEAN.replace(".\n", "...\n")  # ellipsis lines, and '...' per word over the symbol ratio
    assert H.failed_rule(text, "prose", H.RULES) == "symbol_ratio"  # checked before ellipsis_lines
    skip = Settings(skip_rules=("symbol_ratio",)).active_rules
    assert H.failed_rule(text, "prose", skip) == "ellipsis_lines"
    assert Settings(quality=False).active_rules == ()


def test_dup_ngram_rules_measure_repeated_runs() -> None:
    """A long passage said twice trips the duplicated-n-gram rules (the first one checked is reported)."""
    base = prose(40, 300)
    passage = " ".join(prose(41, 80).split()[:60])
    text = base + passage + ".\n" + prose(42, 100) + passage + ".\n"
    f = H.measure(text, "prose")
    assert f["dup_5gram"] > 0.15 and f["dup_10gram"] > 0.10
    assert H.failed_rule(text, "prose", H.RULES) in ("dup_5gram", "dup_line_chars", "dup_lines")
    only = [r for r in H.RULES if r.name.startswith("dup_") and r.name.endswith("gram")]
    assert H.failed_rule(text, "prose", only) == "dup_5gram"
    clean = H.measure(CLEAN, "prose")
    assert all(clean[f"dup_{n}gram"] <= t for n, t in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)))


def test_clean_documents_pass_and_short_ones_face_only_length_rules() -> None:
    assert H.failed_rule(CLEAN, "prose", H.RULES) is None
    assert H.failed_rule("ticket 4411: printer 3 on floor 2 is on fire", "prose", H.RULES) is None  # < 50 words
    assert H.failed_rule("def f():\n    return {'a': [1, 2]}\n", "code", H.RULES) is None
    assert H.genre_of("src/x.py", "text") == "code" and H.genre_of("notes.md", "text") == "prose"
    assert H.genre_of("Makefile", "text") == "code" and H.genre_of("code.jsonl", "jsonl") == "prose"


def stdlib_sample(every: int = 10) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ["site-packages/*", "dist-packages/*", "__pycache__/*", "*/__pycache__/*"]
    files = sorted(p for p in root.rglob("*.py") if not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), s) for s in skip))
    return files[::every]


def test_clean_code_and_prose_lose_under_one_percent() -> None:
    """The defaults on a sample of this Python's standard library (every 10th .py file, ~3 MB) and on
    tinyshakespeare, cut into documents the way prepare cuts them: < 1 % of documents and bytes."""
    docs: list[tuple[str, str]] = []
    for p in stdlib_sample():
        try:
            data = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        src = prep.Source(p, "text")
        docs += [(d.text, "code") for d in prep.iter_documents(src, 0, "text")] if data.strip() else []
    if SHAKESPEARE.is_file():
        src = prep.Source(SHAKESPEARE, "text")
        docs += [(d.text, "prose") for d in prep.iter_documents(src, 0, "text")]
    for genre in ("code", "prose"):
        mine = [t for t, g in docs if g == genre]
        if not mine:
            continue
        failed = [t for t in mine if H.failed_rule(t, genre, H.RULES)]
        lost_bytes = sum(len(t) for t in failed) / sum(len(t) for t in mine)
        assert len(failed) / len(mine) < 0.01 and lost_bytes < 0.01, (genre, len(failed), len(mine), lost_bytes)
    assert sum(g == "code" for _, g in docs) > 150


# ---- the stages in prepare, the record, determinism ---------------------------------------------


def hygiene_corpus(root: Path) -> Path:
    """Two inputs: a wiki directory (prose, a duplicate, a junk page, a page with PII) and a
    tickets.jsonl (one ticket with an e-mail address, one repeated ticket)."""
    wiki = root / "wiki"
    wiki.mkdir(parents=True)
    for i in range(8):
        (wiki / f"page{i}.md").write_text(prose(200 + i, 150))
    (wiki / "page8.md").write_text(prose(200, 150))  # copy of page0
    (wiki / "junk.md").write_text("\n".join("- " + line for line in prose(250, 150).splitlines()))
    (wiki / "contact.md").write_text(prose(300, 80) + "Write to jane.doe@acme-corp.com or call +44 20 7946 0958.\n")
    tickets = root / "tickets.jsonl"
    rows = [{"text": prose(400 + i, 40).replace("\n", " ")} for i in range(12)]
    rows.append({"text": "Customer bob.smith@gmail.com cannot log in since the update, please reset the account."})
    rows.append(rows[0])
    tickets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_stages_record_and_report(tmp_path) -> None:
    root = hygiene_corpus(tmp_path / "c")
    out = prep.prepare([root / "wiki", root / "tickets.jsonl"], tmp_path / "ds", vocab_size=300, val_fraction=0.0)
    m = manifest(out)
    h = m["hygiene"]
    assert [i["name"] for i in m["inputs"]] == ["wiki", "tickets"]
    assert h["settings"]["pii"] == "redact" and h["settings"]["dedup"] and h["settings"]["near_dup_threshold"] == 0.8
    assert "datasketch" in h["versions"] and "phonenumbers" in h["versions"] and m["hygiene"]["pii_scrubber"]["mode"] == "redact"
    assert h["removed"]["exact_dup"] == {"wiki": {"documents": 1, "bytes": (root / "wiki" / "page8.md").stat().st_size},
                                         "tickets": {"documents": 1, "bytes": len(json.loads(
                                             (root / "tickets.jsonl").read_text().splitlines()[0])["text"].encode())}}
    assert h["removed"]["bullet_lines"]["wiki"]["documents"] == 1
    assert h["redacted"]["email"] == {"wiki": {"documents": 1, "items": 1}, "tickets": {"documents": 1, "items": 1}}
    assert h["redacted"]["phone"]["wiki"] == {"documents": 1, "items": 1}
    assert h["inputs"]["wiki"]["documents"] == 11 and h["inputs"]["wiki"]["kept_documents"] == 9
    text = train_text(out)
    assert "jane.doe@acme-corp.com" not in text and "bob.smith@gmail.com" not in text and "<EMAIL>" in text
    # Examples are recorded, bounded, and redacted.
    assert all(len(v) <= 10 for v in h["examples"].values())
    assert "@" not in json.dumps(h["examples"]) and "<EMAIL>" in json.dumps(h["examples"]["pii:email"])

    # `lmforge data report`: the same figures, as a table and as JSON; examples on request.
    r = lmforge("data", "report", out, "--examples", "2")
    assert r.returncode == 0, r.stderr
    for word in ("exact_dup", "bullet_lines", "email", "wiki", "tickets", "cross-split", "examples: pii:email"):
        assert word in r.stdout, (word, r.stdout)
    assert "jane.doe" not in r.stdout and "bob.smith" not in r.stdout
    j = json.loads(lmforge("data", "report", out, "--json").stdout)
    rows = {row["rule"]: row for row in j["hygiene"]["removed"]}
    assert rows["exact_dup"]["documents"] == 2 and rows["exact_dup"]["stage"] == "dedup"
    assert rows["bullet_lines"]["by_input"]["wiki"]["documents"] == 1 and j["hygiene"]["examples"] == {}
    assert {r["kind"]: r["items"] for r in j["hygiene"]["redacted"]} == {"email": 2, "phone": 1}
    assert j["hygiene"]["total"]["documents"] == 25 and j["hygiene"]["total"]["kept_documents"] == 22


def test_pii_drop_and_keep(tmp_path) -> None:
    root = hygiene_corpus(tmp_path / "c")
    drop = prep.prepare([root / "wiki"], tmp_path / "drop", vocab_size=300, val_fraction=0.0, hygiene=Settings(pii="drop"))
    h = manifest(drop)["hygiene"]
    assert h["removed"]["pii"]["wiki"]["documents"] == 1 and "contact.md" not in kept_sources(drop)
    assert h["redacted"] == {}  # dropped, not redacted
    assert "jane.doe" not in json.dumps(h["examples"])  # the dropped document's example is redacted too
    keep = prep.prepare([root / "wiki"], tmp_path / "keep", vocab_size=300, val_fraction=0.0, hygiene=Settings(pii="keep"))
    assert "jane.doe@acme-corp.com" in train_text(keep) and manifest(keep)["hygiene"]["redacted"] == {}


def test_preparing_twice_gives_identical_checksums_in_process_and_in_workers(tmp_path, monkeypatch) -> None:
    root = hygiene_corpus(tmp_path / "c")
    inputs = [root / "wiki", root / "tickets.jsonl"]
    a = prep.prepare(inputs, tmp_path / "a", vocab_size=300, val_fraction=0.2, workers=1)
    monkeypatch.setattr(prep, "POOL_MIN_BYTES", 0)  # the same corpus through two worker processes
    monkeypatch.setattr(prep, "HYGIENE_BATCH_CHARS", 2000)  # many small batches: order must hold
    b = prep.prepare(inputs, tmp_path / "b", vocab_size=300, val_fraction=0.2, workers=2)
    ma, mb = manifest(a), manifest(b)
    assert ma["fingerprint"] == mb["fingerprint"] and ma["splits"] == mb["splits"]
    assert ma["hygiene"] == mb["hygiene"] and ma["document_index"] == mb["document_index"]
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_an_input_emptied_by_hygiene_is_named_and_refused_unless_allowed(tmp_path) -> None:
    root = hygiene_corpus(tmp_path / "c")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("\n".join("* " + line for line in prose(251, 150).splitlines()))
    with pytest.raises(DataError, match=r"input junk \(.*junk\) has no documents left after hygiene \(bullet_lines 1\).*--allow-empty"):
        prep.prepare([root / "wiki", junk], tmp_path / "ds", vocab_size=300)
    assert not (tmp_path / "ds").exists()
    out = prep.prepare([root / "wiki", junk], tmp_path / "ds", vocab_size=300, allow_empty=True)
    assert manifest(out)["hygiene"]["inputs"]["junk"]["kept_documents"] == 0


# ---- mixing ------------------------------------------------------------------------------------


def test_mix_realises_the_weights_and_records_them(tmp_path) -> None:
    """Three inputs of ~60, ~30 and ~10 KB mixed 0.2 / 0.3 / 0.5: the small one is repeated (capped
    at 4x, which sets the mixture's size), the large one subsampled; token shares within 0.05."""
    sizes = {"big": 400, "mid": 200, "small": 70}
    inputs = []
    for k, (name, n) in enumerate(sizes.items()):
        d = tmp_path / name
        d.mkdir()
        for i in range(n):
            (d / f"{i:04d}.txt").write_text(prose(10_000 * (k + 1) + i, 30))
        inputs.append(d)
    weights = {"big": 0.2, "mid": 0.3, "small": 0.5}
    out = prep.prepare(inputs, tmp_path / "ds", vocab_size=300, val_fraction=0.05, mix="big=2,mid=3,small=5")
    m = manifest(out)["mix"]
    assert m["weights"] == pytest.approx(weights) and m["max_repeat"] == 4 and m["capped_by"] == "small"
    assert m["inputs"]["small"]["repeat"] == pytest.approx(4.0)
    assert m["inputs"]["big"]["repeat"] < 1  # subsampled
    for name, w in weights.items():
        assert abs(m["inputs"][name]["token_share"] - w) < 0.05, (name, m["inputs"][name])
        assert abs(m["inputs"][name]["written_bytes"] / sum(r["written_bytes"] for r in m["inputs"].values()) - w) < 0.05
    # The val split is not mixed: each kept val document once.
    man = manifest(out)
    val_rows = [r for r in man["document_index"]["rows"] if r[0] == 1]
    assert len(val_rows) == len({(r[3], r[4]) for r in val_rows}) > 0
    # A document's copies are in different rounds, never next to each other.
    train = [(r[3], r[4]) for r in man["document_index"]["rows"] if r[0] == 0]
    assert len(train) > len(set(train)) and all(a != b for a, b in zip(train, train[1:]))
    # Deterministic: the same mixture again.
    again = prep.prepare(inputs, tmp_path / "ds2", vocab_size=300, val_fraction=0.05, mix="big=2,mid=3,small=5")
    assert manifest(again)["fingerprint"] == manifest(out)["fingerprint"]


def test_mix_plan_rule() -> None:
    p = M.plan({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}, 4.0)
    assert p["target_bytes"] == 200 and p["repeat"] == {"a": 1.0, "b": 1.0} and p["capped_by"] is None
    p = M.plan({"a": 0.9, "b": 0.1}, {"a": 10, "b": 1000}, 4.0)  # a would need 91x: capped at 4
    assert p["capped_by"] == "a" and p["repeat"]["a"] == pytest.approx(4.0) and p["target_bytes"] == pytest.approx(40 / 0.9)
    assert M.copies(2.25, 0.1) == 3 and M.copies(2.25, 0.3) == 2 and M.copies(0.5, 0.7) == 0
    assert M.input_names(["/x/wiki", "/y/tickets.jsonl", "/z/wiki"]) == ["wiki", "tickets", "wiki-2"]


# ---- bad input: one line, exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--no-dedup", "--near-dup-threshold", "0.7"], "--near-dup-threshold with --no-dedup"),
    (["--quality", "off", "--skip-rule", "dup_lines"], "--skip-rule with --quality off"),
    (["--skip-rule", "dup_line"], "--skip-rule 'dup_line' is not a quality rule (did you mean 'dup_lines'?)"),
    (["--quality", "maybe"], "--quality must be on or off, got 'maybe'"),
    (["--near-dup-threshold", "1.5"], "--near-dup-threshold: must be within (0, 1]"),
    (["--no-dedup", "--quality", "off", "--pii", "keep", "--allow-empty"], "--allow-empty with --no-dedup"),
    (["--mix", "wiki=0.5,code=0.5"], "--mix names 'code', which is not an input (inputs: wiki, tickets"),
    (["--mix", "wiki=0.5"], "--mix gives no weight to input(s) tickets"),
    (["--mix", "wiki=x,tickets=1"], "the weight of 'wiki' is not a number: 'x'"),
    (["--mix", "wiki=0,tickets=0"], "the weights sum to 0"),
    (["--mix", "wiki"], "'wiki' is not NAME=WEIGHT"),
    (["--mix", "wiki=-1,tickets=1"], "must be a finite number >= 0"),
    (["--mix-max-repeat", "3"], "--mix-max-repeat without --mix"),
    (["--mix", "wiki=1,tickets=1", "--mix-max-repeat", "0.5"], "--mix-max-repeat: must be within [1, 100]"),
])
def test_nonsense_switches_are_refused_in_one_line(args: list[str], message: str, tmp_path, capsys) -> None:
    """Through the CLI's main() in this process (the same code path as the command, minus interpreter start)."""
    from lmforge.cli import main

    root = hygiene_corpus(tmp_path / "c")
    argv = ["prepare", str(root / "wiki"), str(root / "tickets.jsonl"), "--out", str(tmp_path / "ds"), *args]
    try:
        code = main(argv)
    except SystemExit as e:  # a flag's range is checked while parsing (ranges.py): argparse exits
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err, err
    assert err.startswith("error: ") and not (tmp_path / "ds").exists()


def test_refusals_through_the_real_command(tmp_path) -> None:
    root = hygiene_corpus(tmp_path / "c")
    for args, message in ((["--no-dedup", "--near-dup-threshold", "0.7"], "--near-dup-threshold with --no-dedup"),
                          (["--mix", "wiki=0.5,code=0.5"], "--mix names 'code', which is not an input")):
        r = lmforge("prepare", root / "wiki", root / "tickets.jsonl", "--out", tmp_path / "ds", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "ds").exists()


def test_cli_prepare_with_switches_and_empty_input(tmp_path, capsys) -> None:
    from lmforge.cli import main

    root = hygiene_corpus(tmp_path / "c")
    junk = tmp_path / "junk.jsonl"
    junk.write_text(json.dumps({"text": "ok"}) + "\n")
    assert main(["prepare", str(root / "wiki"), str(junk), "--out", str(tmp_path / "ds"), "--vocab-size", "300"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "input junk" in err and "(min_words 1)" in err and "--allow-empty" in err and not (tmp_path / "ds").exists()
    r = lmforge("prepare", root / "wiki", junk, "--out", tmp_path / "ds", "--vocab-size", "300", "--allow-empty",
                "--near-dup-threshold", "0.9", "--skip-rule", "bullet_lines", "--pii", "keep")
    assert r.returncode == 0, r.stderr
    s = manifest(tmp_path / "ds")["hygiene"]["settings"]
    assert s["near_dup_threshold"] == 0.9 and s["skip_rules"] == ["bullet_lines"] and s["pii"] == "keep"
    assert "bullet_lines" not in manifest(tmp_path / "ds")["hygiene"]["removed"]
