"""LoRA (lmforge/lora.py): only the adapter trains; checkpoints hold the adapter and its optimizer
state and record the base by checksum (a resume or load on another base is refused naming both);
resume is bit-exact; load_model gives base + adapter; the PEFT export loads in the real `peft` on
our Hugging Face export and gives our logits; --merge folds it in; many adapters are served on one
base, batched together in one forward (a test that fails if they run one at a time), each answering
like `generate` with that adapter; and SmolLM2-135M-Instruct learns the bundled support desk.

The base is a random-initialised tiny Llama with the ChatML test tokenizer (tests/conftest.py); a
large init_std and an untied head make its greedy output depend on the whole context, and the
synthetic adapters (random A and B) change it, so a wrong row's adapter changes the tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CHATML
from lmforge import artifacts
from lmforge.artifacts import load_model, resolve_origin, write_adapter_dir, write_model_dir
from lmforge.config import LoraConfig, ModelConfig
from lmforge.convert import bundle_from_model, export_command
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.generate import generate
from lmforge.lora import (adapted, adapter_tensors, adapters_disabled, attach, merge)
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.start import StartRequest, train_command

FACTS = {"eos_token": "<|im_end|>", "chat_template": CHATML}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_base(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=256,
                      tie_embeddings=False, init_std=0.3)
    return write_model_dir(bundle_from_model(Transformer(cfg), tok, FACTS), out)


def make_adapter(base: Path, out: Path, seed: int, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                 alpha: float = 8.0) -> Path:
    """A synthetic adapter: random A and B (a trained one starts with B = 0), on `base`."""
    loaded = load_model(base, device="cpu")
    cfg = LoraConfig(rank=rank, alpha=alpha, target_modules=list(targets))
    attach(loaded.model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted(loaded.model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return write_adapter_dir(out, adapter_tensors(loaded.model), cfg, loaded.origin)


@pytest.fixture(scope="module")
def base(chat_tokenizer_dir: Path, tmp_path_factory) -> Path:
    return make_base(chat_tokenizer_dir, tmp_path_factory.mktemp("lora") / "base")


def lora_overrides(base: Path, data: Path, *extra: str) -> tuple[str, ...]:
    return (f"init.from={base}", f"data.path={data}", "data.seq_len=128", "train.dtype=fp32", "train.threads=1",
            "lora.rank=4", "train.eval_every=0", "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=0",
            "train.lr=3e-3", "guard.enabled=false", *extra)


@pytest.fixture(scope="module")
def lora_run(base: Path, tiny_sft_dataset: Path, tmp_path_factory) -> Path:
    """sft-lora-cpu for 6 steps on the arithmetic chats, checkpoints at 3 and 6."""
    rd = tmp_path_factory.mktemp("lorarun") / "run"
    code = train_command(StartRequest(config="sft-lora-cpu", run_dir=str(rd), overrides=lora_overrides(
        base, tiny_sft_dataset, "train.max_steps=6", "train.ckpt_every_steps=3", "train.keep_last=2")))
    assert code == 0
    return rd


# ---- the module --------------------------------------------------------------------------------------------


def test_an_adapter_starts_at_the_base_trains_alone_and_merges_exactly(base: Path) -> None:
    loaded = load_model(base, device="cpu")
    model = loaded.model
    x = torch.tensor([[3, 17, 40, 2, 99, 5]])
    with torch.no_grad():
        before = model(x)
    names = attach(model, LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "up_proj"]))
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")  # the base is frozen
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # base names unchanged
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0: exactly the base
        for m in adapted(model).values():
            m.lora_B.weight.normal_(0, 0.5)
        after = model(x)
        with adapters_disabled(model):
            assert torch.equal(model(x), before)  # DPO's reference: the base, no second copy
        assert torch.equal(model(x), after) and (after - before).abs().max() > 0.1
    cfg = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "up_proj"])
    merged = Transformer(loaded.config.model)
    merged.load_state_dict(merge({k: v for k, v in model.state_dict().items() if "lora_" not in k}, cfg, adapter_tensors(model)))
    with torch.no_grad():
        assert torch.allclose(merged(x), after, atol=1e-4)  # W + (alpha / r) B A


# ---- training and checkpoints ---------------------------------------------------------------------------------


def test_a_lora_checkpoint_holds_the_adapter_and_records_its_base(lora_run: Path, base: Path) -> None:
    ckpt = artifacts.checkpoints_dir(lora_run) / "step-000006"
    m = artifacts.read_manifest(ckpt)
    assert m.base == {"sha256": artifacts.read_manifest(base).sha256("model.safetensors"), "path": str(base.resolve())}
    assert artifacts.MODEL_FILE not in m.files and {artifacts.ADAPTER_FILE, artifacts.ADAPTER_CONFIG} <= set(m.files)
    assert artifacts.verify_checkpoint(ckpt) == []
    config = json.loads((ckpt / artifacts.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 32
    adapter = artifacts.load_safetensors(ckpt / artifacts.ADAPTER_FILE)
    n_adapter = sum(t.numel() for t in adapter.values())
    assert 0 < n_adapter < load_model(base).model.cfg.d_model * 400  # a few % of the base's ~130k weights
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(ckpt / "train_state")).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # the training state: the adapter, not the base
    values = sum(m.size.numel() for m in stored.values() if hasattr(m, "size"))
    assert values <= 3 * n_adapter + 2 * len(adapter)  # the adapter and its two AdamW moments (and step counters)


def test_the_training_state_of_a_tied_model_holds_the_adapter_alone() -> None:
    """A tied head is one frozen Parameter under two names: neither is training state."""
    from lmforge.train.checkpoint import training_state

    model = Transformer(ModelConfig(vocab_size=300, n_layer=1, n_head=4, d_model=64, tie_embeddings=True))
    attach(model, LoraConfig(rank=2, target_modules=["v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model_sd, _ = training_state(model, opt)
    assert sorted(model_sd) == ["model.layers.0.self_attn.v_proj.lora_A.weight", "model.layers.0.self_attn.v_proj.lora_B.weight"]


def test_load_model_gives_the_base_with_the_adapter(lora_run: Path, base: Path) -> None:
    loaded = load_model(lora_run, device="cpu")
    assert loaded.origin.is_adapter and loaded.base is not None and loaded.base.path == base
    assert loaded.config.lora.rank == 4 and "LoRA adapter on" in loaded.origin.describe()
    x = torch.tensor([[3, 17, 40, 2, 99, 5]])
    plain = load_model(base, device="cpu").model
    with torch.no_grad():
        tuned = loaded.model(x)
        assert (tuned - plain(x)).abs().max() > 1e-3  # six steps moved it
        with adapters_disabled(loaded.model):
            assert torch.equal(loaded.model(x), plain(x))


def test_lora_resume_is_bit_exact(base: Path, tiny_sft_dataset: Path, tmp_path: Path) -> None:
    def run(rd: Path, steps: int) -> None:
        assert train_command(StartRequest(config="sft-lora-cpu", run_dir=str(rd), overrides=lora_overrides(
            base, tiny_sft_dataset, "train.max_steps=4", f"train.ckpt_every_steps={steps}", "lora.dropout=0.1", "train.schedule=constant"))) == 0

    run(tmp_path / "straight", 4)
    (tmp_path / "resumed").mkdir()
    assert train_command(StartRequest(config="sft-lora-cpu", run_dir=str(tmp_path / "resumed"), overrides=lora_overrides(
        base, tiny_sft_dataset, "train.max_steps=2", "train.ckpt_every_steps=2", "lora.dropout=0.1", "train.schedule=constant"))) == 0
    run(tmp_path / "resumed", 2)  # resumes at step 2 (max_steps may grow on resume; a constant lr does not depend on it)
    a = artifacts.load_safetensors(artifacts.checkpoints_dir(tmp_path / "straight") / "step-000004" / artifacts.ADAPTER_FILE)
    b = artifacts.load_safetensors(artifacts.checkpoints_dir(tmp_path / "resumed") / "step-000004" / artifacts.ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_base_is_refused_naming_both_checksums(lora_run: Path, base: Path, chat_tokenizer_dir: Path,
                                                       tiny_sft_dataset: Path, tmp_path: Path) -> None:
    other = make_base(chat_tokenizer_dir, tmp_path / "other", seed=1)
    mine, theirs = artifacts.read_manifest(base).sha256("model.safetensors"), artifacts.read_manifest(other).sha256("model.safetensors")
    rd = tmp_path / "run"
    shutil.copytree(lora_run, rd)
    with pytest.raises(CheckpointError, match=f"sha256 {mine}.*sha256 {theirs}"):  # resume on another base
        train_command(StartRequest(run_dir=str(rd), overrides=(f"init.from={other}", "train.max_steps=8")))
    moved = tmp_path / "moved-run"
    shutil.copytree(lora_run, moved)
    shutil.move(str(base), tmp_path / "base-away")  # the recorded base path now holds another model
    try:
        shutil.copytree(other, base)
        with pytest.raises(CheckpointError, match=f"trained on the base model with sha256 {mine}, but .* has sha256 {theirs}"):
            load_model(moved)
    finally:
        shutil.rmtree(base)
        shutil.move(str(tmp_path / "base-away"), base)
    assert load_model(moved).base.model_sha256 == mine
    with pytest.raises(ConfigError, match="init.from is empty"):
        train_command(StartRequest(config="sft-lora-cpu", run_dir=str(tmp_path / "nobase"),
                                   overrides=(f"data.path={tiny_sft_dataset}", "data.seq_len=128")))


def test_init_from_a_lora_run_continues_its_adapter_or_starts_from_it_merged(lora_run: Path, tiny_sft_dataset: Path,
                                                                               tmp_path: Path) -> None:
    from lmforge.config import load_config
    from lmforge.train.loop import build
    from lmforge.train.start import resolve_config

    x = torch.tensor([[3, 17, 40, 2, 99, 5]])
    with torch.no_grad():
        expected = load_model(lora_run, device="cpu").model(x)

    def built(*extra: str):
        cfg = resolve_config(load_config("sft-lora-cpu", [f"init.from={lora_run}", f"data.path={tiny_sft_dataset}",
                                                          "data.seq_len=128", "train.dtype=fp32", *extra]))
        return build(cfg, tmp_path / f"run{len(list(tmp_path.iterdir()))}")

    run = built("lora.rank=4")  # e.g. preference tuning after a LoRA SFT: the same adapter goes on training
    assert run.lora_base["sha256"] == load_model(lora_run).origin.base_sha256
    full = built("lora.rank=0")  # a full fine-tune starts from the adapter folded into the base
    with torch.no_grad():
        assert torch.allclose(run.model.eval()(x), expected, atol=1e-5)
        assert torch.allclose(full.model.eval()(x), expected, atol=1e-4)
    with pytest.raises(ConfigError, match="is a rank-4 LoRA adapter .* this run's is rank 8"):
        built("lora.rank=8")


# ---- export ------------------------------------------------------------------------------------------------


def test_peft_export_loads_in_peft_and_gives_our_logits(lora_run: Path, base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_command(str(base), "hf", str(tmp_path / "hf"))
    export_command(str(lora_run), "peft", str(tmp_path / "adapter"))
    assert resolve_origin(tmp_path / "adapter").kind == "adapter"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours = load_model(lora_run, device="cpu").model
    x = torch.tensor([[3, 17, 40, 2, 99, 5, 61, 8]])
    with torch.no_grad():
        expected = ours(x)
        assert torch.allclose(peft_model(x).logits, expected, atol=1e-4)
        with peft_model.disable_adapter():
            assert (peft_model(x).logits - expected).abs().max() > 1e-3  # the adapter is what makes them equal
    export_command(str(lora_run), "hf", str(tmp_path / "merged"), merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, expected, atol=1e-4)
    export_command(str(lora_run), "gguf", str(tmp_path / "merged.gguf"), merge=True)
    from lmforge.convert import read_gguf

    weights = read_gguf(tmp_path / "merged.gguf").tensors
    model = Transformer(load_model(base).config.model)
    artifacts.load_weights(model, weights)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-4)
    # the adapter directory loads on its own (its base found by the recorded path), and serves as an adapter
    assert torch.allclose(load_model(tmp_path / "adapter", device="cpu").model(x), expected, atol=1e-6)


def test_export_says_what_a_lora_run_needs(lora_run: Path, base: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="export the adapter with --format peft, or fold it .* --merge"):
        export_command(str(lora_run), "hf", str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="no LoRA adapter to export; use --format hf or gguf"):
        export_command(str(base), "peft", str(tmp_path / "b"))
    with pytest.raises(CheckpointError, match="--merge: .* no LoRA adapter to fold in"):
        export_command(str(base), "hf", str(tmp_path / "c"), merge=True)
    assert not any((tmp_path / n).exists() for n in "abc")


# ---- many adapters on one server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(base: Path, chat_tokenizer_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Three synthetic adapters of `base` (different ranks and layers) and one of another base."""
    root = tmp_path_factory.mktemp("adapters")
    out = {"a": make_adapter(base, root / "all" / "a", seed=1),
           "b": make_adapter(base, root / "all" / "b", seed=2, rank=8, targets=("k_proj", "o_proj", "gate_proj", "up_proj")),
           "c": make_adapter(base, root / "all" / "c", seed=3, rank=2, targets=("q_proj",), alpha=16.0)}
    other = make_base(chat_tokenizer_dir, root / "other-base", seed=5)
    out["foreign"] = make_adapter(other, root / "foreign", seed=4)
    return out


def chat_ids(tok: Tokenizer, text: str) -> list[int]:
    """The prompt the server builds for one user message (the chat template, generation prompt)."""
    from lmforge.chat import ChatTemplate

    return tok.encode_template(ChatTemplate(tok, tok.chat_template).parts([{"role": "user", "content": text}]))


QUESTIONS = ["What is 12 plus 7?", "What is 3 plus 40?", "And plus 4?", "What is 99 plus 1?"]


def expected_replies(paths: list[Path], max_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens of `generate` (what `lmforge sample` runs) with each model loaded on its own."""
    out = []
    for path, question in zip(paths, QUESTIONS):
        loaded = load_model(path, device="cpu")
        tok = loaded.tokenizer
        out.append(generate(loaded.model, chat_ids(tok, question), max_tokens=max_tokens, stop_ids=list(tok.end_ids)))
    return out


def serving(base: Path, specs: list[str], capacity: int = 4, prepared: bool = False):
    """prepared: loaded as `serve` loads it (fp32 in the decoding layout; the engine then packs
    the layers that measure faster packed, lmforge/quant.py `pack_measured`)."""
    from lmforge.generate import load_for_decoding
    from lmforge.serve.adapters import open_adapters

    loaded = load_for_decoding(base) if prepared else load_model(base, device="cpu")
    return loaded, open_adapters(loaded, "base", specs, capacity)


@pytest.mark.parametrize("prepared,compiled", [(False, False), (True, False), (True, True)])
def test_requests_for_different_adapters_decode_together_and_each_equals_generate(base: Path, adapters, monkeypatch,
                                                                                   prepared: bool, compiled: bool) -> None:
    """compiled: `serve --adapter ... --compile`; the warm-up builds the graphs with an adapter
    selected too, so no request's step compiles. prepared: every layer the adapters leave plain is
    prepacked (as if oneDNN measured faster for all of them: lmforge/quant.py `pack_measured`)."""
    import torch._dynamo

    from lmforge import quant

    monkeypatch.setattr(quant, "_best_seconds", lambda form, shape, rows, call: 1.0 if form == "plain" else 0.5)

    from lmforge.generate import compile_decode
    from lmforge.quant import PackedLinear, _onednn
    from lmforge.serve.engine import Engine, Request, run_requests

    loaded, aset = serving(base, [f"{n}={adapters[n]}" for n in "abc"], prepared=prepared)
    if compiled:
        compile_decode(loaded.model)
        torch._dynamo.reset()
    tok = loaded.tokenizer
    expected = expected_replies([base, adapters["a"], adapters["b"], adapters["c"]])
    assert len({tuple(e) for e in expected}) == 4  # each adapter answers differently
    seen: list[list[int]] = []  # the adapter slot of each row, per forward
    selected = aset.selected

    def recording(slots: list[int]):
        seen.append(list(slots))
        return selected(slots)

    aset.selected = recording
    engine = Engine(loaded.model, tok, max_batch=4, adapters=aset)
    if compiled:
        with torch.inference_mode():
            engine._warm_up()  # what start() does first on the engine thread
        warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.start()
    try:
        slots = [0] + [aset.acquire(n) for n in "abc"]
        requests = [Request(chat_ids(tok, q), 12, stop_ids=tuple(tok.end_ids), adapter=s,
                            on_end=(lambda s=s: aset.release(s))) for q, s in zip(QUESTIONS, slots)]
        results = run_requests(engine, requests)
    finally:
        engine.stop()
    assert [r.tokens for r in results] == expected
    assert isinstance(loaded.model.lm_head, PackedLinear) is (prepared and _onednn())
    # one batched forward serves every adapter: the prefill (prompts sorted by length) and the first
    # decode steps hold all four rows
    assert sorted(seen[0]) == slots and max(len(set(s)) for s in seen) == 4
    assert len(seen) <= 12 + 1  # one per decode step, not one per adapter per step
    assert aset.pins == [0] * len(aset.pins)  # every request released its slot when it ended
    if compiled:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == warm  # no request's step compiled


def test_the_api_picks_the_adapter_by_model_and_lists_them(base: Path, adapters) -> None:
    from fastapi.testclient import TestClient

    from lmforge.serve.api import create_app

    loaded, aset = serving(base, [str(adapters["a"].parent)], capacity=2)  # a directory of adapters
    assert list(aset.entries) == ["a", "b", "c"]
    app = create_app(loaded.model, loaded.tokenizer, model_name="base", chat_template=loaded.tokenizer.chat_template,
                     adapters=aset)
    expected = expected_replies([base, adapters["a"], adapters["b"], adapters["c"]])
    with TestClient(app) as client:
        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "a", "b", "c"] and {m.get("parent") for m in models[1:]} == {"base"}
        for name, question, tokens in zip([None, "a", "b", "c"], QUESTIONS, expected):
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
            r = client.post("/v1/chat/completions", json=body | ({"model": name} if name else {}))
            assert r.status_code == 200, r.text
            assert r.json()["model"] == (name or "base")
            assert r.json()["choices"][0]["message"]["content"] == loaded.tokenizer.decode(tokens)
        assert aset.loads >= 3 and len(aset.loaded()) == 2  # capacity 2: the least recently used one went
        r = client.post("/v1/completions", json={"model": "legal", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 404 and "model 'legal' not found; this server has: base, a, b, c" in r.json()["error"]["message"]
        r = client.post("/v1/embeddings", json={"model": "a", "input": "hi"})
        assert r.status_code == 400 and "embeddings come from the base model" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_adapter_slots_are_lru_and_pinned_while_in_use(base: Path, adapters) -> None:
    from lmforge.lora import AdaptersBusy

    _, aset = serving(base, [f"{n}={adapters[n]}" for n in "ab"], capacity=1)
    a = aset.acquire("a")
    with pytest.raises(AdaptersBusy, match="all 1 adapter slots are held"):
        aset.acquire("b")  # a is pinned by a request in flight
    aset.release(a)
    assert aset.acquire("b") == a and aset.loaded() == ["b"] and aset.loads == 2
    aset.release(a)
    assert aset.acquire("b") == a and aset.loads == 2  # still loaded: no reload


def test_a_finished_request_frees_its_adapter_slot_before_its_client_hears_the_end(base: Path, adapters) -> None:
    """A client that sends its next request (for another adapter) the moment it reads the end of
    the last must find the slot free: the engine releases it before the Finished event reaches the
    client's sink, and still delivers the event when the release fails."""
    from lmforge.serve.engine import Finished, Request, _deliver

    _, aset = serving(base, [f"{n}={adapters[n]}" for n in "ab"], capacity=1)
    slot = aset.acquire("a")
    seen: list[object] = []

    def sink(event) -> None:  # the client: reads the end, asks for adapter b at once
        seen.append(event)
        seen.append(aset.acquire("b"))

    req = Request([1, 2], 1, sink=sink, adapter=slot, on_end=lambda: aset.release(slot))
    _deliver(req, Finished("stop"))
    assert seen == [Finished("stop"), slot] and req.on_end is None and aset.loaded() == ["b"]

    def broken_release() -> None:
        raise RuntimeError("release failed")

    heard: list[object] = []
    _deliver(Request([1], 1, sink=heard.append, on_end=broken_release), Finished("length"))  # logged, not raised
    assert heard == [Finished("length")]  # the client hears its end all the same


def test_serving_refuses_wrong_adapters_naming_them(base: Path, adapters, lora_run: Path) -> None:
    from lmforge.serve.adapters import parse_specs

    mine = artifacts.read_manifest(base).sha256("model.safetensors")
    theirs = artifacts.read_manifest(adapters["foreign"]).base["sha256"]
    with pytest.raises(CheckpointError, match=f"trained on the base model with sha256 {theirs}, but .* has sha256 {mine}"):
        serving(base, [f"x={adapters['foreign']}"])
    with pytest.raises(LmforgeError, match="'base' is the base model's name"):
        serving(base, [f"base={adapters['a']}"])
    with pytest.raises(LmforgeError, match="the name 'a' is given twice"):
        serving(base, [f"a={adapters['a']}", f"a={adapters['b']}"])
    with pytest.raises(LmforgeError, match="not a LoRA adapter"):
        serving(base, [f"x={base}"])
    with pytest.raises(LmforgeError, match="expected NAME=PATH"):
        parse_specs(["=x"])
    _, aset = serving(base, [f"support={lora_run}"])  # a LoRA run serves as an adapter too
    assert aset.entries["support"].cfg.rank == 4


def test_a_real_server_serves_two_adapters_like_lmforge_sample(base: Path, adapters, lora_run: Path) -> None:
    import socket
    import subprocess
    import time

    import httpx

    from conftest import lmforge_cmd, subprocess_env

    proc = subprocess.Popen(lmforge_cmd("serve", str(base), "--port", "0", "--threads", "1", "--adapter", f"a={adapters['a']}",
                                        "--adapter", f"support={lora_run}", "--max-adapters", "2"),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while not line.startswith("serving ") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("lmforge serve exited")
        url = line.split(" at ", 1)[1].split()[0]
        assert "2 LoRA adapter(s): a, support" in line
        socket.create_connection(tuple(url.split("//")[1].split("/")[0].split(":")), timeout=10).close()
        for name, path in (("a", adapters["a"]), ("support", lora_run)):
            out = subprocess.run(lmforge_cmd("sample", str(path), "--prompt", "What is 5 plus", "--max-tokens", "10",
                                             "--temperature", "0"), capture_output=True, text=True, env=subprocess_env(),
                                 timeout=120)
            assert out.returncode == 0, out.stderr
            r = httpx.post(url + "/completions", timeout=60,
                           json={"model": name, "prompt": "What is 5 plus", "max_tokens": 10, "temperature": 0})
            assert out.stdout.split("\n", 1)[1] == "What is 5 plus" + r.json()["choices"][0]["text"] + "\n"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- SmolLM2-135M-Instruct --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_sft_of_smollm2_lowers_held_out_loss_and_peft_gives_our_logits(smollm2_dir: Path, tmp_path: Path) -> None:
    """A LoRA (rank 16, every block layer) on the bundled support desk: a few steps lower the loss on
    held-out answers; its PEFT export, loaded by `peft` on our Hugging Face export of the base, gives
    our logits. Short rows, one thread: ~1 minute of CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmforge.config import load_config
    from lmforge.data.sft import prepare_sft
    from lmforge.train.loop import build, save, split_micro, train_step, val_batches
    from lmforge.train.objectives import validation_loss
    from lmforge.train.start import resolve_config

    data = prepare_sft(["support-chat"], tmp_path / "support", tokenizer=smollm2_dir, val_fraction=0.05, workers=1)
    cfg = resolve_config(load_config("sft-lora-cpu", [f"init.from={smollm2_dir}", f"data.path={data}", "data.seq_len=128",
                                                      "train.global_batch=2", "train.micro_batch=2", "train.dtype=fp32",
                                                      "train.threads=1", "train.lr=2e-3", "train.warmup_steps=0",
                                                      "lora.dropout=0"]))
    run = build(cfg, tmp_path / "run")
    trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert trained == 30 * 16 * (2 * 1152 + 2 * 768 + 3 * 2112)  # rank 16 x (in + out) of every block layer: 3.6 %

    def held_out() -> float:
        return validation_loss(run.model, run.objective, val_batches(cfg, 2, 2), dtype="fp32")

    before = held_out()
    for _ in range(4):
        batch = run.loader.next()
        train_step(run.model, run.optimizer, split_micro(batch, 2, torch.device("cpu")), lr=cfg.train.lr, grad_clip=1.0,
                   dtype="fp32", objective=run.objective)
        run.step += 1
    after = held_out()
    assert after < before - 0.3, (before, after)
    ckpt = save(run)
    state = sum(f.stat().st_size for f in (ckpt / "train_state").rglob("*") if f.is_file())
    assert state < 4 * (ckpt / artifacts.ADAPTER_FILE).stat().st_size  # the adapter and its moments, not the tied embedding
    export_command(str(smollm2_dir), "hf", str(tmp_path / "hf"))
    export_command(str(tmp_path / "run"), "peft", str(tmp_path / "adapter"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32),
                                           tmp_path / "adapter").eval()
    x = torch.tensor([load_model(tmp_path / "run").tokenizer.encode("My VPN drops every hour, what do I do?")])
    with torch.no_grad():
        ours = run.model.eval()(x)
        assert torch.allclose(peft_model(x).logits, ours, atol=2e-3), (peft_model(x).logits - ours).abs().max()
