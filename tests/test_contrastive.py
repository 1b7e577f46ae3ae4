"""The contrastive stage (train.objective: contrastive): pair sources, the InfoNCE objective, and
training through the one loop (deterministic order, exact resume, the store, the sidecar)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import lmforge_cmd, lmforge_in_process, subprocess_env
from lmforge import artifacts, convert
from lmforge.cli import main
from lmforge.config import EmbedConfig, ModelConfig, load_config
from lmforge.data.pairs import PARTS, DocumentSpans, PairRecords
from lmforge.errors import DataError, LmforgeError
from lmforge.evaluate.retrieval import score_retrieval
from lmforge.evaluate.tasks import Query, Task
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.contrastive import train_pairs
from lmforge.train.contrastive import write_pairs as write_pairs_api
from lmforge.train.loop import split_micro, train_step
from lmforge.train.objectives import Contrastive
from lmforge.train.optim import build_optimizer
from lmforge.train.start import StartRequest, train_command
from lmforge.understand.embed import Embedder, Pooling

QUERIES = [f"how do I {verb} a {noun}" for verb in ("open", "close", "sort", "parse", "copy") for noun in ("file", "list", "date", "string")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(QUERIES * 3 + ["def f(x): return x"] * 3, vocab_size=300, min_frequency=1)


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_pair_records_read_fields_prefixes_and_split(tok, tmp_path) -> None:
    recs = [{"title": q, "body": f"def f(x): return x  # {i}", "other": 1} for i, q in enumerate(QUERIES)]
    path = write_pairs(tmp_path / "p.jsonl", recs)
    fields = ("title", "body", "negative")
    train = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, query_prefix="q: ")
    val = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, split="val", query_prefix="q: ")
    assert train.n_samples + val.n_samples == len(QUERIES) and 0 < val.n_samples < len(QUERIES) // 2
    b = train.batch(np.array([0, 1]))
    assert set(b) == {"query", "query_lengths", "positive", "positive_lengths"}
    assert b["query"].shape == b["positive"].shape == (2, train.width(np.array([0, 1])))
    assert int(b["positive_lengths"].max()) == 8  # cut to max_len
    again = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, query_prefix="q: ")
    assert again.fingerprint == train.fingerprint  # the same tokens: the same data
    assert PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25).fingerprint != train.fingerprint
    q0 = b["query"][0, : int(b["query_lengths"][0])].tolist()
    assert q0 == tok.encode("q: " + tok.decode(q0)[3:])[:8] and tok.decode(q0).startswith("q: ")


@pytest.mark.parametrize("records, message", [
    ([{"query": "a b", "positive": "c"}, {"query": "d", "positive": "e", "negative": "f"}], "has a 'negative' field, unlike"),
    ([{"query": "a b"}], "no field 'positive'"),
    ([{"query": "a b", "positive": ""}], "field 'positive' must be a non-empty string"),
    ([["a", "b"]], "expected a JSON object"),
])
def test_bad_pair_files_name_file_and_line(tok, tmp_path, records, message) -> None:
    with pytest.raises(DataError, match=message):
        PairRecords(write_pairs(tmp_path / "p.jsonl", records), tok, max_len=16)


# ---- the objective -----------------------------------------------------------------------------------

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "engine", "silver", "garden",
         "rocket", "pepper", "marble", "violet", "harbor", "jacket", "window", "thunder", "copper", "meadow", "falcon",
         "puzzle", "anchor", "blanket", "canyon", "dragon", "ember", "feather"]
FILLER = ["the", "a", "of", "and", "with", "near", "under", "over"]


def toy_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """query: three topic words; positive: the same words among filler, shuffled (a lexical match a
    model can learn in a few steps); different seeds give different pairs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        topic = list(rng.choice(WORDS, 3, replace=False))
        doc = topic + list(rng.choice(FILLER, 4))
        rng.shuffle(doc)
        out.append({"query": " ".join(topic), "positive": " ".join(doc)})
    return out


@pytest.fixture(scope="module")
def toy_tok() -> Tokenizer:
    texts = [" ".join(WORDS), " ".join(FILLER)] * 4 + [p["positive"] for p in toy_pairs(200, 99)]
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1)


def toy_model(tok: Tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=64))


@pytest.fixture(scope="module")
def toy_model_dir(toy_tok: Tokenizer, tmp_path_factory) -> Path:
    """A tiny random model directory that embeds with mean pooling and a query prefix (its embed: section)."""
    embed = EmbedConfig(pooling="mean", query_prefix="q: ")
    return artifacts.write_model_dir(convert.bundle_from_model(toy_model(toy_tok), toy_tok, embed=embed),
                                     tmp_path_factory.mktemp("toy") / "model")


def pair_batch(tok: Tokenizer, pairs: list[dict[str, str]], width: int = 24) -> dict[str, torch.Tensor]:
    """A batch as PairRecords gives it: every part right-padded with 0 to one width."""
    out = {}
    for part in [p for p in PARTS if p in pairs[0]]:
        ids = [tok.encode(p[part]) for p in pairs]
        out[part] = torch.tensor([r + [0] * (width - len(r)) for r in ids])
        out[f"{part}_lengths"] = torch.tensor([len(r) for r in ids])
    return out


def hand_info_nce(model: Transformer, tok: Tokenizer, pairs: list[dict[str, str]], t: float) -> tuple[torch.Tensor, int]:
    """Σ_i -log softmax_j(cos(q_i, d_j) / t)[i] over d = positives then negatives, each text embedded
    alone (no padding) with a weighted mean written out; and the number of queries ranked right."""
    def vec(text: str) -> torch.Tensor:
        h = model.hidden_states(torch.tensor([tok.encode(text)]))[0]  # (L, C)
        w = torch.arange(1, h.shape[0] + 1, dtype=torch.float32)[:, None]
        v = (h * w).sum(0) / w.sum()
        return v / v.norm()

    q = torch.stack([vec(p["query"]) for p in pairs])
    d = torch.stack([vec(p[part]) for part in ("positive", "negative") if part in pairs[0] for p in pairs])
    total, right = torch.zeros(()), 0
    for i in range(len(pairs)):
        s = torch.stack([q[i] @ d[j] for j in range(len(d))]) / t
        total = total - (s[i] - torch.logsumexp(s, 0))
        right += int(s.argmax()) == i
    return total, right


@pytest.mark.parametrize("negatives, temperature", [(False, 0.1), (True, 0.1), (False, 1.0)])
def test_the_loss_is_info_nce_written_by_hand(toy_tok, negatives, temperature) -> None:
    pairs = toy_pairs(6, 1)
    if negatives:
        for p, other in zip(pairs, toy_pairs(6, 2)):
            p["negative"] = other["positive"]
    model = toy_model(toy_tok)
    out = Contrastive(temperature=temperature).loss(model, pair_batch(toy_tok, pairs))
    want, right = hand_info_nce(model, toy_tok, pairs, temperature)
    assert out.count == 6 and not out.averaged
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    assert float(out.metrics["in_batch_accuracy"]) == right


def test_the_gradient_is_normalised_over_the_pairs_of_all_micro_batches(toy_tok) -> None:
    """Two micro batches of 4 pairs: each scores its queries against its own positives, and the step's
    loss and gradient are those of (Σ over both micro batches) / 8 pairs."""
    pairs = toy_pairs(8, 3)
    batch = pair_batch(toy_tok, pairs)
    model = toy_model(toy_tok)
    want = (hand_info_nce(model, toy_tok, pairs[:4], 0.05)[0] + hand_info_nce(model, toy_tok, pairs[4:], 0.05)[0]) / 8
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt = build_optimizer(model, load_config(None).train)
    r = train_step(model, opt, split_micro(batch, 4, torch.device("cpu")), lr=0.0, grad_clip=0.0, dtype="fp32",
                   objective=Contrastive(0.05))
    assert r.units == 8 and r.loss == pytest.approx(want.item(), rel=1e-5)
    assert 0 <= r.metrics["in_batch_accuracy"] <= 1
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)  # a wrong divisor is off by 2x


# ---- through the loop -------------------------------------------------------------------------------

RUN_SETS = ("train.max_steps=12", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=6",
            "train.ckpt_every_steps=4", "data.seq_len=32", "guard.warmup=4")


def toy_task(n: int = 100, seed: int = 7) -> Task:
    """Held-out toy pairs as a retrieval task: each query's one relevant doc is its own positive."""
    pairs = toy_pairs(n, seed)
    return Task("toy", "retrieval", (), "", docs=tuple((f"d{i}", p["positive"]) for i, p in enumerate(pairs)),
                queries=tuple(Query(f"q{i}", p["query"], {f"d{i}": 1.0}) for i, p in enumerate(pairs)))


def train_embed(run_dir: Path, model: Path, pairs: Path, *sets: str, faults: str = "", nproc: int = 1) -> subprocess.CompletedProcess:
    """`lmforge train embed-cpu --set init.from=MODEL --set data.pairs=PAIRS` in this process (a subprocess for a
    kill fault, torchrun for nproc > 1)."""
    args = ["train", "embed-cpu", "--run-dir", str(run_dir),
            *[a for kv in (f"init.from={model}", f"data.pairs={pairs}", *RUN_SETS, *sets) for a in ("--set", kv)]]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "lmforge", *args]
    elif "kill" in faults:  # it SIGKILLs the process
        cmd = lmforge_cmd(*args)
    else:
        return lmforge_in_process(args, env={"LMFORGE_FAULTS": faults} if faults else None)
    env = subprocess_env(LMFORGE_FAULTS=faults) if faults else subprocess_env()
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def weights(run_dir: Path, step: int = 12) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def toy_pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", toy_pairs(400, 5))


@pytest.fixture(scope="module")
def straight(toy_model_dir: Path, toy_pairs_file: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("embedrun") / "run"
    proc = train_embed(run_dir, toy_model_dir, toy_pairs_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_contrastive_run_improves_retrieval_and_keeps_the_models_pooling(straight: Path, toy_model_dir: Path) -> None:
    before = score_retrieval(Embedder.load(toy_model_dir), toy_task())
    after = score_retrieval(Embedder.load(straight), toy_task())
    assert after["ndcg@10"] > before["ndcg@10"] + 0.05 and after["recall@1"] > before["recall@1"], (before, after)
    # the pooling init.from embeds with (mean, a query prefix) is the one trained, recorded and used
    assert Embedder.load(straight).pooling == Pooling("mean", query_prefix="q: ")
    cfg = load_config(straight / "checkpoints" / "step-000012" / "config.yaml")
    assert cfg.train.objective == "contrastive" and cfg.embed.pooling == "mean"
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 6 and all(0 <= m["in_batch_accuracy"] <= 1 for m in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["tokens_per_s"] > 0
    assert [m["step"] for m in metrics if "val_loss" in m] == [6, 12]


def test_a_contrastive_run_resumes_bit_for_bit_after_sigkill(straight: Path, toy_model_dir: Path, toy_pairs_file: Path,
                                                             tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = train_embed(run_dir, toy_model_dir, toy_pairs_file, faults="kill@7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train_embed(run_dir, toy_model_dir, toy_pairs_file)
    assert resumed.returncode == 0 and "at step 4" in resumed.stderr, resumed.stderr[-2000:]
    assert weights(run_dir) == weights(straight)


def test_two_processes_train_the_weights_of_one(toy_model_dir: Path, toy_pairs_file: Path, tmp_path: Path) -> None:
    """deterministic_reduce: every micro batch (its in-batch negatives) is the same on any world size."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir, n in ((one, 1), (two, 2)):
        proc = train_embed(run_dir, toy_model_dir, toy_pairs_file, "train.deterministic_reduce=true", "train.parallel=ddp",
                           "train.max_steps=4", "train.eval_every=0", nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(one, 4) == weights(two, 4)


@pytest.mark.parametrize("multi_label", [False, True])
def test_two_processes_train_the_classification_objective_as_one(multi_label: bool, toy_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """train.objective=classification (classify train --method finetune's run) under torchrun on 2 CPU
    processes (gloo) gives the weights of 1 process, its head (score) included, single- and multi-label."""
    from lmforge.understand.head import Head

    rng = np.random.default_rng(3)
    rows = []
    for p in toy_pairs(96, 11):
        topic = WORDS.index(p["query"].split()[0]) % 3  # a label the text's words decide
        label = [int(topic == k or (k == 2 and topic == 0)) for k in range(3)] if multi_label else topic
        rows.append({"text": p["positive"], "label": label})
    examples = write_pairs(tmp_path / "examples.jsonl", rows)
    probe = tmp_path / "probe.safetensors"  # the linear probe `classify train --method finetune` starts the head from
    Head(rng.normal(size=(3, 32)).astype(np.float32) * 0.1, np.zeros(3, np.float32), np.zeros(32, np.float32),
         np.ones(32, np.float32)).save(probe)
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir, n in ((one, 1), (two, 2)):
        proc = train_embed(run_dir, toy_model_dir, examples, "train.objective=classification", "data.pairs=",
                           f"data.examples={examples}", "model.num_labels=3", f"train.classification_head={probe}",
                           "data.pairs_val_fraction=0", "train.deterministic_reduce=true", "train.parallel=ddp",
                           "train.max_steps=4", "train.eval_every=0", "train.global_batch=16", "train.micro_batch=4",
                           nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(one, 4) == weights(two, 4)
    first = artifacts.load_model(one / "checkpoints" / "step-000004", device="cpu").model
    assert first.score is not None and not np.allclose(first.score.weight.detach().numpy(), Head.load(probe).weight)
    losses = [json.loads(line).get("loss") for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in losses if x is not None] == [json.loads(line).get("loss") for line in (
        one / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


def test_eval_of_a_contrastive_run_scores_its_held_out_pairs(straight: Path, capsys) -> None:
    code, out, err = cli(["eval", str(straight), "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert 0 < metrics["pairs-val/ndcg@10"] <= 1 and "pairs-val/mrr@10" in metrics


def test_an_index_of_a_contrastive_run_tunes_its_default_search_on_the_held_out_pairs(
        straight: Path, toy_model_dir: Path, toy_pairs_file: Path, tmp_path: Path, capsys) -> None:
    from lmforge.understand.index import tune

    corpus = write_pairs(tmp_path / "docs.jsonl", [{"text": p["positive"]} for p in toy_pairs(60, 11)])
    # `straight` holds out 15 of its 400 pairs (5 %): too few to measure by; built untuned, and said
    capsys.readouterr()
    assert main(["index", "build", str(straight), str(corpus), "--out", str(tmp_path / "idx" / "few")]) == 0
    assert "15 held-out pairs; tuning needs at least 20" in " ".join(capsys.readouterr().err.split())
    assert "search" not in artifacts.read_manifest(tmp_path / "idx" / "few").fields
    run = tmp_path / "run"  # 10 % held out
    assert train_embed(run, toy_model_dir, toy_pairs_file, "data.pairs_val_fraction=0.1").returncode == 0
    assert main(["index", "build", str(run), str(corpus), "--out", str(tmp_path / "idx" / "a")]) == 0
    record = artifacts.read_manifest(tmp_path / "idx" / "a").fields["search"]
    held = tune.held_out(run, None)  # the run's val pairs: never trained on
    assert held is not None and record["tuned"]["queries"] == len(held[0]) >= tune.MIN_QUERIES
    assert "(val split, 0.1)" in record["tuned"]["pairs"] and len(record["tuned"]["grid"]) == len(tune.GRID)
    # --no-tune leaves it untuned; `index tune` then measures the same pairs the same way
    assert main(["index", "build", str(run), str(corpus), "--out", str(tmp_path / "idx" / "b"), "--no-tune"]) == 0
    assert "search" not in artifacts.read_manifest(tmp_path / "idx" / "b").fields
    capsys.readouterr()
    assert main(["index", "tune", str(tmp_path / "idx" / "b"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "tuned"} == {k: v for k, v in record.items() if k != "tuned"}
    assert again["tuned"]["grid"] == record["tuned"]["grid"]


def test_spans_of_a_prepared_corpus_train_without_labels(tiny_dataset: Path, tmp_path: Path) -> None:
    """No pairs file: two spans of each document of data.path; a model trained from scratch (its
    tokenizer the dataset's)."""
    src = DocumentSpans(tiny_dataset, max_len=24, seed=0)
    again = DocumentSpans(tiny_dataset, max_len=24, seed=0)
    assert src.n_samples > 2 and src.fingerprint == again.fingerprint != DocumentSpans(tiny_dataset, max_len=24, seed=1).fingerprint
    starts = src.dataset.document_starts.tolist() + [src.dataset.n_tokens]
    docs = [np.asarray(src.dataset.window(a, b - a)) for a, b in zip(starts, starts[1:])]
    docs = [d for d in docs if len(d) - 1 >= 8]
    for i in range(src.n_samples):
        b = src.batch(np.array([i]))
        for part in ("query", "positive"):
            span = b[part][0, : int(b[f"{part}_lengths"][0])].numpy()
            assert 1 <= len(span) <= 24 and _inside(span, docs[i])  # a piece of its own document
    code = train_command(StartRequest(config="embed-cpu", run_dir=str(tmp_path / "run"), overrides=(
        f"data.path={tiny_dataset}", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.seq_len=24",
        "train.max_steps=3", "train.eval_every=3", "train.eval_batches=1", "train.micro_batch=8", "train.global_batch=16")))
    assert code == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("in_batch_accuracy" in m for m in metrics) and any("val_loss" in m for m in metrics)


def _inside(span: np.ndarray, doc: np.ndarray) -> bool:
    n = len(span)
    return any(np.array_equal(doc[s:s + n], span) for s in range(len(doc) - n + 1))


def test_train_pairs_trains_through_the_loop_and_refuses_other_pairs_on_resume(toy_model_dir: Path, tmp_path: Path) -> None:
    """The library call other stages use (e.g. SetFit-style classification)."""
    pairs = [(p["query"], p["positive"]) for p in toy_pairs(40, 11)]
    run = train_pairs(pairs, init_from=toy_model_dir, run_dir=tmp_path / "run",
                      overrides=("train.max_steps=2", "train.eval_every=0", "data.seq_len=32"))
    assert run == tmp_path / "run" and (tmp_path / "run.pairs.jsonl").is_file()
    assert Embedder.load(run).embed(["apple river stone"], kind="query").shape == (1, 32)
    with pytest.raises(LmforgeError, match="fingerprint"):
        train_pairs(pairs[:-1], init_from=toy_model_dir, run_dir=tmp_path / "run",
                    overrides=("train.max_steps=3", "train.eval_every=0", "data.seq_len=32"))
    with pytest.raises(DataError, match="pair 1 has 3 texts"):
        write_pairs_api([("a", "b"), ("c", "d", "e")], tmp_path / "x.jsonl")


# ---- mistakes: one line ------------------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lmforge ARGV` in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, captured.err


@pytest.mark.parametrize("pairs, sets, message", [
    ('{"query": "a"}\n', (), "bad.jsonl:1: no field 'positive'"),
    ('{"query": "a", "positive": "b"}\nnot json\n', (), "bad.jsonl:2"),
    ('{"title": "a", "body": "b"}\n{"title": "c", "body": "d"}\n', ("data.pair_fields=[title,body]", "train.eval_every=0",
                                                                     "train.objective=next_token"), "data.pairs (<pairs>) is read by train.objective=contrastive only"),
    ('{"title": "a", "body": "b"}\n', ("data.pair_fields=[title,body]", "train.eval_every=0"), "1 pair(s) in the train split"),
    ('{"query": "a", "positive": "b"}\n' * 3, ("data.pairs_val_fraction=0",), "no pair of <pairs> falls in the val split"),
    ('{"query": "a", "positive": "b"}\n', ("data.pair_fields=[query]",), "data.pair_fields must name 2 or 3"),
    ('{"query": "a", "positive": "b"}\n', ("embed.normalize=false",), "set embed.normalize=true"),
    ('{"query": "a", "positive": "b"}\n', ("init.from=",), "set init.from to the model to train"),
])
def test_bad_pairs_and_settings_are_one_line(pairs, sets, message, toy_model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(pairs, encoding="utf-8")
    argv = ["train", "embed-cpu", "--run-dir", str(tmp_path / "run"),
            *[a for kv in (f"init.from={toy_model_dir}", f"data.pairs={path}", "data.seq_len=32", *sets) for a in ("--set", kv)]]
    code, _, err = cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message.replace("<pairs>", str(path)) in lines[0], err
    assert not (tmp_path / "run").exists()
