"""Exported GGUF files run in llama.cpp itself and agree with lmforge.

The reference runtime is llama.cpp's prebuilt CPU library as packaged by node-llama-cpp
(tests/llamacpp: pinned in package.json, installed by `scripts/setup.sh --test` with npm). For each
model, both sides decode greedily from the same token ids (no tokenizer in between) and must give
the same tokens, and llama.cpp's probability of each chosen token must be lmforge's to within a
small tolerance (2e-3 for the 30-layer model, 5e-4 for the small ones; measured differences are
about a third of that): a wrong Q/K permutation, a missing tie, a wrong RoPE table or norm epsilon
changes both.

- SmolLM2-135M-Instruct (real weights; GQA 9/3, tied): imported from its Q4_1 GGUF, exported as
  F32 and F16; the original Q4_1 file in llama.cpp agrees with the import on the first tokens
  (llama.cpp also quantizes activations there, so the two drift apart later).
- Small random models that cover what SmolLM2 does not: an untied head, Llama 3.1-style
  `llama3` RoPE scaling (exported as `rope_freqs`), no GQA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO, smollm2_gguf
from lmforge import convert
from lmforge.artifacts import load_model
from lmforge.config import ModelConfig
from lmforge.generate import generate
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

RUNNER = REPO / "tests" / "llamacpp"


def llama_cpp_greedy(gguf: Path, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    node = shutil.which("node")
    if node is None or not (RUNNER / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip("llama.cpp runner not installed (scripts/setup.sh --test runs npm install in tests/llamacpp)")
    r = subprocess.run([node, str(RUNNER / "greedy.mjs"), str(gguf), json.dumps(ids), str(n)],
                       capture_output=True, text=True, timeout=300, cwd=RUNNER)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["tokens"], out["probs"]


def lmforge_greedy(model: Transformer, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    tokens = generate(model, ids, max_tokens=n)
    with torch.no_grad():
        p = model(torch.tensor([ids + tokens]))[0].float().softmax(-1)  # (T, V)
    return tokens, [float(p[len(ids) - 1 + i, t]) for i, t in enumerate(tokens)]


def assert_agree(gguf: Path, model: Transformer, ids: list[int], n: int, tol: float) -> None:
    ours, our_p = lmforge_greedy(model, ids, n)
    theirs, their_p = llama_cpp_greedy(gguf, ids, n)
    assert theirs == ours
    assert their_p == pytest.approx(our_p, abs=tol)


# ---- a real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    loaded = load_model(smollm2_dir, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    return smollm2_gguf(), smollm2_dir, model, tok


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_export_runs_in_llama_cpp_like_in_lmforge(smol, tmp_path, dtype) -> None:
    _, model_dir, model, tok = smol
    gguf = tmp_path / f"smol-{dtype}.gguf"
    convert.export_command(str(model_dir), "gguf", str(gguf), dtype=dtype)
    ids = tok.encode("The capital of France is")
    assert_agree(gguf, model, ids, 24, tol=2e-3)  # measured: 8e-4 (F32), 1e-3 (F16) over 30 layers


@pytest.mark.slow
def test_smollm2_original_q4_file_starts_like_the_import(smol) -> None:
    source, _, model, tok = smol
    ids = tok.encode("The capital of France is")
    theirs, _ = llama_cpp_greedy(source, ids, 2)
    ours, _ = lmforge_greedy(model, ids, 2)
    assert theirs == ours and tok.decode(ours) == " Paris."


# ---- shapes SmolLM2 does not have --------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    dict(tie_embeddings=False),
    dict(n_kv_head=0, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32, rope_theta=500000.0),
])
def test_random_model_exports_run_in_llama_cpp_like_in_lmforge(tiny_dataset, tmp_path, variant) -> None:
    tok = Tokenizer.load(tiny_dataset / "tokenizer.json")
    cfg = replace(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                              max_seq_len=128, init_std=0.1), **variant)  # 5x the usual init: clear argmaxes
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    gguf = convert.write_gguf(convert.bundle_from_model(model, tok), tmp_path / "m.gguf")
    ids = tok.encode("ROMEO:\nBut soft, what light")
    assert_agree(gguf, model, ids, 40, tol=5e-4)  # measured <= 1.5e-4; 16 + 40 positions > rope_original_max_len
