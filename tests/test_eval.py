"""Evaluation: hand-computed metrics, a model whose answers are known, packed == naive scoring,
task-file validation, `lmforge eval` end to end, and the --watch sidecar (beside a training run,
after its own restart, past a corrupt checkpoint)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import REPO, lmforge_cmd, lmforge_in_process, subprocess_env
from test_train import run_train
from lmforge.config import ModelConfig
from lmforge.errors import DataError
from lmforge.evaluate import metrics as M
from lmforge.evaluate.loss import nll_totals, stream_batches, text_batches
from lmforge.evaluate.score import Request, make_request, score_naive, score_packed
from lmforge.evaluate.tasks import encode_request, load_task
from lmforge.artifacts import EVAL_RESULTS_FILE
from lmforge.evaluate.watch import read_results
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

# ---- metrics, by hand -------------------------------------------------------------------------


def test_loss_metrics_by_hand() -> None:
    m = M.loss_metrics(nll_sum=6.0, n_tokens=3, n_bytes=4)
    assert m["loss"] == 2.0
    assert m["perplexity"] == pytest.approx(math.e**2)
    assert m["bits_per_byte"] == pytest.approx(6.0 / 4 / math.log(2))


def test_mc_metrics_acc_and_acc_norm_by_hand() -> None:
    # item 1: raw picks "a" (-1 > -2), per character picks "bbbbb" (-2/5 = -0.4 > -1/1)
    # item 2: raw picks "b" (-1 > -3): wrong; per character -3/2 = -1.5 < -1/1: still "b", wrong
    # item 3: a tie goes to the first choice (numpy argmax), gold 0: right both ways
    m = M.mc_metrics([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0]], [0, 0, 0], [["a", "bbbbb"], ["aa", "b"], ["x", "y"]])
    assert m == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1 / 3)}


def test_exact_match_and_stop_strings() -> None:
    assert M.cut_at_stop("os.py\nprint", ["\n"]) == "os.py"
    assert M.cut_at_stop("abc", ["x"]) == "abc"
    assert M.cut_at_stop("a b\nc", ["\n", " "]) == "a"
    assert M.exact_match([" os.py ", "x"], ["os.py", "y"]) == {"exact_match": 0.5}


class Uniform(nn.Module):
    """Equal logits for every token: each target costs exactly ln(V) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab) + 0 * self.w  # (B, T, V)


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    texts = ["def main():\n    return os.path.join(a, b)\n", "héllo wörld ✓ 日本語\n" * 3, "import sys\n" * 5]
    return Tokenizer.train(texts, vocab_size=300)


def test_bits_per_byte_counts_utf8_bytes_of_multibyte_text(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    text = "héllo wörld ✓ 日本語, naïve café\n"
    assert len(text.encode("utf-8")) > len(text)  # really multi-byte
    ids = tok.encode(text)
    batches = list(text_batches(ids, start_id=tok.eos_id, seq_len=5, batch_size=2))
    # every token of the text is a target exactly once, in order; padding is -100
    targets = torch.cat([b["targets"].flatten() for b in batches])
    assert targets[targets != -100].tolist() == ids
    nll, n_tokens, n_bytes = nll_totals(Uniform(tok.vocab_size), batches, tok.token_nbytes())
    assert n_tokens == len(ids)
    assert n_bytes == len(text.encode("utf-8"))
    assert nll == pytest.approx(len(ids) * math.log(tok.vocab_size), rel=1e-6)
    bpb = M.loss_metrics(nll, n_tokens, n_bytes)["bits_per_byte"]
    assert bpb == pytest.approx(len(ids) * math.log2(tok.vocab_size) / len(text.encode("utf-8")), rel=1e-6)


# ---- eval --text streams its file (issue 21.4) ------------------------------------------------------


def test_streamed_batches_equal_the_whole_texts(small_tokenizer: Tokenizer) -> None:
    """Tokens arriving piece by piece make exactly the windows of the whole token list, for any split."""
    rnd = random.Random(0)
    for _ in range(50):
        ids = [rnd.randrange(300) for _ in range(rnd.randrange(1, 60))]
        cuts = sorted(rnd.sample(range(len(ids) + 1), rnd.randrange(0, min(6, len(ids) + 1))))
        pieces = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        seq_len, batch = rnd.randrange(1, 9), rnd.randrange(1, 4)
        whole = list(text_batches(ids, start_id=1, seq_len=seq_len, batch_size=batch))
        streamed = list(stream_batches(pieces, start_id=1, seq_len=seq_len, batch_size=batch))
        assert len(whole) == len(streamed) and all(torch.equal(a["inputs"], c["inputs"]) and torch.equal(a["targets"], c["targets"])
                                                   for a, c in zip(whole, streamed))
        assert torch.cat([b["targets"].flatten() for b in streamed]).tolist().count(-100) < seq_len * batch


def test_text_pieces_cut_at_newlines_then_spaces_then_characters(tmp_path: Path) -> None:
    from lmforge.evaluate.harness import text_pieces

    for text in ("ab\ncd " * 30 + "é" * 50 + "日本語" * 40, "x" * 250, "word " * 100, "日" * 301, "a"):
        pieces = text_pieces_of(text, tmp_path)
        assert "".join(pieces) == text and all(0 < len(p) <= 64 for p in pieces)
    assert all(p.endswith("\n") for p in text_pieces_of("ab\ncd " * 30, tmp_path)[:-1])  # after a newline
    pieces = text_pieces_of("word " * 100, tmp_path)  # no newline: before a space (the word keeps its space)
    assert all(p.endswith("word") for p in pieces[:-1]) and all(p.startswith(" ") for p in pieces[1:])
    assert [len(p) for p in text_pieces_of("x" * 150, tmp_path)] == [64, 64, 22]  # neither: at the limit
    f = tmp_path / "bad.txt"
    f.write_bytes("abcé".encode() + b"\xff" + b"def")  # é's two bytes arrive in two reads of 4 bytes
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 5 is not valid UTF-8\)"):
        list(text_pieces(f, piece_chars=4))


def text_pieces_of(text: str, tmp_path: Path) -> list[str]:
    """The pieces of `text` written to a file, at 64 characters a piece."""
    from lmforge.evaluate.harness import text_pieces

    f = tmp_path / "p.txt"
    f.write_text(text, encoding="utf-8")
    return list(text_pieces(f, piece_chars=64))


def test_eval_text_memory_is_bounded_by_the_piece_not_the_file(small_tokenizer: Tokenizer, tmp_path: Path,
                                                              monkeypatch) -> None:
    """A 1 MB text of one line, streamed in 4,096-character pieces: Python's peak allocation stays near
    the pieces, far below the file's size (read whole and encoded at once, the ids list alone is ~16 MB)."""
    import tracemalloc

    import lmforge.evaluate.harness as H

    f = tmp_path / "line.txt"
    f.write_text(("def main(): return os.path.join(a, b) " * 30_000)[:1_000_000], encoding="utf-8")
    monkeypatch.setattr(H, "TEXT_PIECE_CHARS", 4096)
    tracemalloc.start()
    try:
        batches = stream_batches(H.encoded(small_tokenizer, H.text_pieces(f, H.TEXT_PIECE_CHARS)), start_id=0,
                                 seq_len=64, batch_size=8)
        n = sum(int((b["targets"] != -100).sum()) for b in batches)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n > 100_000 and peak < 2_000_000, (n, peak)


# ---- a model whose answers are known -------------------------------------------------------------


class Bigram(nn.Module):
    """logits at position t depend only on the token at t: log P[idx[t]] (rows sum to one)."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logp = nn.Parameter(probs.log())
        self.cfg = ModelConfig(vocab_size=probs.shape[0], n_layer=1, n_head=1, d_model=2, max_seq_len=16)

    def forward(self, idx: torch.Tensor, **_: object) -> torch.Tensor:
        return self.logp[idx]  # (B, T, V)


P = torch.tensor([[0.1, 0.6, 0.2, 0.1],   # after 0: 1 is likely
                  [0.1, 0.1, 0.7, 0.1],   # after 1: 2
                  [0.5, 0.2, 0.2, 0.1],   # after 2: 0
                  [0.25, 0.25, 0.25, 0.25]])


@pytest.mark.parametrize("scorer", ["naive", "packed"])
def test_known_model_gives_hand_computed_logprobs(scorer: str) -> None:
    model = Bigram(P)
    reqs = [Request((3, 0), ((1, 2), (2, 0), (3,))), Request((2,), ((0, 1, 2),))]
    score = score_naive(model, reqs) if scorer == "naive" else score_packed(model, reqs, batch_size=2)
    ln = math.log
    expected = [[ln(0.6) + ln(0.7), ln(0.2) + ln(0.5), ln(0.1)], [ln(0.5) + ln(0.6) + ln(0.7)]]
    greedy = [[True, False, False], [True]]
    for row, exp, gr in zip(score, expected, greedy):
        assert [s.logprob for s in row] == pytest.approx(exp, abs=1e-5)
        assert [s.greedy for s in row] == gr
    m = M.mc_metrics([[s.logprob for s in score[0]]], [0], [["ab", "ca", "d"]])
    assert m == {"acc": 1.0, "acc_norm": 1.0}


@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_packed_scorer_equals_naive_on_a_real_transformer(n_kv_head: int) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=60, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, max_seq_len=40)).eval()
    rng = random.Random(n_kv_head)
    reqs = []
    for _ in range(25):  # contexts up to 35 tokens + up to 4 choices of up to 7: some need several rows
        ctx = [rng.randrange(60) for _ in range(rng.randrange(1, 36))]
        conts = [[rng.randrange(60) for _ in range(rng.randrange(1, 8))] for _ in range(rng.randrange(1, 5))]
        reqs.append(make_request(ctx, conts, 40))
    naive = score_naive(model, reqs)
    for batch_size in (1, 3, 64):
        packed = score_packed(model, reqs, batch_size=batch_size)
        for a, b in zip(naive, packed):
            assert [s.greedy for s in a] == [s.greedy for s in b]
            assert [s.n_tokens for s in a] == [s.n_tokens for s in b]
            torch.testing.assert_close(torch.tensor([s.logprob for s in b]), torch.tensor([s.logprob for s in a]),
                                       rtol=1e-5, atol=1e-4)


def test_make_request_truncates_context_from_the_left_and_refuses_huge_choices() -> None:
    r = make_request(list(range(30)), [[1, 2, 3], [4]], max_len=10)
    assert r.context == tuple(range(23, 30))  # 7 context + 3 longest choice = 10
    with pytest.raises(DataError, match="leaves no room"):
        make_request([1], [list(range(10))], max_len=10, where="t.jsonl:4")


def test_encode_request_follows_lm_eval(small_tokenizer: Tokenizer) -> None:
    tok = small_tokenizer
    ctx, conts = encode_request(tok, "import", [" sys\n", " os"])  # the joint encoding, split after the context
    assert ctx == tok.encode("import") and [ctx + c for c in conts] == [tok.encode("import sys\n"), tok.encode("import os")]
    ctx, (cont,) = encode_request(tok, "x = ", ["1"])  # trailing whitespace moves into the continuation
    assert ctx == tok.encode("x =") and ctx + cont == tok.encode("x = 1")
    ctx, (cont,) = encode_request(tok, "", ["hello"])  # empty context: the document separator
    assert ctx == [tok.eos_id] and cont == tok.encode("hello")


# ---- task files --------------------------------------------------------------------------------


def test_shipped_tasks_load() -> None:
    kinds = {p.name: load_task(p).kind for p in sorted((REPO / "tasks").glob("*.jsonl"))}
    assert kinds == {"python-cloze.jsonl": "cloze", "python-gen.jsonl": "gen", "python-mc.jsonl": "mc",
                     "support-chat-gen.jsonl": "gen", "stdlib-doc2code.jsonl": "retrieval"}
    assert all(i.chat for i in load_task("support-chat-gen").items)  # prompted with the model's chat template
    mc = load_task(REPO / "tasks" / "python-mc.jsonl")
    assert len(mc.items) >= 24 and all(len(i.choices) == 4 for i in mc.items)
    assert len({i.gold for i in mc.items}) == 4  # "always pick A" is not a strategy


def test_bundled_task_by_name_from_any_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no tasks/ here
    by_name, by_path = load_task("python-mc"), load_task(REPO / "tasks" / "python-mc.jsonl")
    assert by_name.name == "python-mc" and by_name.path == str(REPO / "lmforge" / "tasks" / "python-mc.jsonl")
    assert [(i.context, i.choices, i.gold) for i in by_name.items] == [(i.context, i.choices, i.gold) for i in by_path.items]
    assert load_task("python-cloze.jsonl").kind == "cloze"
    (tmp_path / "python-mc").write_text('{"context": "a", "target": "b"}\n')  # a path that exists wins
    assert load_task("python-mc").kind == "cloze"
    with pytest.raises(DataError, match=r"task file not found: python-mcq \(or give a bundled one by name: "
                                        r"python-cloze, python-gen, python-mc, stdlib-doc2code, support-chat-gen\)"):
        load_task("python-mcq")
    with pytest.raises(DataError, match="task file not found: tasks/python-mc.jsonl"):
        load_task("tasks/python-mc.jsonl")  # a path with a directory part is never looked up by name


@pytest.mark.parametrize("lines, match", [
    (['{"context": "a", "choices": ["b", "c"], "gold": 0}', "", '{"context": "a", "choices": ["b", "c"], "gold": 2}'],
     r"bad\.jsonl:3: \"gold\" must be the index"),
    (['{"context": "a", "target": "b"}', "{not json"], r"bad\.jsonl:2: invalid JSON \(.* at column 2\); expected one JSON object \(an item\) per line"),
    (['{"context": "a", "target": "b", "choicez": 1}'], r"bad\.jsonl:1: unknown field 'choicez'"),
    (['{"context": "a", "choices": ["b", "b"], "gold": 0}'], r"bad\.jsonl:1: two choices are the same"),
    (['{"context": "a", "choices": ["b"], "gold": 0}'], r"bad\.jsonl:1: \"choices\" must be a list of at least 2"),
    (['{"context": "a", "target": "b"}', '{"context": "a", "choices": ["b", "c"], "gold": 1}'],
     r"bad\.jsonl:2: a mc item in a file whose first item \(.*bad\.jsonl:1\) is cloze"),
    (['{"target": "b"}'], r"bad\.jsonl:1: missing field 'context'"),
    (['{"context": "x"}'], r"bad\.jsonl:1: cannot tell the item's kind"),
    (['{"type": "gen", "context": "x", "target": "y", "max_tokens": 0}'], r"bad\.jsonl:1: \"max_tokens\" must be"),
    ([""], r"bad\.jsonl: no items"),
])
def test_task_validation_names_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_task(p)


# ---- the CLI on a real run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory) -> Path:
    """A 40-step tiny run keeping all five checkpoints (steps 0, 10, 20, 30, 40)."""
    run_dir = tmp_path_factory.mktemp("evalrun") / "r1"
    run_train(tiny_dataset, run_dir, "train.keep_last=10")
    return run_dir


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return lmforge_in_process(list(args))  # the sidecar tests below start real processes


def test_eval_cli_reports_val_metrics_that_match_the_library(run: Path, tiny_dataset: Path) -> None:
    from lmforge.evaluate.loss import dataset_batches
    from lmforge.artifacts import load_model

    proc = lmforge("eval", str(run), "--json", "--tasks", str(REPO / "tasks" / "python-mc.jsonl"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["step"] == 40
    loaded = load_model(run / "checkpoints" / "step-000040")
    model, tok = loaded.model, loaded.tokenizer
    nll, n, nbytes = nll_totals(model, dataset_batches(str(tiny_dataset), seq_len=64, batch_size=8, max_batches=0),
                                tok.token_nbytes())
    m = out["metrics"]
    assert m["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert 0 <= m["python-mc/acc"] <= 1 and 0 <= m["python-mc/acc_norm"] <= 1
    naive = lmforge("eval", str(run), "--json", "--scorer", "naive", "--tasks", str(REPO / "tasks" / "python-mc.jsonl"),
                    "--text", str(REPO / "README.md"))
    assert naive.returncode == 0, naive.stderr
    assert json.loads(naive.stdout)["metrics"]["python-mc/acc"] == m["python-mc/acc"]


def test_eval_compile_decodes_generation_tasks_compiled_with_the_same_metrics(run: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """`eval --compile`: a generation task's decode step compiled (one stream's step ahead of
    time: a package appears in the cache), the same greedy outputs, so the same exact match; the
    loss on the run's data is scored as trained either way."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    args = ("eval", str(run), "--json", "--tasks", str(REPO / "tasks" / "python-gen.jsonl"), "--max-batches", "2")
    plain = lmforge(*args)
    compiled = lmforge(*args, "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["metrics"] == json.loads(plain.stdout)["metrics"]
    assert len(list((tmp_path / "aot").glob("decode-*.pt2"))) == 1


def test_eval_json_writes_non_finite_metrics_as_strings(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`eval --json` follows lmforge/jsonl.py's rule (it wrote null before): NaN, inf and -inf
    metrics print as "nan", "inf", "-inf" (the metrics come from a stand-in for the evaluation:
    a real one gives NaN only for an empty set, which the command refuses up front)."""
    from lmforge.evaluate import harness
    from lmforge.jsonl import restore_numbers

    def bare(name: str) -> None:
        raise AssertionError(f"bare {name} in --json output")

    text = tmp_path / "text.txt"
    text.write_text("def f():\n    return 1\n")
    fake = {"a": math.inf, "b": -math.inf, "c": math.nan, "d": 0.5}
    monkeypatch.setattr(harness, "evaluate_model", lambda *args, **kwargs: dict(fake))
    capsys.readouterr()
    assert harness.eval_command(str(run), tasks=None, data=None, text=str(text), batch_size=None, threads=None,
                                max_batches=0, as_json=True) == 0
    metrics = json.loads(capsys.readouterr().out, parse_constant=bare)["metrics"]
    assert metrics == {"a": "inf", "b": "-inf", "c": "nan", "d": 0.5}
    back = restore_numbers(metrics)
    assert (back["a"], back["b"], back["d"]) == (math.inf, -math.inf, 0.5) and math.isnan(back["c"])


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nope"], "no such run, checkpoint or model directory"),
    (["{run}", "--tasks", "{tmp}/bad.jsonl"], "bad.jsonl:1: invalid JSON"),
    (["{run}", "--data", "{tmp}", "--text", "{tmp}/bad.jsonl"], "give --data or --text, not both"),
    (["{run}", "--data", "{tmp}"], "is not a prepared dataset"),
    (["{run}/checkpoints/step-000010", "--watch"], "follows a run directory, not a checkpoint"),
    (["{tmp}", "--watch"], "is not a run directory"),
    (["{run}/config.yaml", "--watch"], "is a file"),
    (["{tmp}/model", "--watch"], "is a model directory, not a run directory"),
    (["{tmp}/nope", "--watch", "--once"], "drop --once to wait for the run to start"),
    # flags that would be silently ignored, or that contradict each other
    (["{run}", "--once"], "--once only applies to the sidecar: add --watch"),
    (["{run}", "--follow", "--interval", "1"], "--follow and --interval only apply to the sidecar"),
    (["{run}", "--watch", "--once", "--follow"], "--once makes one pass and exits, --follow keeps watching"),
    (["{run}", "--watch", "--json"], "drop --json"),
    (["{run}", "--watch", "--compile"], "--compile applies to one evaluation, not to the --watch sidecar"),
    (["{run}", "--watch", "--data", "{tmp}", "--text", "{tmp}/bad.jsonl"], "give --data or --text, not both"),
])
def test_eval_cli_errors_are_clear(run: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    (tmp_path / "model").mkdir()  # what `lmforge import` writes: weights, config, tokenizer; no checkpoints/
    for name in ("model.safetensors", "config.yaml", "tokenizer.json"):
        (tmp_path / "model" / name).write_text("", encoding="utf-8")
    proc = lmforge("eval", *[a.format(run=run, tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the sidecar -------------------------------------------------------------------------------


def test_sidecar_beside_training_evaluates_every_checkpoint_once_and_records_in_the_store(tiny_dataset, tmp_path) -> None:
    from lmforge.track.store import Store

    run_dir = tmp_path / "runs" / "live"  # not there yet (nor runs/): as with `lmforge train ... &` in docs/eval.md
    sidecar = subprocess.Popen(lmforge_cmd("eval", str(run_dir), "--watch", "--interval", "0.2", "--threads", "1",
                                           "--tasks", str(REPO / "tasks" / "python-cloze.jsonl")),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    try:
        said = []
        for line in sidecar.stdout:  # the sidecar is looking before the run exists (training starts after)
            said.append(line)
            if "waiting for" in line:
                break
        run_train(tiny_dataset, run_dir, "train.keep_last=10")
        rest, _ = sidecar.communicate(timeout=240)  # exits by itself once training completed
    finally:
        sidecar.kill()
    out = "".join(said) + rest
    assert sidecar.returncode == 0, out
    results = read_results(run_dir)
    assert sorted(r["step"] for r in results) == [0, 10, 20, 30, 40], out
    assert len({r["key"] for r in results}) == 5
    assert "training completed" in out
    assert out.count("waiting for") == 1, out  # said once, not once per look
    with Store.open() as store:
        run_id = store.run_id(str(run_dir))
        curve = store.metrics(run_id, ["eval/loss", "eval/python-cloze/acc"])
        assert curve["eval/loss"]["step"] == [0, 10, 20, 30, 40]
        assert curve["eval/loss"]["value"] == pytest.approx([r["metrics"]["loss"] for r in sorted(results, key=lambda r: r["step"])])
        assert len(curve["eval/python-cloze/acc"]["step"]) == 5
        assert [e["step"] for e in store.events(run_id) if e["kind"] == "eval"] == [0, 10, 20, 30, 40]
    show = lmforge("runs", "show", str(run_dir))
    assert "eval/loss" in show.stdout and "eval/bits_per_byte" in show.stdout


@pytest.mark.parametrize("start", ["missing", "empty"])
def test_sidecar_waits_for_a_run_directory_that_is_missing_or_empty(run: Path, tmp_path: Path, start: str) -> None:
    run_dir = tmp_path / "later" / "r"
    if start == "empty":
        run_dir.mkdir(parents=True)
    sidecar = subprocess.Popen(lmforge_cmd("eval", str(run_dir), "--watch", "--interval", "0.2", "--max-batches", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    try:
        said = []
        for line in sidecar.stdout:  # the sidecar is running and looking before the run appears
            said.append(line)
            if ("waiting for" if start == "missing" else "eval sidecar: watching") in line:
                break
        assert sidecar.poll() is None, "".join(said)
        staged = tmp_path / "staged"
        shutil.copytree(run, staged)
        (staged / EVAL_RESULTS_FILE).unlink(missing_ok=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(run_dir)  # the whole (completed) run appears at once (replacing the empty directory)
        rest, _ = sidecar.communicate(timeout=240)
    finally:
        sidecar.kill()
    out = "".join(said) + rest
    assert sidecar.returncode == 0, out
    assert out.count("waiting for") == (1 if start == "missing" else 0), out
    assert sorted(r["step"] for r in read_results(run_dir)) == [0, 10, 20, 30, 40], out
    assert "training completed" in out


def test_sidecar_survives_its_restart_and_skips_a_corrupt_checkpoint(run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"  # not in the store: results go to the JSONL only
    shutil.copytree(run, run_dir)
    (run_dir / EVAL_RESULTS_FILE).unlink(missing_ok=True)
    ckpts = run_dir / "checkpoints"
    later = tmp_path / "later"
    later.mkdir()
    for name in ("step-000030", "step-000040"):  # the sidecar first sees a run in progress
        (ckpts / name).rename(later / name)
    first = lmforge("eval", str(run_dir), "--watch", "--once", "--max-batches", "2")
    assert first.returncode == 0, first.stderr
    assert sorted(r["step"] for r in read_results(run_dir)) == [0, 10, 20]

    for name in ("step-000030", "step-000040"):
        (later / name).rename(ckpts / name)
    with open(run_dir / EVAL_RESULTS_FILE, "a") as f:
        f.write('{"key": "step-0000')  # a torn last line from a crash mid-append
    blob = ckpts / "step-000030" / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    second = lmforge("eval", str(run_dir), "--watch", "--interval", "0.2", "--max-batches", "2")
    assert second.returncode == 0, second.stdout + second.stderr  # the run is completed: it exits
    said = second.stdout + second.stderr  # messages go through the rich console (stderr)
    assert "3 checkpoint(s) already evaluated" in said
    assert "skipping step-000030: damaged" in said and "sha256" in said
    assert "evaluated step-000040" in said
    for name in ("step-000000", "step-000010", "step-000020"):
        assert f"evaluated {name}" not in said
    assert sorted(r["step"] for r in read_results(run_dir)) == [0, 10, 20, 40]
