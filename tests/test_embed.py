"""Embeddings (lmforge/understand/embed.py): pooling golden values, padding invariance,
determinism, bidirectional attention, prefixes, the fingerprint, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import artifacts, convert
from lmforge.config import EmbedConfig, ModelConfig, load_config
from lmforge.errors import ConfigError, DataError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.understand.embed import BATCH_TOKENS_CPU, Embedder, Pooling, fingerprint_mismatch, plan_batches, pool

TEXTS = ["def add(a, b): return a + b", "Return the sum of two numbers.", "hello", "a much longer text " * 6,
         "café 東京 123"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS * 3, vocab_size=300, min_frequency=1)


def tiny_model_dir(tok: Tokenizer, root: Path, embed: EmbedConfig | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    max_seq_len=64))
    return artifacts.write_model_dir(convert.bundle_from_model(model, tok, embed=embed), root / f"m{seed}")


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    return tiny_model_dir(tok, tmp_path_factory.mktemp("embed"))


@pytest.fixture(scope="module")
def embedder(model_dir) -> Embedder:
    return Embedder.load(model_dir, device="cpu", dtype="fp32")


# ---- pooling: golden values --------------------------------------------------------------------


def test_pool_golden_values() -> None:
    # one row of 3 real tokens then 1 padding token, C = 2; another row of 1 real token
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [100.0, 100.0]],
                      [[7.0, -1.0], [50.0, 50.0], [50.0, 50.0], [50.0, 50.0]]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert pool(h, mask, "mean").tolist() == [[3.0, 5.0], [7.0, -1.0]]
    assert pool(h, mask, "last").tolist() == [[5.0, 9.0], [7.0, -1.0]]
    # weights 1, 2, 3 over the real tokens: (1*1 + 2*3 + 3*5) / 6, (1*2 + 2*4 + 3*9) / 6
    assert torch.allclose(pool(h, mask, "weighted_mean"), torch.tensor([[22 / 6, 37 / 6], [7.0, -1.0]]))
    with pytest.raises(ConfigError, match="pooling method must be one of"):
        pool(h, mask, "max")


def test_vectors_are_pooled_hidden_states(embedder: Embedder) -> None:
    ids = embedder.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        hidden = embedder.model.hidden_states(torch.tensor([ids]))[0]  # (T, C)
        logits = embedder.model(torch.tensor([ids]))[0]
    assert torch.equal(embedder.model.lm_head(hidden), logits)  # hidden_states is what lm_head reads
    expected = {"mean": hidden.mean(0), "last": hidden[-1],
                "weighted_mean": (hidden * torch.arange(1, len(ids) + 1)[:, None]).sum(0) * 2 / (len(ids) * (len(ids) + 1))}
    for method, want in expected.items():
        raw = Embedder(embedder.loaded, Pooling(method, normalize=False), dtype="fp32").embed([TEXTS[0]])[0]
        assert np.allclose(raw, want.numpy(), atol=1e-5), method
        unit = Embedder(embedder.loaded, Pooling(method), dtype="fp32").embed([TEXTS[0]])[0]
        assert np.allclose(unit, (want / want.norm()).numpy(), atol=1e-6) and abs(np.linalg.norm(unit) - 1) < 1e-6


# ---- padding, order, determinism ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean", "last", "weighted_mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_text_alone_equals_the_same_text_in_a_padded_batch(embedder, method, bidirectional) -> None:
    e = Embedder(embedder.loaded, Pooling(method, bidirectional=bidirectional), batch_size=len(TEXTS), dtype="fp32")
    batch = e.embed(TEXTS)  # one batch, padded to the longest text
    alone = np.stack([e.embed([t])[0] for t in TEXTS])
    assert np.abs(batch - alone).max() < 1e-5


def test_output_is_in_input_order_and_deterministic(embedder) -> None:
    e = Embedder(embedder.loaded, batch_size=2)  # several batches, sorted by length inside
    a = e.embed(TEXTS)
    assert np.array_equal(a, e.embed(TEXTS))  # bit for bit
    rev = e.embed(TEXTS[::-1])
    assert np.abs(rev[::-1] - a).max() < 1e-5
    assert a.dtype == np.float32 and a.shape == (len(TEXTS), 32)
    assert len({v.tobytes() for v in a}) == len(TEXTS)  # different texts, different vectors


@pytest.mark.parametrize("lengths, batch_size, batch_tokens, want", [
    ([5, 4, 3, 2, 1], 2, 0, [(0, 2), (2, 4), (4, 5)]),  # no token budget: batch_size texts each
    ([5, 4, 3, 2, 1], 32, 10, [(0, 2), (2, 5)]),  # 2 x 5 padded tokens fit 10; then 3 x 3 = 9 (the rest)
    ([300, 100, 100, 100, 100], 32, 256, [(0, 1), (1, 3), (3, 5)]),  # a text longer than the budget is alone
    ([10] * 7, 3, 1000, [(0, 3), (3, 6), (6, 7)]),  # batch_size still caps a batch
    ([], 4, 100, []),
])
def test_plan_batches_table(lengths, batch_size, batch_tokens, want) -> None:
    assert plan_batches(lengths, batch_size, batch_tokens) == want


def test_a_cpu_batch_holds_at_most_the_token_budget_and_the_vectors_do_not_change(embedder) -> None:
    assert embedder.batch_tokens == BATCH_TOKENS_CPU  # the default on a CPU
    seen: list[tuple[int, int]] = []
    e = Embedder(embedder.loaded, batch_size=len(TEXTS), batch_tokens=12)
    forward = e._forward
    e._forward = lambda idx, attn, lengths: (seen.append(tuple(idx.shape)), forward(idx, attn, lengths))[1]  # type: ignore[method-assign]
    budgeted = e.embed(TEXTS)
    assert len(seen) > 1 and all(b == 1 or b * t <= 12 for b, t in seen)
    whole = Embedder(embedder.loaded, batch_size=len(TEXTS), batch_tokens=0).embed(TEXTS)  # one batch
    assert np.abs(budgeted - whole).max() < 1e-5
    with pytest.raises(ConfigError, match="batch_tokens must be >= 0"):
        Embedder(embedder.loaded, batch_tokens=-1)


def test_a_failed_compile_warns_once_and_embeds_eagerly(model_dir, embedder, monkeypatch, capsys) -> None:
    def broken(fn, **kwargs):  # what a machine without a C++ compiler gives at the first compiled call
        def call(*args, **kw):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\ng++: not found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    e = Embedder.load(model_dir, device="cpu", dtype="fp32", batch_size=2, compile=True)
    got = e.embed(TEXTS)
    err = capsys.readouterr().err
    assert err.count("torch.compile could not build") == 1 and "RuntimeError" in err and "without --compile" in err
    assert not e.compiled and all("forward" not in vars(b) for b in e.model.model.layers)  # eager from then on
    assert np.abs(got - Embedder(embedder.loaded, batch_size=2, dtype="fp32").embed(TEXTS)).max() < 1e-6


def test_bidirectional_attention_lets_early_tokens_see_later_ones(embedder) -> None:
    causal = Embedder(embedder.loaded, Pooling("mean"))
    both = Embedder(embedder.loaded, Pooling("mean", bidirectional=True))
    ids_a, ids_b = [5, 6, 7, 8], [5, 6, 7, 9]  # differ only in the last token
    with torch.no_grad():
        h_causal = [causal.model.hidden_states(torch.tensor([ids]))[0, 0] for ids in (ids_a, ids_b)]
        full = torch.ones(1, 4, 4, dtype=torch.bool)
        h_both = [both.model.hidden_states(torch.tensor([ids]), attn_mask=full)[0, 0] for ids in (ids_a, ids_b)]
    assert torch.equal(h_causal[0], h_causal[1])  # causal: token 0 never sees token 3
    assert not torch.allclose(h_both[0], h_both[1])
    assert not np.allclose(causal.embed_ids([ids_a]), both.embed_ids([ids_a]))


def test_long_texts_are_cut_to_max_len(embedder) -> None:
    e = Embedder(embedder.loaded, max_len=4)
    ids = embedder.tokenizer.encode(TEXTS[3])
    assert len(ids) > 4
    assert np.array_equal(e.embed([TEXTS[3]]), e.embed_ids([ids[:4]]))
    with pytest.raises(ConfigError, match="max_len must be within 1..64"):
        Embedder(embedder.loaded, max_len=65)


def test_prefixes_follow_the_kind(embedder) -> None:
    e = Embedder(embedder.loaded, Pooling("mean", query_prefix="query: ", document_prefix="passage: "))
    q, d = e.embed(["hello"], kind="query"), e.embed(["hello"], kind="document")
    assert np.array_equal(q, e.embed_ids([e.tokenizer.encode("query: hello")]))
    assert np.array_equal(d, e.embed_ids([e.tokenizer.encode("passage: hello")]))
    with pytest.raises(ConfigError, match="kind must be one of document, query"):
        e.embed(["hello"], kind="passage")  # type: ignore[arg-type]


# ---- pooling recorded with the model -----------------------------------------------------------


def test_the_pooling_comes_from_the_models_config(tok, tmp_path) -> None:
    embed = EmbedConfig(pooling="last", normalize=False, query_prefix="q: ")
    e = Embedder.load(tiny_model_dir(tok, tmp_path, embed), device="cpu")
    assert e.pooling == Pooling("last", False, False, "q: ", "")
    assert Pooling.from_dict(e.pooling.to_dict()) == e.pooling
    cfg = load_config(None, ["embed.pooling=weighted_mean", "embed.bidirectional=true"])
    assert Pooling.from_config(cfg.embed) == Pooling("weighted_mean", True, True)
    with pytest.raises(ConfigError, match="embed.pooling must be one of mean, last, weighted_mean; got 'cls'"):
        load_config(None, ["embed.pooling=cls"])
    with pytest.raises(ConfigError, match="unknown key"):
        Pooling.from_dict({"method": "mean", "pooler": "x"})


def test_fingerprint_names_model_tokenizer_pooling_and_dim(embedder, tok, tmp_path) -> None:
    fp = embedder.fingerprint()
    assert fp == {"model_sha256": embedder.loaded.origin.model_sha256, "tokenizer_sha256": tok.sha256,
                  "pooling": Pooling().to_dict(), "dim": 32}
    assert fingerprint_mismatch(fp, Embedder.load(embedder.loaded.origin.path, device="cpu").fingerprint()) is None
    other = Embedder.load(tiny_model_dir(tok, tmp_path, seed=1), device="cpu").fingerprint()
    assert "model sha256" in fingerprint_mismatch(fp, other)
    last = Embedder(embedder.loaded, Pooling("last")).fingerprint()
    assert fingerprint_mismatch(fp, last) == "pooling.method 'last' here, 'weighted_mean' recorded"


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors(embedder, tmp_path) -> None:
    with pytest.raises(DataError, match="text 1 is empty"):
        embedder.embed(["fine", ""])
    with pytest.raises(DataError, match="input 0 has no tokens"):
        embedder.embed_ids([[]])
    with pytest.raises(DataError, match=r"input 1: token ids must be integers within 0..\d+"):
        embedder.embed_ids([[1, 2], [1, 10**6]])
    assert embedder.embed([]).shape == (0, 32)
    with pytest.raises(Exception, match="no such run, checkpoint or model directory"):
        Embedder.load(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="embedding dtype must be one of auto, fp32, bf16"):
        Embedder(embedder.loaded, dtype="fp16")


# ---- lmforge embed -----------------------------------------------------------------------------


def test_embed_command_reads_lines_jsonl_and_directories(model_dir, embedder, tmp_path, capsys) -> None:
    from lmforge.cli import main

    (tmp_path / "a.txt").write_text("first line\n\nsecond line\r\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"id": "x1", "body": "json text"}\n{"body": "no id"}\n{"id": 3, "body": ""}\n')
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.md").write_text("a whole file\nis one text\n", encoding="utf-8")
    (docs / "sub" / "bin.dat").write_bytes(b"\xff\xfe not utf-8")
    (docs / ".hidden").write_text("skipped", encoding="utf-8")
    out = tmp_path / "out" / "emb.npy"
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(docs)]
    assert main(["embed", str(model_dir), *inputs, "--out", str(out), "--text-field", "body", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "2 empty skipped; 1 non-UTF-8 file(s) skipped" in captured.out and "bin.dat" in captured.err
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / "emb.ids.jsonl").read_text().splitlines()]
    assert ids == [f"{tmp_path}/a.txt:1", f"{tmp_path}/a.txt:3", "x1", f"{tmp_path}/b.jsonl:2", f"{docs}/one.md"]
    vectors = np.load(out)
    # the verb computes in the machine's own precision (bf16 where it is native: `hardware.auto_dtype`)
    want = Embedder(embedder.loaded).embed(["first line", "second line", "json text", "no id", "a whole file\nis one text\n"])
    assert vectors.dtype == np.float32 and np.abs(vectors - want).max() < 1e-5
    half = tmp_path / "half.npy"
    assert main(["embed", str(model_dir), str(tmp_path / "a.txt"), "--out", str(half), "--dtype", "float16"]) == 0
    assert np.load(half).dtype == np.float16 and np.allclose(np.load(half), want[:2], atol=1e-3)
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["embed", str(model_dir), str(tmp_path / "a.txt"), "--out", str(tmp_path / "v.parquet")]) == 0
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.column("id").to_pylist() == [f"{tmp_path}/a.txt:1", f"{tmp_path}/a.txt:3"]
    assert np.allclose(np.array(table.column("embedding").to_pylist()), want[:2], atol=1e-6)


def test_embed_compile_gives_the_eager_vectors(model_dir, embedder, tmp_path, capsys) -> None:
    """`lmforge embed --compile`: the blocks run through torch.compile (inductor's C++ kernels where
    a compiler is installed) and the vectors equal the eager ones up to float rounding."""
    from lmforge.cli import main

    (tmp_path / "a.txt").write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "c.npy"
    assert main(["embed", str(model_dir), str(tmp_path / "a.txt"), "--out", str(out), "--compile", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert ", compiled)" in captured.err  # the "embedding N texts ..." line (console, stderr)
    # where inductor cannot build kernels (no C++ toolchain), the one-line fallback is taken instead
    assert "torch.compile could not build" not in captured.err or captured.err.count("without --compile") == 1
    auto = Embedder(embedder.loaded)  # the verb's precision: fp32, or bf16 where it is native (`hardware.auto_dtype`)
    want = auto.embed(TEXTS)
    # fused kernels round in another order; in bf16 that moves a unit vector's entries by up to ~1e-2
    assert np.abs(np.load(out) - want).max() < (1e-5 if auto.dtype == "fp32" else 2e-2)


@pytest.mark.parametrize("args, message", [
    (["{model}", "{empty}", "--out", "{out}"], "no text to embed in"),
    (["{model}", "{bad}", "--out", "{out}", "--strict"], "not UTF-8 (byte 0) (--strict: every input must be UTF-8 text)"),
    (["{text}", "{text}", "--out", "{out}"], "is a file; expected a run, checkpoint or model directory"),
    (["{root}", "{text}", "--out", "{out}"], "is not a run, checkpoint or model directory"),
    (["{model}", "{text}", "--out", "{root}/v.csv"], "name a .npy file"),
    (["{model}", "{root}/missing.txt", "--out", "{out}"], "input not found"),
])
def test_embed_command_bad_input_is_one_line_exit_2(model_dir, tmp_path, capsys, args, message) -> None:
    from lmforge.cli import main

    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "t.txt").write_text("hello\n", encoding="utf-8")
    names = {"model": model_dir, "empty": tmp_path / "empty.txt", "bad": tmp_path / "bad.txt", "text": tmp_path / "t.txt",
             "out": tmp_path / "o.npy", "root": tmp_path}
    assert main(["embed", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.npy").exists()


def test_embed_refuses_to_overwrite_without_the_flag(model_dir, tmp_path, capsys) -> None:
    from lmforge.cli import main

    (tmp_path / "t.txt").write_text("hello\n", encoding="utf-8")
    out = tmp_path / "o.npy"
    assert main(["embed", str(model_dir), str(tmp_path / "t.txt"), "--out", str(out)]) == 0
    assert main(["embed", str(model_dir), str(tmp_path / "t.txt"), "--out", str(out)]) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["embed", str(model_dir), str(tmp_path / "t.txt"), "--out", str(out), "--overwrite", "--kind", "query"]) == 0
