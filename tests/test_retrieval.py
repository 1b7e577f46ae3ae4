"""Retrieval evaluation: metrics by hand, task files (the bundled one: no leak between its files
and the training pairs), ranking, and `lmforge eval --retrieval` end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from lmforge.cli import main
from lmforge.errors import DataError
from lmforge.evaluate import metrics as M
from lmforge.evaluate.retrieval import rank
from lmforge.evaluate.tasks import load_task
from test_embed import tiny_model_dir

from lmforge.tokenizer import Tokenizer

# ---- metrics, by hand ------------------------------------------------------------------------


def test_retrieval_metrics_by_hand() -> None:
    ranking, rel = ["a", "b", "c", "d"], {"b": 1.0, "d": 1.0}
    # DCG = 1/log2(3) + 1/log2(5); IDCG = 1/log2(2) + 1/log2(3)
    assert M.ndcg_at_k(ranking, rel, 10) == pytest.approx((0.6309298 + 0.4306766) / 1.6309298, abs=1e-6)
    assert M.recall_at_k(ranking, rel, 1) == 0.0 and M.recall_at_k(ranking, rel, 2) == 0.5
    assert M.recall_at_k(ranking, rel, 10) == 1.0
    assert M.mrr_at_k(ranking, rel, 10) == 0.5 and M.mrr_at_k(ranking, rel, 1) == 0.0
    # graded gains: DCG = 1 + 2/log2(3), IDCG = 2 + 1/log2(3)
    assert M.ndcg_at_k(["a", "b"], {"a": 1.0, "b": 2.0}, 10) == pytest.approx((1 + 2 * 0.6309298) / (2 + 0.6309298), abs=1e-6)
    # nothing relevant in the top k: all zero; a cut-off below the relevant doc's rank too
    assert M.ndcg_at_k(["x", "y"], {"z": 1.0}, 10) == 0.0 and M.ndcg_at_k(ranking, {"d": 1.0}, 3) == 0.0
    m = M.retrieval_metrics([ranking, ["d", "b"]], [rel, {"d": 1.0}])
    assert m == {"ndcg@10": pytest.approx(((1.0616064 / 1.6309298) + 1.0) / 2, abs=1e-6), "recall@1": 0.5,
                 "recall@10": 1.0, "recall@100": 1.0, "mrr@10": 0.75}
    assert all(math.isnan(v) for v in M.retrieval_metrics([], []).values())


def test_rank_orders_by_score_ties_in_doc_order() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [1.0, 0.0, 0.0, 0.0]])
    assert rank(scores, ["a", "b", "c", "d"]) == [["b", "d", "c", "a"], ["a", "b", "c", "d"]]
    assert rank(scores, ["a", "b", "c", "d"], depth=2) == [["b", "d"], ["a", "b"]]


# ---- task files ------------------------------------------------------------------------------


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("records, message", [
    ([{"type": "doc", "id": "d", "text": "x"}], "needs at least one doc and one query"),
    ([{"type": "doc", "id": "d", "text": "x"}, {"type": "doc", "id": "d", "text": "y"}], "doc id 'd' appears twice"),
    ([{"type": "doc", "id": "d", "text": "x"}, {"type": "query", "id": "q", "text": "y", "relevant": ["e"]}],
     "relevant doc 'e' is not a doc of this file"),
    ([{"type": "doc", "id": "d", "text": "x"}, {"type": "query", "id": "q", "text": "y", "relevant": []}],
     "\"relevant\" is empty"),
    ([{"type": "doc", "id": "d", "text": "x"}, {"type": "query", "id": "q", "text": "y", "relevant": {"d": 0}}],
     "\"relevant\" must be a list of doc ids or an object of doc id -> gain > 0"),
    ([{"type": "doc", "id": "d", "text": ""}], "'text' must be a non-empty string"),
    ([{"type": "doc", "id": "d", "text": "x", "title": "t"}], "unknown field 'title' for a doc line"),
    ([{"type": "doc", "id": "d", "text": "x"}, {"context": "a", "target": "b"}], "a retrieval task holds only"),
    ([{"context": "a", "target": "b"}, {"type": "doc", "id": "d", "text": "x"}], "put a retrieval task in a file of its own"),
])
def test_bad_retrieval_tasks_name_file_and_line(tmp_path, records, message) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(">", ".")):
        load_task(write(tmp_path / "t.jsonl", records))


def test_the_bundled_task_is_split_by_file_and_small() -> None:
    task = load_task("stdlib-doc2code")
    path = REPO / "lmforge" / "tasks" / "stdlib-doc2code.jsonl"
    assert task.kind == "retrieval" and len(task.queries) == 300 and len(task.docs) == 750
    assert path.stat().st_size < 400_000
    assert all(len(q.relevant) == 1 for q in task.queries)
    spec = importlib.util.spec_from_file_location("make_task", REPO / "scripts" / "make_stdlib_doc2code.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    # every doc comes from a test-side file; no query text appears in its doc (the docstring is cut out)
    assert all(make.is_test_file(d.split("::")[0]) for d, _ in task.docs)
    docs = dict(task.docs)
    assert sum(q.text[:40] in docs[next(iter(q.relevant))] for q in task.queries) < 10


# ---- lmforge eval --retrieval ------------------------------------------------------------------


def test_eval_retrieval_end_to_end(tmp_path, capsys) -> None:
    texts = ["open a file and read it", "sum a list of numbers", "parse a date string", "sort names by length",
             "send an email message", "compress a directory"]
    tok = Tokenizer.train(texts * 3, vocab_size=300, min_frequency=1)
    model = tiny_model_dir(tok, tmp_path)
    # every query is the exact text of its doc: any model ranks it first (cosine 1), so all metrics are 1
    task = write(tmp_path / "same.jsonl", [{"type": "doc", "id": f"d{i}", "text": t} for i, t in enumerate(texts)]
                 + [{"type": "query", "id": f"q{i}", "text": t, "relevant": [f"d{i}"]} for i, t in enumerate(texts)])
    assert main(["eval", str(model), "--retrieval", str(task), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"] == {f"same/{k}": 1.0 for k in M.RETRIEVAL_METRICS}
    # a query whose relevant doc is another text: the metrics move off 1
    rolled = write(tmp_path / "rolled.jsonl", [{"type": "doc", "id": f"d{i}", "text": t} for i, t in enumerate(texts)]
                   + [{"type": "query", "id": f"q{i}", "text": t, "relevant": [f"d{(i + 1) % 6}"]} for i, t in enumerate(texts)])
    assert main(["eval", str(model), "--retrieval", str(rolled), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["rolled/recall@1"] == 0.0
    assert main(["eval", str(model), "--retrieval", "python-mc"]) == 2
    assert "--retrieval python-mc: a mc task, not a retrieval task" in capsys.readouterr().err


def test_the_sidecar_scores_a_retrieval_task_named_in_the_runs_config(tmp_path) -> None:
    import torch

    from lmforge.artifacts import EVAL_RESULTS_FILE
    from lmforge.config import load_config
    from lmforge.evaluate.watch import read_results, watch
    from lmforge.model import Transformer
    from lmforge.train.checkpoint import save_checkpoint

    texts = ["open a file and read it", "sum a list of numbers", "parse a date string"]
    tok = Tokenizer.train(texts * 3, vocab_size=300, min_frequency=1)
    tok.save(tmp_path / "tokenizer.json")
    task = write(tmp_path / "mine.jsonl", [{"type": "doc", "id": f"d{i}", "text": t} for i, t in enumerate(texts)]
                 + [{"type": "query", "id": f"q{i}", "text": t, "relevant": [f"d{i}"]} for i, t in enumerate(texts)])
    cfg = load_config("tiny-cpu", [f"model.vocab_size={tok.vocab_size}", f"eval.tasks=[{task}]"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    run = tmp_path / "run"
    save_checkpoint(run, 10, model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                    trainer_state={}, tokenizer_path=tmp_path / "tokenizer.json")
    assert watch(run, once=True, threads=1, nice=0) == 0
    (row,) = read_results(run)
    assert (run / EVAL_RESULTS_FILE).is_file() and row["step"] == 10
    assert row["metrics"] == {f"mine/{k}": 1.0 for k in M.RETRIEVAL_METRICS}
