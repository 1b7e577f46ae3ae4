"""`lmforge topics` (lmforge/understand/topics.py, topics_stages.py, topics_report.py): c-TF-IDF golden values, the
outlier reassignment golden case, planted topics recovered (NMI/ARI), determinism, the report in
headless Chromium with hostile text, and one-line refusals of bad input.

The model in these tests is a bag of words: a 1-layer lmforge Transformer whose attention and MLP
outputs are zeroed, mean-pooled, so a text's vector is the mean of its tokens' (random) embeddings:
topics planted as vocabularies are then planted in the vectors too, and no training is needed.
UMAP's numba JIT costs about 20 s of CPU the first time in a process; the suite pays it once (the
module's UMAP fixture runs the command twice in this process); every other test uses --reduce pca.
"""

from __future__ import annotations

import json
import math
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import artifacts, convert
from lmforge.config import EmbedConfig, ModelConfig
from lmforge.errors import DataError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.understand import topics as T
from lmforge.understand import topics_stages as S
from test_dashboard import CHROMIUM, chromium_dom

# numba compiles UMAP's kernels once per process (15 to 30 s): one xdist worker runs them all
pytestmark = pytest.mark.xdist_group("numba")

VOCAB = {
    "space": "rocket orbit planet moon astronaut launch galaxy telescope star comet".split(),
    "food": "pasta recipe oven garlic tomato cheese bread soup kitchen spice".split(),
    "sport": "football goal match striker league referee stadium coach penalty season".split(),
    "money": "bank loan interest mortgage savings credit budget invoice payment tax".split(),
}
COMMON = "the a of and to is in with today really".split()
SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="document.body.dataset.pwned=1">'


def planted_records(per_topic: int = 30, seed: int = 0) -> list[dict]:
    """Short texts from four vocabularies (5 topic words + 3 common ones), with ids, timestamps and
    the topic as the gold label; two documents carry hostile HTML in their text and id."""
    rng = random.Random(seed)
    out = []
    for i in range(per_topic * len(VOCAB)):
        label = list(VOCAB)[i % len(VOCAB)]
        words = rng.sample(VOCAB[label], 5) + rng.sample(COMMON, 3)
        rng.shuffle(words)
        out.append({"id": f"d{i:03d}", "text": " ".join(words), "label": label,
                    "ts": f"2024-{1 + i % 6:02d}-{10 + i % 9}T10:00:00Z"})
    out[0]["text"] += " " + SCRIPT
    out[0]["id"] = SCRIPT
    out[1]["text"] += " " + IMG
    out[1]["id"] = IMG
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    recs = planted_records()
    write_jsonl(root / "docs.jsonl", [{k: r[k] for k in ("id", "text", "ts")} for r in recs])
    write_jsonl(root / "gold.jsonl", [{"id": r["id"], "label": r["label"]} for r in recs])
    return root


@pytest.fixture(scope="module")
def bow_model(corpus: Path) -> Path:
    texts = [json.loads(line)["text"] for line in (corpus / "docs.jsonl").read_text().splitlines()]
    tok = Tokenizer.train(texts * 2, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, d_model=64,
                                    max_seq_len=512))  # room for the naming prompt
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # the blocks add nothing: hidden state = norm(token embedding)
    return artifacts.write_model_dir(convert.bundle_from_model(model, tok, embed=EmbedConfig(pooling="mean")),
                                     corpus / "bow")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- c-TF-IDF ----------------------------------------------------------------------------------


def test_ctfidf_golden_values() -> None:
    # 2 classes, terms (a, b, c). f = (2, 2, 3); A = (3 + 4) / 2 = 3.5 words per class.
    # W[c, t] = tf[c, t] * log(1 + A / f[t]): log(2.75) = 1.0116009, log(1 + 3.5/3) = 0.7731899
    w = S.ctfidf(np.array([[2, 1, 0], [0, 1, 3]])).toarray()
    want = np.array([[2 / 3 * 1.0116009, 1 / 3 * 1.0116009, 0.0],
                     [0.0, 1 / 4 * 1.0116009, 3 / 4 * 0.7731899]])
    assert np.allclose(w, want, atol=1e-6)
    assert np.allclose(w, [[0.6744006, 0.3372003, 0.0], [0.0, 0.2529002, 0.5798924]], atol=1e-6)


def test_term_counter_and_keywords_on_a_toy_corpus() -> None:
    docs = ["the cat sat", "cat and dog", "stocks fell", "stocks rose today", "the cat", "bonds fell"]
    classes = np.array([0, 0, 1, 1, 0, 2])  # class 2: the outliers' row
    c = S.TermCounter(3, stop_words="english", ngram_range=(1, 1))
    for s in range(0, len(docs), 4):  # two batches: the vocabulary grows across them
        c.add(docs[s : s + 4], classes[s : s + 4])
    counts, vocab = c.counts(min_df=1)
    table = {(r, vocab[j]): int(v) for r, row in enumerate(counts.toarray()) for j, v in enumerate(row) if v}
    assert table == {(0, "cat"): 3, (0, "sat"): 1, (0, "dog"): 1, (1, "stocks"): 2, (1, "fell"): 1, (1, "rose"): 1,
                     (1, "today"): 1, (2, "bonds"): 1, (2, "fell"): 1}  # "the", "and": stop words
    kw = S.top_terms(S.ctfidf(counts), vocab, 2)
    assert [w for w, _ in kw[0]] == ["cat", "dog"] and [w for w, _ in kw[1]] == ["stocks", "rose"]
    counts2, vocab2 = c.counts(min_df=2)  # terms in at least 2 documents
    assert sorted(vocab2) == ["cat", "fell", "stocks"]
    pairs = S.TermCounter(1, stop_words=None, ngram_range=(1, 2))
    pairs.add(["new york city"], np.array([0]))
    assert sorted(pairs.counts()[1]) == ["city", "new", "new york", "york", "york city"]
    assert S.diversity([[("a", 1.0), ("b", 1.0)], [("a", 1.0), ("c", 1.0)]]) == 0.75


def test_keywords_of_text_written_without_spaces_are_character_pairs() -> None:
    # a sentence of Japanese is one "word" to CountVectorizer's pattern: no keyword would ever repeat
    assert S.keyword_terms("プリンターの再起動 read_config w3x5 café") == [
        "プリ", "リン", "ンタ", "ター", "ーの", "の再", "再起", "起動", "read_config", "w3x5", "café"]
    c = S.TermCounter(2, stop_words="english", ngram_range=(1, 1))
    c.add(["プリンターの再起動", "再起動できない", "the vpn drops", "vpn is slow"], np.array([0, 0, 1, 1]))
    counts, vocab = c.counts(min_df=2)
    assert sorted(vocab) == ["vpn", "再起", "起動"]
    kw = S.top_terms(S.ctfidf(counts), vocab, 2)
    assert {w for w, _ in kw[0]} == {"再起", "起動"} and [w for w, _ in kw[1]] == ["vpn"]


# ---- outliers ----------------------------------------------------------------------------------


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_outlier_reassignment_golden_case() -> None:
    # topic 0 at 0 deg (members -10, 0, 10), topic 1 at 90 deg (80, 90, 100); outliers at 5, 30, 84.
    vec = np.array([unit(d) for d in (-10, 0, 10, 80, 90, 100, 5, 30, 84)], dtype=np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1, -1, -1, -1])
    cents = S.centroids(vec, labels, 2)
    assert np.allclose(cents, [unit(0), unit(90)], atol=1e-6)
    radius = 1 - math.cos(math.radians(10))  # auto: each topic's farthest member
    r = S.reassign_outliers(vec, labels, cents)
    assert np.allclose(r.caps, [radius, radius], atol=1e-6)
    assert r.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, -1, 1]  # 30 deg is farther than any member of topic 0
    assert r.reassigned.tolist() == [False] * 6 + [True, False, True]
    assert r.nearest.tolist()[6:] == [0, 0, 1]
    assert np.allclose(r.distance[6:], [1 - math.cos(math.radians(a)) for a in (5, 30, 6)], atol=1e-6)
    assert S.reassign_outliers(vec, labels, cents, 0.2).labels.tolist()[6:] == [0, 0, 1]  # a fixed cap of 0.2
    assert S.reassign_outliers(vec, labels, cents, 0.001).labels.tolist()[6:] == [-1, -1, -1]


def test_knn_vote_golden_case() -> None:
    # fitted documents 0..4: topics 0, 0, 1, 1 and an outlier; membership 1, 0.5, 1, 1, 0
    labels, prob = np.array([0, 0, 1, 1, -1]), np.array([1.0, 0.5, 1.0, 1.0, 0.0])
    nb = np.array([[0, 1, 2, 3], [3, 0, 1, 2], [4, 4, 4, 2], [2, 0, 3, 1], [0, 1, 0, 2]])  # nearest first
    got, p = S.knn_vote(nb, labels, prob, chunk=2)
    assert got.tolist() == [0, 1, -1, 1, 0]  # 2-2 ties go to the nearer neighbour's topic; 3 outliers of 4 win
    assert np.allclose(p, [2 / 4 * 0.75, 2 / 4 * 1.0, 0.0, 2 / 4 * 1.0, 3 / 4 * (1 + 0.5 + 1) / 3])


def test_canonical_labels_number_topics_by_size() -> None:
    assert S.canonical_labels(np.array([5, 5, -1, 2, 2, 2, 7, 7])).tolist() == [1, 1, -1, 0, 0, 0, 2, 2]


# ---- planted topics, through the library ------------------------------------------------------


def planted_vectors(n_topics: int = 6, per: int = 80, dim: int = 48, noise: float = 0.6, seed: int = 0):
    """Topic centres on the unit sphere plus gaussian noise; texts from per-topic vocabularies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_topics, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_topics), per)
    vec = centres[labels] + noise * 3 / np.sqrt(dim) * rng.normal(size=(len(labels), dim))
    words = [[f"w{t}x{j}" for j in range(8)] for t in range(n_topics)]
    texts = [" ".join(rng.choice(words[t], 5)) + " common filler" for t in labels]
    return vec.astype(np.float32), texts, labels


def test_planted_topics_are_found_and_reassignment_lowers_outliers_without_hurting_nmi() -> None:
    vec, texts, labels = planted_vectors()
    gold = {i: str(t) for i, t in enumerate(labels)}
    r = T.fit_topics(vec, lambda: iter(texts), T.Settings(reduce="pca", top_words=8), gold=gold)
    q = r.quality
    before, after = q["labels"]["before_reassignment"], q["labels"]["final"]
    assert r.n_topics == 6
    assert q["outlier_share_before"] > 0.3  # HDBSCAN leaves many out here: the complaint reassignment answers
    assert q["outlier_share"] <= 0.10
    assert after["nmi"] > 0.85 and after["ari"] > 0.8 and after["nmi"] >= before["nmi"]
    assert q["diversity"] == 1.0  # 8 words per vocabulary, no two topics share one ("common filler" ranks below)
    for t in r.topics[:6]:  # each topic's keywords are its own vocabulary's
        vocab = {w for w, _ in t.keywords}
        assert len({w.split("x")[0] for w in vocab}) == 1 and len(vocab) == 8
    off = T.fit_topics(planted_vectors()[0], lambda: iter(texts), T.Settings(reduce="pca", reassign_outliers=False),
                       gold=gold)
    assert off.quality["outlier_share"] == off.quality["outlier_share_before"] == q["outlier_share_before"]
    pairs = set(zip(off.labels.tolist(), r.cluster_labels.tolist()))  # the same clusters, numbered by their final size
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) and (-1, -1) in pairs
    sizes = [t.size for t in r.topics if t.id >= 0]
    assert sizes == sorted(sizes, reverse=True) and sizes == np.bincount(r.labels[r.labels >= 0]).tolist()


def test_beyond_fit_max_the_rest_take_their_nearest_fitted_documents_topic() -> None:
    vec, texts, labels = planted_vectors(noise=0.3)
    gold = {i: str(t) for i, t in enumerate(labels)}
    r = T.fit_topics(vec, lambda: iter(texts), T.Settings(reduce="pca", fit_max=200), gold=gold)
    assert r.notes["fitted_on"] == 200 and r.notes["rest"]["documents"] == 280 and len(r.labels) == len(texts)
    assert r.quality["labels"]["before_reassignment"]["nmi_in_topics"] > 0.95  # the rest agree with the fitted
    assert r.quality["labels"]["final"]["nmi"] > 0.9
    again = T.fit_topics(planted_vectors(noise=0.3)[0], lambda: iter(texts), T.Settings(reduce="pca", fit_max=200),
                         gold=gold)  # fresh vectors: fit_topics normalises its input in place
    assert np.array_equal(again.labels, r.labels) and np.array_equal(again.probability, r.probability)


@pytest.mark.parametrize("budget", [7, 1 << 24])  # blocks of 1 row (7 // 5 fitted) and one block
def test_nearest_fitted_is_the_exact_cosine_top_k_in_any_block_size(budget: int) -> None:
    rng = np.random.default_rng(3)
    v = rng.standard_normal((12, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    fit, rest = np.array([0, 2, 5, 7, 11]), np.array([1, 3, 4, 6, 8, 9, 10])
    got = T.nearest_fitted(v, fit, rest, 3, budget=budget)
    want = np.argsort(-(v[rest] @ v[fit].T), axis=1, kind="stable")[:, :3]
    assert np.array_equal(got, want)
    # a row's nearest fitted document is itself when it is also fitted
    assert np.array_equal(T.nearest_fitted(v, fit, fit, 1)[:, 0], np.arange(5))


def test_fewer_documents_than_the_minimum_cluster_size_is_refused() -> None:
    vec, texts, _ = planted_vectors(per=1)
    with pytest.raises(DataError, match=r"6 document\(s\) is fewer than --min-cluster-size 10"):
        T.fit_topics(vec, lambda: iter(texts), T.Settings(reduce="pca"))


# ---- the command: UMAP twice in this process (determinism), the files, the report -------------


class HostileNamer:
    """Stands in for a chat model: names topic 0 with markup, the others plainly."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, topic: T.Topic, examples: list[str]) -> str:
        assert examples and topic.keywords  # it is given the representative texts and keywords
        return IMG + " " + SCRIPT if topic.id == 0 else f"named {topic.keywords[0][0]}"

    def record(self) -> dict:
        return {"path": self.path, "fake": True}


@pytest.fixture(scope="module")
def umap_runs(corpus: Path, bow_model: Path, tmp_path_factory) -> list[Path]:
    from lmforge.cli import main

    root = tmp_path_factory.mktemp("topics")
    outs = [root / "a", root / "b"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "Namer", HostileNamer)
        for out in outs:
            args = ["topics", str(bow_model), str(corpus / "docs.jsonl"), "--out", str(out), "--labels",
                    str(corpus / "gold.jsonl"), "--time-field", "ts", "--namer", "fake", "--threads", "1", "--seed", "3",
                    "--representative-docs", "30"]  # every document of a topic: the hostile ones too
            assert main(args) == 0
    return outs


def test_umap_topics_are_deterministic_and_match_the_planted_labels(umap_runs: list[Path]) -> None:
    a, b = umap_runs
    for name in (T.TOPICS_FILE, T.ASSIGNMENTS_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    manifest = json.loads((a / "MANIFEST.json").read_text())
    assert artifacts.verify_manifest(a, "topics") == []
    assert manifest["pipeline"]["reduce"] == {"method": "umap", "n_components": 5, "n_neighbors": 15, "min_dist": 0.0,
                                              "metric": "cosine"}
    assert manifest["pipeline"]["cluster"]["method"] == "hdbscan"
    assert manifest["pipeline"]["names"] == {"method": "chat model", "path": "fake", "fake": True}
    assert len(manifest["model"]["model_sha256"]) == 64 and manifest["input"]["documents"] == 120
    q = manifest["quality"]
    assert q["labels"]["final"]["nmi"] > 0.9 and q["labels"]["final"]["ari"] > 0.9 and q["outlier_share"] <= 0.10
    assert set(manifest["stages"]) >= {"scan", "embed", "reduce", "cluster", "outliers", "keywords", "names", "map"}
    topics = read_lines(a / T.TOPICS_FILE)
    assignments = read_lines(a / T.ASSIGNMENTS_FILE)
    assert [t["id"] for t in topics if t["id"] >= 0] == list(range(4)) and sum(t["size"] for t in topics) == 120
    assert topics[0]["name"] == IMG + " " + SCRIPT and topics[1]["name"].startswith("named ")
    assert len(topics[0]["keywords"]) == 10 and topics[0]["keywords"][0]["score"] > 0
    assert [len(t["representative_docs"]) for t in topics] == [t["size"] for t in topics if t["id"] >= 0]
    assert [a["id"] for a in assignments[:2]] == [SCRIPT, IMG] and len(assignments) == 120
    by_topic: dict[int, set[str]] = {}
    for rec, gold in zip(assignments, planted_records()):
        by_topic.setdefault(rec["topic"], set()).add(gold["label"])
        assert (rec["probability"] is None) == (rec["topic"] == -1)
    assert all(len(labels) == 1 for t, labels in by_topic.items() if t >= 0)  # each topic is one planted topic


class _Report(HTMLParser):
    """Text of the topics table's name cells and of the representative documents, <body>'s
    attributes, and the scripts (src or inline)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.docs: list[str] = []
        self.body: dict[str, str | None] = {}
        self.scripts: list[str | None] = []
        self._into: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts.append(a.get("type") or a.get("src") or "inline")
        elif tag == "td" and a.get("class") == "name":
            self._into, self._depth = self.names, 0
            self.names.append("")
        elif tag == "div" and a.get("class") == "doc":
            self._into, self._depth = self.docs, 0
            self.docs.append("")
        elif self._into is not None:
            self._depth += 1
            if tag not in ("span",):  # the id span inside a document is ours; anything else is markup that ran
                self._into[-1] += f"<<element {tag}>>"

    def handle_endtag(self, tag):
        if self._into is not None:
            if self._depth == 0:
                self._into = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        if self._into is not None:
            self._into[-1] += data


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_is_self_contained_and_renders_hostile_text_as_text(umap_runs: list[Path], tmp_path: Path) -> None:
    report = umap_runs[0] / T.REPORT_FILE
    raw = report.read_text(encoding="utf-8")
    assert "http://" not in raw.split("<script>", 1)[0] and "cdn" not in raw.lower().split("<script>", 1)[0]
    assert not re.search(r"<script[^>]*\ssrc=", raw)  # nothing loaded from anywhere: all inline
    assert raw.count(SCRIPT) == 0  # the payload never appears raw, only escaped in the JSON block
    dom, console = chromium_dom(report.as_uri(), tmp_path / "profile")
    assert console == [], "\n".join(console)
    page = _Report()
    page.feed(dom)
    assert page.body.get("data-ready") == "1", dom[-2000:]  # the script ran to its end
    assert "data-pwned" not in page.body
    assert page.scripts == ["application/json", "inline", "inline"]
    assert page.names[0] == IMG + " " + SCRIPT and page.names[1].startswith("named ")
    assert any(d.startswith(SCRIPT) and d.endswith(SCRIPT) for d in page.docs), page.docs  # the id span + the text
    for chart in ("map", "sizes", "similarity", "time"):
        part = dom.split(f'id="{chart}"', 1)[1][:200_000]
        assert "main-svg" in part, chart
    map_part = dom.split('id="map"', 1)[1].split('id="sizes"', 1)[0]
    assert map_part.count("trace scatter") >= 4  # one trace per topic
    assert "heatmaplayer" in dom.split('id="similarity"', 1)[1]


# ---- naming through a chat template ------------------------------------------------------------


def test_namer_prompts_through_the_chat_template_greedily(bow_model: Path, monkeypatch) -> None:
    import lmforge.generate

    namer = T.Namer(bow_model)
    tok = namer.loaded.tokenizer
    seen = {}

    def fake_generate(model, ids, *, max_tokens, temperature, stop_ids):
        seen.update(prompt=tok.decode(ids), max_tokens=max_tokens, temperature=temperature)
        return tok.encode(' "Space travel."\nmore text')

    monkeypatch.setattr(lmforge.generate, "generate", fake_generate)
    topic = T.Topic(0, 40, [("rocket", 0.5), ("orbit", 0.4)], "", [0])
    assert namer(topic, ["rocket to the moon", "orbit of a planet"]) == "Space travel"
    assert seen["temperature"] == 0.0 and seen["max_tokens"] == T.NAME_TOKENS
    assert seen["prompt"].startswith("User: These texts share one topic.")  # the default chat template
    assert "Keywords: rocket, orbit" in seen["prompt"] and "- orbit of a planet" in seen["prompt"]
    assert seen["prompt"].endswith("Assistant:")
    assert T.clean_name("Name: 'Cooking at home'.\nsecond line") == "Cooking at home"


# ---- inputs, outputs and refusals -------------------------------------------------------------


def test_overwrite_replaces_only_a_topics_directory(corpus: Path, bow_model: Path, tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    out = tmp_path / "t"
    base = ["topics", str(bow_model), str(corpus / "docs.jsonl"), "--out", str(out), "--reduce", "pca", "--threads", "1"]
    assert main(base) == 0
    first = (out / T.ASSIGNMENTS_FILE).read_bytes()
    assert main(base) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(base + ["--overwrite", "--no-reassign-outliers", "--namer", str(bow_model)]) == 0  # a real chat model
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["pipeline"]["outliers"]["reassign"] is False
    assert manifest["pipeline"]["names"]["method"] == "chat model" and manifest["pipeline"]["names"]["decoding"] == "greedy"
    assert manifest["stages"]["names"]["seconds"] >= 0
    assert all(isinstance(t["name"], str) and t["name"] for t in read_lines(out / T.TOPICS_FILE))
    assert artifacts.verify_manifest(out, "topics") == [] and len(first) > 0
    other = tmp_path / "not-topics"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    assert main(base[:4] + [str(other)] + base[5:] + ["--overwrite"]) == 2
    assert "is not a topics directory" in capsys.readouterr().err and (other / "keep.txt").read_text() == "precious"


def test_kmeans_replaces_hdbscan_and_text_files_and_directories_are_inputs(corpus, bow_model, tmp_path, capsys) -> None:
    from lmforge.cli import main

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(json.loads(x)["text"] for x in (corpus / "docs.jsonl").read_text().splitlines()) + "\n")
    docs = tmp_path / "dir"
    docs.mkdir()
    (docs / "one.md").write_text("pasta oven garlic soup", encoding="utf-8")
    (docs / "bin.dat").write_bytes(b"\xff\xfe not text")
    out = tmp_path / "k"
    assert main(["topics", str(bow_model), str(lines), str(docs), "--out", str(out), "--reduce", "pca",
                 "--cluster", "kmeans", "--n-topics", "4", "--json", "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["topics"] == 4 and summary["outlier_share"] == 0.0 and summary["documents"] == 121
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["pipeline"]["cluster"] == {"method": "kmeans", "n_topics": 4}
    assert manifest["input"]["not_utf8_skipped"] == 1
    ids = [a["id"] for a in read_lines(out / T.ASSIGNMENTS_FILE)]
    assert ids[0] == f"{lines}:1" and ids[-1] == f"{docs}/one.md"


@pytest.mark.parametrize("case, message", [
    ("few", "3 document(s) in {few} is fewer than --min-cluster-size 10: no topic can form"),
    ("empty", "no text to embed in"),
    ("labels-unknown", "gold-bad.jsonl:2: unknown id 'nope': no input document has it"),
    ("labels-field", "gold-field.jsonl:1: a label record needs the fields 'id' and 'label'"),
    ("duplicate", "dup.jsonl:2: id 'x' was already used at {dup}:1"),
    ("time", "docs-time.jsonl:1: field 'ts' is not a timestamp: 'yesterday'"),
    ("kmeans", "--cluster kmeans needs --n-topics N"),
    ("stop-words", "--stop-words must be english, none or a file of words"),
    ("out-exists", "already exists; choose another --out or pass --overwrite"),
])
def test_bad_input_is_one_line_and_exit_2(corpus, bow_model, tmp_path, capsys, case, message) -> None:
    from lmforge.cli import main

    few = write_jsonl(tmp_path / "few.jsonl", [{"text": "a b c"}] * 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    write_jsonl(tmp_path / "gold-bad.jsonl", [{"id": "d002", "label": "x"}, {"id": "nope", "label": "y"}])
    write_jsonl(tmp_path / "gold-field.jsonl", [{"id": "d002"}])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "text": "one"}, {"id": "x", "text": "two"}])
    write_jsonl(tmp_path / "docs-time.jsonl", [{"text": "a", "ts": "yesterday"}])
    (tmp_path / "exists").mkdir()
    docs = str(corpus / "docs.jsonl")
    out = str(tmp_path / "out")
    args = {
        "few": [str(few)], "empty": [str(empty)],
        "labels-unknown": [docs, "--labels", str(tmp_path / "gold-bad.jsonl")],
        "labels-field": [docs, "--labels", str(tmp_path / "gold-field.jsonl")],
        "duplicate": [str(dup), "--min-cluster-size", "2"],
        "time": [str(tmp_path / "docs-time.jsonl"), "--time-field", "ts", "--min-cluster-size", "2"],
        "kmeans": [docs, "--cluster", "kmeans"],
        "stop-words": [docs, "--stop-words", str(tmp_path / "missing.txt")],
        "out-exists": [docs],
    }[case]
    target = str(tmp_path / "exists") if case == "out-exists" else out
    assert main(["topics", str(bow_model), *args, "--out", target, "--reduce", "pca"]) == 2
    err = capsys.readouterr().err
    assert message.format(few=few, dup=dup) in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_timestamps_and_topics_over_time() -> None:
    assert T.parse_time("2024-05-01T12:00:00Z", "f:1", "ts") == 1714564800.0
    assert T.parse_time("2024-05-01", "f:1", "ts") == 1714521600.0  # no zone: UTC
    assert T.parse_time(1714564800, "f:1", "ts") == 1714564800.0
    with pytest.raises(DataError, match="f:1: field 'ts' is not a timestamp: True"):
        T.parse_time(True, "f:1", "ts")
    times = np.array([0.0, 10.0, 20.0, 30.0, np.nan])
    t = T.over_time(times, np.array([0, 0, 1, 0, 1]), [0, 1], bins=3)
    assert t["counts"] == {"0": [1, 1, 1], "1": [0, 0, 1]} and t["with_time"] == 4  # bins [0,10) [10,20) [20,30]
    assert t["edges"][0] == "1970-01-01T00:00:00Z" and len(t["edges"]) == 4
    assert T.over_time(np.array([np.nan, 5.0]), np.array([0, 0]), [0], 3) is None


def test_time_field_auto_finds_a_timestamp_and_none_turns_it_off(tmp_path: Path) -> None:
    recs = [{"id": f"r{i}", "text": "x", "created_at": f"2024-0{1 + i % 3}-01"} for i in range(6)]
    f = write_jsonl(tmp_path / "t.jsonl", recs)
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\n")
    c = T.scan([lines, f])  # default auto: the first record names the field; the plain lines have no time
    assert c.time_field == "created_at" and c.without_time == 2 and np.isnan(c.times[:2]).all()
    assert c.times[2] == T.parse_time("2024-01-01", "", "")
    assert T.scan([f], time_field=None).times is None
    assert T.scan([write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "when": "2024-01-01"}])]).time_field is None
    recs[3]["created_at"] = "soon"
    with pytest.raises(DataError, match=r"t.jsonl:4: field 'created_at' is not a timestamp: 'soon'; found by "
                                        r"--time-field auto: pass --time-field none to ignore it"):
        T.scan([write_jsonl(tmp_path / "t.jsonl", recs)])


def test_text_head_cuts_at_a_word_end() -> None:
    assert T.text_head("ab  cd ef", 5) == "ab"  # not between the two spaces: a piece may span them
    assert T.text_head("ab cd", 5) == "ab cd" and T.text_head("abcdefgh ij", 4) == "abcdefgh ij"  # no word end in it


@pytest.mark.parametrize("head_chars_per_token", [24, 1])  # 1: every head is too short in tokens, the whole is read
def test_long_texts_embed_from_their_head_exactly(bow_model: Path, monkeypatch, head_chars_per_token: int) -> None:
    from lmforge.understand.embed import Embedder

    monkeypatch.setattr(T, "HEAD_CHARS_PER_TOKEN", head_chars_per_token)
    rng = random.Random(1)
    words = [w for v in VOCAB.values() for w in v] + COMMON
    texts = [" ".join(rng.choice(words) for _ in range(600)), "rocket orbit", "x" * 4000,
             "  ".join(rng.choice(words) for _ in range(600)) + " "]
    emb = Embedder.load(bow_model, max_len=32)
    whole = emb.tokenize(texts)
    got, cut_count = T.embed_stream(emb, iter(texts), len(texts))
    assert cut_count == sum(len(r) > 32 for r in whole) == 3
    assert np.array_equal(got, emb.embed_ids([r[:32] for r in whole]))  # the whole texts tokenized, then cut


def test_the_utf8_check_streams_across_block_boundaries(tmp_path: Path, monkeypatch) -> None:
    from lmforge.understand import texts

    monkeypatch.setattr(texts, "_BLOCK", 3)  # multi-byte characters cut by every block boundary
    for data in [b"abc\xe6\x9d\xb1\xff", b"ab\xe6\x9d\xb1x\xe6\x9d", "\u6771\u6771ok".encode(), b"x" * 7 + b"\xff"]:
        (tmp_path / "f").write_bytes(data)
        try:
            want = data.decode("utf-8") and None
        except UnicodeDecodeError as e:
            want = e.start
        assert texts._not_utf8(tmp_path / "f") == want
