"""Embeddings leave lmforge intact: `export --format hf` writes a sentence-transformers layout that
the real library loads and embeds with as lmforge does (each pooling, prefixes as prompts), GGUF
records llama.cpp's pooling_type, and both import back with the same embed section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import artifacts, convert
from lmforge.config import EmbedConfig, ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.understand.embed import Embedder



def sentence_transformers():
    """The library, imported by the tests that use it (skips without it): importing it at module level
    cost every pytest worker ~4.5 s of collection, whatever tests it ran."""
    return pytest.importorskip("sentence_transformers", reason="sentence-transformers is in the test extra")

# No text here spells a special token ("<|eos|>"): lmforge encodes such text as plain text, while a
# Hugging Face tokenizer reads it as the control token (docs/embeddings.md).
TEXTS = ["def add(a, b): return a + b", "Return the sum of two numbers.", "x", "a much longer text " * 5,
         "café 東京 123\n\tindented"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS * 3, vocab_size=300, min_frequency=1)


def model_dir(tok: Tokenizer, root: Path, embed: EmbedConfig) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64))
    with torch.no_grad():  # norms away from 1 so a missing final norm would show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return artifacts.write_model_dir(convert.bundle_from_model(model, tok, embed=embed), root / "m")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("last", True), ("weighted_mean", False)])
def test_sentence_transformers_loads_the_export_and_gives_our_vectors(tok, tmp_path, pooling, normalize) -> None:
    embed = EmbedConfig(pooling=pooling, normalize=normalize, query_prefix="query: ", document_prefix="passage: ")
    src = model_dir(tok, tmp_path, embed)
    out = tmp_path / "hf"
    assert convert.export_command(str(src), "hf", str(out)) == 0
    pool_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert [k for k, v in pool_cfg.items() if v is True and k.startswith("pooling_mode")] == [convert.ST_POOLING[pooling]]
    assert (out / "2_Normalize").is_dir() == normalize
    model = sentence_transformers().SentenceTransformer(str(out), device="cpu")
    ours = Embedder.load(src, device="cpu", dtype="fp32")  # sentence-transformers computes in fp32
    for kind in ("query", "document"):
        want = ours.embed(TEXTS, kind=kind)
        got = model.encode(TEXTS, prompt_name=kind, batch_size=3, convert_to_numpy=True)  # padded batches
        assert cosines(want, got).min() >= 0.9999, (kind, cosines(want, got))
        assert np.allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=1e-4)
    # and back: importing the export restores the embed section
    assert convert.read_hf_dir(out).embed == embed


def test_a_bidirectional_model_exports_without_the_layout_and_says_so(tok, tmp_path, capsys) -> None:
    src = model_dir(tok, tmp_path, EmbedConfig(bidirectional=True))
    convert.export_command(str(src), "hf", str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "modules.json").exists() and (tmp_path / "hf" / "config.json").is_file()
    err = " ".join(capsys.readouterr().err.split())
    assert "embed.bidirectional is true" in err and "no sentence-transformers files were written" in err


def test_an_unsupported_sentence_transformers_pooling_is_refused(tok, tmp_path) -> None:
    out = convert.write_hf_dir(artifacts.read_bundle(model_dir(tok, tmp_path, EmbedConfig())), tmp_path / "hf")
    cfg_path = out / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="has no lmforge equivalent"):
        convert.read_hf_dir(out)


@pytest.mark.parametrize("pooling, enum", [("mean", 1), ("last", 3), ("weighted_mean", None)])
def test_gguf_records_llama_cpp_pooling_type_and_round_trips(tok, tmp_path, pooling, enum) -> None:
    import gguf

    embed = EmbedConfig(pooling=pooling, normalize=False, query_prefix="q: ")
    out = tmp_path / "m.gguf"
    convert.write_gguf(artifacts.read_bundle(model_dir(tok, tmp_path, embed)), out)
    fields = gguf.GGUFReader(str(out)).fields
    assert (fields["llama.pooling_type"].contents() if "llama.pooling_type" in fields else None) == enum
    assert convert.read_gguf(out).embed == embed
