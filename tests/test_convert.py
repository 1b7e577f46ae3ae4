"""Interop on tiny random models: HF and GGUF in and out (lmforge/convert.py), init.from.

Parity is checked against `transformers` (the reference Llama implementation) through the
production converters in both directions; round trips must be bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_CONFIG, lmforge_in_process
from lmforge import artifacts, convert
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer



def hf_transformers():
    """`transformers`, imported by the tests that use it (skips without it), not at module level: a
    pytest worker collecting this module then pays for the import only if it runs such a test."""
    return pytest.importorskip("transformers", reason="transformers is in the test extra (pip install -e .[test])")


TEXTS = ["Hello world, this is a tiny corpus for a tiny tokenizer.", "Numbers 12345 and 3.14 and words again.",
         "The quick brown fox jumps over the lazy dog. " * 3]
SAMPLES = ["Hello tiny fox", "café 東京 123", "  spaced\n\ttext <|eos|>"]

SHAPES = {  # several shapes: GQA untied, plain MHA tied, GQA tied with other theta/eps
    "gqa-untied": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, tie_embeddings=False),
    "mha-tied": dict(n_layer=1, n_head=2, n_kv_head=0, d_model=32, tie_embeddings=True),
    "gqa-tied": dict(n_layer=3, n_head=6, n_kv_head=3, d_model=48, d_ff=80, rope_theta=100000.0, norm_eps=1e-6,
                     tie_embeddings=True),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300, min_frequency=1)


def tiny_model(tok: Tokenizer, seed: int = 0, **shape) -> Transformer:
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=32, **shape)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or missing norm weight shows in the logits
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(tok: Tokenizer, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tok.vocab_size, (n, 12), generator=g)


def arch(cfg: ModelConfig) -> tuple:
    """What decides the weights and the function (0 = automatic resolved), not how it was spelled."""
    return (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.d_model, cfg.ff_dim, cfg.max_seq_len,
            cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings)


def lm_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


# ---- Hugging Face -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_to_hf_matches_transformers_logits(tok, tmp_path, shape) -> None:
    model = tiny_model(tok, **SHAPES[shape])
    out = convert.write_hf_dir(convert.bundle_from_model(model, tok), tmp_path / "hf")
    hf, info = hf_transformers().AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert isinstance(hf, hf_transformers().LlamaForCausalLM)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    idx = ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, lm_logits(model, idx), rtol=1e-4, atol=1e-4)
    assert hf.config.tie_word_embeddings == model.cfg.tie_embeddings


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_from_hf_matches_transformers_logits(tok, tmp_path, shape) -> None:
    s = SHAPES[shape]
    hf_cfg = hf_transformers().LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=s["d_model"], intermediate_size=ModelConfig(**s).ff_dim,
        num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
        num_key_value_heads=s["n_kv_head"] or s["n_head"], max_position_embeddings=32,
        rms_norm_eps=s.get("norm_eps", 1e-5), rope_theta=s.get("rope_theta", 10000.0),
        tie_word_embeddings=s["tie_embeddings"],
    )
    torch.manual_seed(3)
    hf = hf_transformers().LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    out = tmp_path / "imported"
    assert convert.import_command(str(tmp_path / "src"), str(out)) == 0  # the CLI path: test_export_cli_...
    loaded = artifacts.load_model(out, device="cpu")
    model, loaded_tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    assert loaded.origin.kind == "model" and loaded_tok.sha256 == tok.sha256
    assert (cfg.model.n_kv_head or cfg.model.n_head) == hf_cfg.num_key_value_heads
    assert cfg.model.tie_embeddings == s["tie_embeddings"]
    idx = ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(model, idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_hf_round_trip_is_bit_identical(tok, tmp_path) -> None:
    for i, shape in enumerate(SHAPES.values()):
        model = tiny_model(tok, seed=i, **shape)
        bundle = convert.bundle_from_model(model, tok, {"eos_token": "<|eos|>", "chat_template": "{{ x }}"})
        back = convert.read_hf_dir(convert.write_hf_dir(bundle, tmp_path / f"hf{i}"))
        assert arch(back.cfg) == arch(model.cfg)
        assert back.tensors.keys() == bundle.tensors.keys()
        assert all(torch.equal(back.tensors[k], bundle.tensors[k]) for k in bundle.tensors)
        assert back.tokenizer.sha256 == tok.sha256
        assert back.special["chat_template"] == "{{ x }}"


def test_hf_export_tokenizer_and_generation_files(tok, tmp_path) -> None:
    out = convert.write_hf_dir(convert.bundle_from_model(tiny_model(tok, **SHAPES["mha-tied"]), tok), tmp_path / "hf")
    hf_tok = hf_transformers().AutoTokenizer.from_pretrained(out)
    for text in SAMPLES[:2]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.bos_token == "<|bos|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["bos_token_id"] == tok.bos_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_id


def hf_dir_with(tmp_path: Path, tok: Tokenizer, **changes) -> Path:
    src = tmp_path / "src"
    convert.write_hf_dir(convert.bundle_from_model(tiny_model(tok, **SHAPES["mha-tied"]), tok), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("changes,named", [
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "original_max_position_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"head_dim": 8}, "head_dim"),
])
def test_unsupported_hf_architectures_are_refused_by_field(tok, tmp_path, changes, named) -> None:
    with pytest.raises(CheckpointError, match=named):
        convert.read_hf_dir(hf_dir_with(tmp_path, tok, **changes))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_hf_import_export_matches_transformers(tok, tmp_path) -> None:
    """Llama 3.1/3.2 rope_scaling through the production converters, against transformers' own llama3 RoPE.

    head_dim 16, theta 1e4: wavelengths 2*pi*1e4^(i/8) = 6.3, 19.9, 62.8, 199, ... positions. With
    original_max_position_embeddings 64 (thresholds 64/4 = 16 and 64/1 = 64) frequency 0 is kept,
    1 and 2 are blended and 3..7 divided by 8, so all three branches run; 48 positions turn
    frequency 3 by 1.5 rad unscaled vs 0.19 rad scaled, so a wrong scaling shows in the logits.
    """
    from lmforge.model import rope_tables

    hf_cfg = hf_transformers().LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rope_scaling=dict(LLAMA3),
        tie_word_embeddings=False,
    )
    torch.manual_seed(5)
    hf = hf_transformers().LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "src")
    tok.save(tmp_path / "src")
    saved = json.loads((tmp_path / "src" / "config.json").read_text())
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == "llama3"

    out = tmp_path / "imported"
    assert convert.import_command(str(tmp_path / "src"), str(out)) == 0
    loaded = artifacts.load_model(out, device="cpu")
    model, cfg = loaded.model, loaded.config
    m = cfg.model
    assert (m.rope_scaling, m.rope_factor, m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_original_max_len) == (
        "llama3", 8.0, 1.0, 4.0, 64)
    # the scaling changes exactly the expected frequencies: angle at position 1 = inverse frequency
    plain = rope_tables(16, 2, 10000.0)[1].asin()[1, :8].double()  # sin(angle) -> angle (all < pi/2)
    scaled = rope_tables(16, 2, 10000.0, m)[1].asin()[1, :8].double()
    ratio = plain / scaled  # 1 = kept, 8 = divided by factor, in between = blended
    torch.testing.assert_close(ratio[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-5, atol=0)
    assert 1.0 < ratio[1] < ratio[2] < 8.0
    torch.testing.assert_close(ratio[3:], torch.full((5,), 8.0, dtype=torch.float64), rtol=1e-4, atol=0)
    # blended frequency 1: s = (64 / wavelength - 1) / (4 - 1), inverse frequency * ((1 - s) / 8 + s)
    s1 = (64 / (2 * torch.pi * 10000 ** (1 / 8)) - 1) / 3
    assert float(ratio[1]) == pytest.approx(1 / ((1 - s1) / 8 + s1), rel=1e-4)

    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=g)
    want = hf(idx).logits.detach()
    got = lm_logits(model, idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unscaled = Transformer(replace(m, rope_scaling=""))
    artifacts.load_weights(unscaled, dict(model.named_parameters()))
    # the scaling matters at this length: plain RoPE misses transformers by 10x the parity tolerance or more
    assert (lm_logits(unscaled.eval(), idx) - want).abs().max() > 1e-3

    back = convert.write_hf_dir(convert.bundle_from_model(model, tok), tmp_path / "hf")
    hf2, info = hf_transformers().AutoModelForCausalLM.from_pretrained(back, output_loading_info=True, dtype=torch.float32)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf2.config.rope_parameters["rope_type"] == "llama3" and hf2.config.rope_parameters["factor"] == 8.0
    torch.testing.assert_close(hf2.eval()(idx).logits.detach(), want, rtol=1e-4, atol=1e-4)
    assert convert.read_hf_dir(back).cfg == m


def test_llama3_rope_scaling_gguf_round_trip(tok, tmp_path) -> None:
    """GGUF carries llama3 scaling as llama.cpp's rope_freqs divisors (+ lmforge's parameter keys)."""
    import gguf

    shape = dict(SHAPES["gqa-untied"], rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64)
    model = tiny_model(tok, **shape)
    bundle = convert.bundle_from_model(model, tok)
    path = convert.write_gguf(bundle, tmp_path / "m.gguf")
    back = convert.read_gguf(path)
    assert back.cfg == model.cfg
    assert all(torch.equal(back.tensors[k], bundle.tensors[k]) for k in bundle.tensors)
    freqs = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    divisors = torch.from_numpy(freqs.data.copy())  # llama.cpp divides frequency i by entry i
    assert divisors.shape == (8,) and divisors[0] == 1.0 and 1.0 < divisors[1] < divisors[2] < 8.0
    torch.testing.assert_close(divisors[3:], torch.full((5,), 8.0), rtol=1e-6, atol=0)

    # llama.cpp's own converter writes the tensor without lmforge's parameters: they are recovered from it
    def without_lmforge_keys(src: Path, dst: Path, freqs: torch.Tensor | None = None) -> Path:
        r = gguf.GGUFReader(str(src))
        w = gguf.GGUFWriter(str(dst), "llama")
        for f in r.fields.values():
            if f.name.startswith(("lmforge.", "GGUF.", "general.architecture")):
                continue
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        for t in r.tensors:
            data = freqs.numpy() if t.name == "rope_freqs.weight" and freqs is not None else t.data.copy()
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return dst

    foreign = convert.read_gguf(without_lmforge_keys(path, tmp_path / "foreign.gguf"))
    assert foreign.cfg.rope_scaling == "llama3" and foreign.cfg.rope_factor == 8.0
    assert (foreign.cfg.rope_low_freq_factor, foreign.cfg.rope_high_freq_factor, foreign.cfg.rope_original_max_len) == (1.0, 4.0, 64)
    imported = Transformer(foreign.cfg)
    artifacts.load_weights(imported, foreign.tensors)
    idx = torch.randint(0, tok.vocab_size, (1, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(imported.eval()(idx), model.eval()(idx), rtol=0, atol=0)  # same frequencies, bit for bit
    # divisors that no llama3 scaling gives are refused by name
    bent = divisors.clone()
    bent[1] *= 1.01
    with pytest.raises(CheckpointError, match="rope_freqs.weight is not a llama3 RoPE scaling"):
        convert.read_gguf(without_lmforge_keys(path, tmp_path / "bent.gguf", bent))


@pytest.mark.parametrize("base, dim, factor, low, high, original", [
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),   # Llama 3.2 1B/3B
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),   # Llama 3.1 8B
    (10000.0, 16, 8.0, 1.0, 4.0, 32),       # one blended frequency
    (500000.0, 16, 8.0, 2.0, 4.0, 64),      # none blended, another low factor: equivalent parameters
])
def test_llama3_parameters_recovered_from_llama_cpp_rope_freqs(base, dim, factor, low, high, original) -> None:
    """rope_freqs exactly as llama.cpp's converter computes it (float32 frequencies, Python floats)."""
    import math

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    divisors = []
    for fr in freqs.tolist():
        wavelen = 2 * math.pi / fr
        if wavelen < original / high:
            divisors.append(1.0)
        elif wavelen > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    table = torch.tensor(divisors, dtype=torch.float32)
    params = convert.llama3_from_rope_freqs(table, base, dim)
    assert params is not None and params["rope_factor"] == factor
    if low == 1.0:
        assert (params["rope_high_freq_factor"], params["rope_original_max_len"]) == (high, original)
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=1, d_model=dim, rope_theta=base, **params)
    torch.testing.assert_close(convert._rope_freqs(cfg), table, rtol=1e-5, atol=0)
    assert convert.llama3_from_rope_freqs(torch.ones(dim // 2), base, dim) is None  # no scaling at all


def test_rope_scaling_config_is_validated_and_round_trips() -> None:
    from lmforge.config import Config, ConfigError

    cfg = Config.from_dict({"model": {"rope_scaling": "llama3", "rope_factor": 32.0, "rope_original_max_len": 8192}})
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="model.rope_scaling must be one of '', 'llama3'.*'yarn'"):
        Config.from_dict({"model": {"rope_scaling": "yarn"}})
    with pytest.raises(ConfigError, match="model.rope_original_max_len must be > 0"):
        Config.from_dict({"model": {"rope_scaling": "llama3", "rope_factor": 8.0}})
    with pytest.raises(ConfigError, match="rope_low_freq_factor"):
        Config.from_dict({"model": {"rope_scaling": "llama3", "rope_original_max_len": 64, "rope_low_freq_factor": 4.0}})


def test_import_cli_refuses_cleanly_and_writes_nothing(tok, tmp_path) -> None:
    src = hf_dir_with(tmp_path, tok, mlp_bias=True)
    out = tmp_path / "models" / "x"
    r = lmforge_in_process(["import", str(src), "--out", str(out)])
    assert r.returncode == 2, r.stderr
    assert "mlp_bias" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))  # no temp dir left
    r = lmforge_in_process(["import", str(tmp_path / "nope.gguf"), "--out", str(out)])
    assert r.returncode == 2 and "nope.gguf" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_sharded_hf_checkpoint_imports(tok, tmp_path) -> None:
    model = tiny_model(tok, **SHAPES["gqa-untied"])
    bundle = convert.bundle_from_model(model, tok)
    src = convert.write_hf_dir(bundle, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / f), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    back = convert.read_hf_dir(src)
    assert all(torch.equal(back.tensors[k], bundle.tensors[k]) for k in bundle.tensors)


# ---- GGUF -------------------------------------------------------------------------------------


def test_gguf_permutation_hand_computed() -> None:
    # 2 heads of head_dim 4: HF pairs rows (0, 2), (1, 3) of a head; llama.cpp wants them adjacent.
    w = torch.arange(8.0).reshape(8, 1)
    assert convert.permute_for_gguf(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(convert.unpermute_from_gguf(convert.permute_for_gguf(w, 2), 2), w)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gguf_f32_round_trip_is_bit_identical(tok, tmp_path, shape) -> None:
    model = tiny_model(tok, **SHAPES[shape])
    bundle = convert.bundle_from_model(model, tok)
    path = convert.write_gguf(bundle, tmp_path / "m.gguf", dtype="f32")
    back = convert.read_gguf(path)
    assert arch(back.cfg) == arch(model.cfg)
    assert back.tensors.keys() == bundle.tensors.keys()
    assert all(torch.equal(back.tensors[k], bundle.tensors[k]) for k in bundle.tensors)
    for text in SAMPLES:  # the tokenizer rebuilt from the GGUF vocabulary encodes as the original
        assert back.tokenizer.encode(text) == tok.encode(text)
    assert back.tokenizer.eos_id == tok.eos_id and back.special["eos_token"] == "<|eos|>"


def test_gguf_pads_a_vocabulary_smaller_than_the_embedding(tok, tmp_path) -> None:
    model = tiny_model(tok, n_layer=1, n_head=2, d_model=32)
    cfg = replace(model.cfg, vocab_size=tok.vocab_size + 7)  # embedding rows beyond the tokenizer
    torch.manual_seed(0)
    model = Transformer(cfg)
    back = convert.read_gguf(convert.write_gguf(convert.bundle_from_model(model, tok), tmp_path / "m.gguf"))
    assert back.cfg.vocab_size == tok.vocab_size + 7 and back.tokenizer.vocab_size == tok.vocab_size
    assert back.tokenizer.hf.get_vocab() == tok.hf.get_vocab()


def test_gguf_unsupported_or_damaged_files_are_refused(tok, tmp_path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi2")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="general.architecture = 'phi2'"):
        convert.read_gguf(tmp_path / "phi.gguf")
    good = convert.write_gguf(convert.bundle_from_model(tiny_model(tok, **SHAPES["mha-tied"]), tok), tmp_path / "m.gguf")
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        convert.read_gguf(tmp_path / "cut.gguf")


def test_gguf_f16_export_rounds_matrices_and_keeps_norms(tok, tmp_path) -> None:
    bundle = convert.bundle_from_model(tiny_model(tok, **SHAPES["gqa-untied"]), tok)
    back = convert.read_gguf(convert.write_gguf(bundle, tmp_path / "m.gguf", dtype="f16"))
    for k, t in bundle.tensors.items():
        want = t if t.ndim == 1 else t.half().float()
        assert torch.equal(back.tensors[k], want), k


def test_gguf_export_loads_in_transformers_gguf_reader(tok, tmp_path) -> None:
    """An independent reader (transformers' GGUF loader, which undoes llama.cpp's q/k permutation
    itself) must recover the original HF tensors from our GGUF."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = tiny_model(tok, **SHAPES["gqa-untied"])
    bundle = convert.bundle_from_model(model, tok)
    path = convert.write_gguf(bundle, tmp_path / "m.gguf")
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    hf_cfg = hf_transformers().LlamaConfig(**{k: v for k, v in parsed["config"].items() if not k.startswith("_")})
    assert (hf_cfg.num_key_value_heads, hf_cfg.hidden_size, hf_cfg.tie_word_embeddings) == (2, 64, False)
    with torch.device("meta"):
        shell = hf_transformers().LlamaForCausalLM(hf_cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=shell)["tensors"]
    for k, t in bundle.tensors.items():
        assert torch.equal(torch.as_tensor(tensors[k]).float(), t), k


def test_export_cli_from_run_and_import_back(tiny_dataset, tmp_path) -> None:
    """A real run -> `lmforge export` hf and gguf -> `lmforge import` back: identical weights."""
    run = tmp_path / "run"
    r = lmforge_in_process(["train", str(TINY_CONFIG), "--run-dir", str(run), "--set", f"data.path={tiny_dataset}",
                                   "--set", "train.max_steps=2", "--set", "train.ckpt_every_steps=2"])
    assert r.returncode == 0, r.stdout + r.stderr
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        r = lmforge_in_process(["export", str(run), "--format", fmt, "--out", str(out)])
        assert r.returncode == 0, r.stdout + r.stderr
        if fmt == "gguf":  # once through the CLI; the library call otherwise
            r = lmforge_in_process(["import", str(out), "--out", str(tmp_path / f"back-{fmt}")])
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            convert.import_command(str(out), str(tmp_path / f"back-{fmt}"))
        back = load_file(str(tmp_path / f"back-{fmt}" / "model.safetensors"))
        assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights), fmt
    r = lmforge_in_process(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert r.returncode == 2 and "already exists" in r.stdout + r.stderr


# ---- init.from --------------------------------------------------------------------------------


def test_init_from_starts_from_the_model_and_checks_the_tokenizer(tiny_dataset, tmp_path) -> None:
    data_tok = Tokenizer.load(tiny_dataset)
    model = tiny_model(data_tok, n_layer=2, n_head=2, n_kv_head=1, d_model=32, tie_embeddings=False)
    facts = {"eos_token": "<|eos|>", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    mdir = artifacts.write_model_dir(convert.bundle_from_model(model, data_tok, facts), tmp_path / "models" / "tiny")
    base = ["train", str(TINY_CONFIG), "--set", f"data.path={tiny_dataset}", "--set", "data.seq_len=32",
            "--set", "train.max_steps=3", "--set", "train.eval_every=0"]

    # tiny-cpu.yaml sets n_layer/n_head/d_model to other values than the model: named, refused
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r0"), "--set", f"init.from={mdir}"])
    assert r.returncode == 2 and "model.d_model" in r.stdout + r.stderr and "Traceback" not in r.stderr

    cfg_path = tmp_path / "cfg.yaml"  # the same recipe without a model section
    raw = yaml.safe_load(TINY_CONFIG.read_text())
    raw.pop("model")
    cfg_path.write_text(yaml.safe_dump(raw))
    base[1] = str(cfg_path)
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r1"), "--set", f"init.from={mdir}"])
    assert r.returncode == 0, r.stdout + r.stderr
    from safetensors.torch import load_file

    step0 = load_file(str(tmp_path / "r1" / "checkpoints" / "step-000000" / "model.safetensors"))
    src = load_file(str(mdir / "model.safetensors"))
    assert step0.keys() == src.keys() and all(torch.equal(step0[k], src[k]) for k in src)
    run_cfg = yaml.safe_load((tmp_path / "r1" / "config.yaml").read_text())
    assert run_cfg["model"]["n_kv_head"] == 1 and run_cfg["model"]["tie_embeddings"] is False
    step3 = tmp_path / "r1" / "checkpoints" / "step-000003"
    trainer = json.loads((step3 / "trainer.json").read_text())
    assert trainer["step"] == 3
    start = json.loads((tmp_path / "r1" / "events.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["init_from"] == {
        "path": str(mdir), "kind": "model", "step": None, "model_sha256": artifacts.read_manifest(mdir).sha256("model.safetensors")}

    # every checkpoint records the model's tokenizer facts itself: loading never follows init.from
    assert json.loads((step3 / "tokenizer_config.json").read_text()) == facts
    mdir.rename(tmp_path / "models" / "moved")
    tok3 = artifacts.load_model(tmp_path / "r1", device="cpu").tokenizer
    assert tok3.chat_template == facts["chat_template"] and tok3.eos_id in tok3.end_ids

    # a run directory is a source too (issues 16/18: --set init.from=runs/exp1): its newest intact checkpoint
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r4"), "--set", f"init.from={tmp_path / 'r1'}"])
    assert r.returncode == 0, r.stdout + r.stderr
    step0 = load_file(str(tmp_path / "r4" / "checkpoints" / "step-000000" / "model.safetensors"))
    src = load_file(str(step3 / "model.safetensors"))
    assert step0.keys() == src.keys() and all(torch.equal(step0[k], src[k]) for k in src)
    start = json.loads((tmp_path / "r4" / "events.jsonl").read_text().splitlines()[0])
    assert (start["init_from"]["path"], start["init_from"]["kind"], start["init_from"]["step"]) == (str(step3), "checkpoint", 3)
    assert json.loads((tmp_path / "r4" / "checkpoints" / "step-000003" / "tokenizer_config.json").read_text()) == facts

    other_tok = Tokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    other = tiny_model(other_tok, n_layer=1, n_head=2, d_model=32)
    odir = artifacts.write_model_dir(convert.bundle_from_model(other, other_tok), tmp_path / "models" / "other")
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r2"), "--set", f"init.from={odir}"])
    assert r.returncode == 2 and "another tokenizer" in r.stdout + r.stderr and "--tokenizer" in r.stdout + r.stderr
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r3"), "--set", f"init.from={tmp_path / 'models'}"])
    assert r.returncode == 2 and "init.from" in r.stderr and "is not a run, checkpoint or model directory" in r.stderr
    (tmp_path / "r1" / "checkpoints" / "step-000003" / "MANIFEST.json").unlink()  # a damaged checkpoint is refused, named
    r = lmforge_in_process([*base, "--run-dir", str(tmp_path / "r5"), "--set", f"init.from={tmp_path / 'r1' / 'checkpoints' / 'step-000003'}"])
    assert r.returncode == 2 and "checkpoint refused" in r.stderr and "MANIFEST.json is missing" in r.stderr, r.stderr


def test_model_directory_is_sampled_like_a_checkpoint(tok, tmp_path, capsys) -> None:
    from lmforge.generate import generate, sample_command

    model = tiny_model(tok, **SHAPES["gqa-tied"])
    mdir = artifacts.write_model_dir(convert.bundle_from_model(model, tok), tmp_path / "m")
    loaded = artifacts.load_model(mdir)
    prompt = tok.encode("Hello tiny")
    greedy = generate(model, prompt, max_tokens=8, stop_ids=[tok.eos_id])
    assert loaded.origin.step is None and generate(loaded.model, prompt, max_tokens=8, stop_ids=[tok.eos_id]) == greedy
    assert sample_command(str(mdir), prompt="Hello tiny", max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                          num_samples=1) == 0
    assert capsys.readouterr().out == f"# {mdir} (model directory)\nHello tiny{tok.decode(greedy)}\n"
    with pytest.raises(CheckpointError, match="already exists"):
        artifacts.write_model_dir(convert.bundle_from_model(model, tok), mdir)


# ---- damaged input, --overwrite, file modes -----------------------------------------------------


def _tree_leftovers(root: Path) -> list[str]:
    """Hidden entries (temporary siblings, `.NAME.old` backups) anywhere below root."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_import_cli_refuses_a_truncated_safetensors_naming_it(tok, tmp_path) -> None:
    src = hf_dir_with(tmp_path, tok)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1024])
    out = tmp_path / "models" / "y"
    r = lmforge_in_process(["import", str(src), "--out", str(out)])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"not a valid safetensors file: {weights}" in r.stderr
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


@pytest.mark.parametrize("keep", [0, 8, 1024, -10])  # empty, header length only, cut header, cut data
def test_damaged_safetensors_are_refused_wherever_they_are_read(tok, tmp_path, keep) -> None:
    import re

    from safetensors.torch import load_file, save_file

    src = convert.write_hf_dir(convert.bundle_from_model(tiny_model(tok, **SHAPES["gqa-untied"]), tok), tmp_path / "hf")
    good = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(good[:keep])
    with pytest.raises(CheckpointError, match=f"not a valid safetensors file: {re.escape(str(src / 'model.safetensors'))}"):
        convert.read_hf_dir(src)
    mdir = artifacts.write_model_dir(convert.bundle_from_model(tiny_model(tok, **SHAPES["gqa-untied"]), tok), tmp_path / "m")
    (mdir / "model.safetensors").write_bytes(good[:keep])  # an lmforge model directory (import's output)
    with pytest.raises(CheckpointError, match="model directory refused: .*model.safetensors has .* bytes, manifest says"):
        artifacts.read_model_dir(mdir)  # its manifest catches it first
    (mdir / "MANIFEST.json").unlink()  # one imported by an earlier lmforge: no checksums, the reader names the file
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        artifacts.read_model_dir(mdir)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):  # init.from
        artifacts.load_model(mdir, into=tiny_model(tok, **SHAPES["gqa-untied"]))
    # a sharded checkpoint with one shard cut short
    (src / "model.safetensors").write_bytes(good)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / f))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=f"not a valid safetensors file: {re.escape(str(shard))}"):
        convert.read_hf_dir(src)


@pytest.mark.parametrize("index, match", [
    ([], "expected a JSON object"),
    ({"weight_map": []}, "weight_map"),
    ({"weight_map": {"model.norm.weight": 3}}, "weight_map"),
    ({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}, "not a file name inside"),
])
def test_damaged_hf_index_is_refused(tok, tmp_path, index, match) -> None:
    src = hf_dir_with(tmp_path, tok)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        convert.read_hf_dir(src)


@pytest.mark.parametrize("changes, match", [
    ({"vocab_size": "many"}, "wrong type"),
    ({"hidden_size": None}, "wrong type"),
    ({"rope_parameters": [10000.0]}, "rope_parameters"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": "8x", "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 64}}, "must be numbers"),
])
def test_hf_config_values_of_the_wrong_type_are_refused(tok, tmp_path, changes, match) -> None:
    with pytest.raises(CheckpointError, match=match):
        convert.read_hf_dir(hf_dir_with(tmp_path, tok, **changes))


def test_damaged_gguf_metadata_is_always_a_checkpoint_error(tok, tmp_path) -> None:
    """Seeded byte damage in the header, metadata and tensor infos of a GGUF: every failure is a
    CheckpointError naming the file (before: TypeError, KeyError, the tokenizers library's plain
    Exception, a RuntimeError from the q/k unpermutation)."""
    import random
    import re

    good = convert.write_gguf(convert.bundle_from_model(tiny_model(tok, **SHAPES["gqa-untied"]), tok),
                              tmp_path / "m.gguf").read_bytes()
    # one merge, spelled with a character that is no token: the merges name an unknown token
    merge = next(m for m in json.loads(tok.hf.to_str())["model"]["merges"]
                 if (m if isinstance(m, str) else " ".join(m)).isascii())
    merge = (merge if isinstance(merge, str) else " ".join(merge)).encode()
    at = good.index(merge)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:at] + b"\x01" + good[at + 1:])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(bad))}: the GGUF vocabulary does not form a valid BPE tokenizer"):
        convert.read_gguf(bad)
    rnd = random.Random(0)
    meta_end = min(len(good), 9000)
    for _ in range(150):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 3)):
            data[rnd.randrange(meta_end)] = rnd.randrange(256)
        bad.write_bytes(bytes(data))
        try:
            convert.read_gguf(bad)
        except CheckpointError as e:
            assert str(bad) in str(e)


def test_export_overwrite_replaces_a_directory_or_a_file_and_leaves_nothing_behind(tok, tmp_path) -> None:
    bundle = convert.bundle_from_model(tiny_model(tok, **SHAPES["mha-tied"]), tok)
    src = artifacts.write_model_dir(bundle, tmp_path / "m")
    ex = tmp_path / "ex"
    convert.write_hf_dir(bundle, ex / "t")  # an earlier Hugging Face export: a directory
    with pytest.raises(CheckpointError, match="already exists; choose another --out or pass --overwrite"):
        convert.export_command(str(src), "gguf", str(ex / "t"))
    assert (ex / "t" / "config.json").is_file()
    r = lmforge_in_process(["export", str(src), "--format", "gguf", "--out", str(ex / "t"), "--overwrite"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (ex / "t").is_file() and convert.read_gguf(ex / "t").tensors.keys() == bundle.tensors.keys()
    assert sorted(p.name for p in ex.iterdir()) == ["t"]
    convert.write_gguf(bundle, ex / "m.gguf")  # an earlier GGUF: a file
    r = lmforge_in_process(["export", str(src), "--format", "hf", "--out", str(ex / "m.gguf"), "--overwrite"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert convert.read_hf_dir(ex / "m.gguf").tensors.keys() == bundle.tensors.keys()
    assert sorted(p.name for p in ex.iterdir()) == ["m.gguf", "t"] and _tree_leftovers(ex) == []
    # a directory over a directory, a file over a file (in process)
    convert.export_command(str(src), "hf", str(ex / "m.gguf"), overwrite=True)
    convert.export_command(str(src), "gguf", str(ex / "t"), overwrite=True)
    assert sorted(p.name for p in ex.iterdir()) == ["m.gguf", "t"] and _tree_leftovers(ex) == []
    # --overwrite never deletes the model being exported
    for out in (src, tmp_path):
        with pytest.raises(CheckpointError, match="--overwrite would delete it"):
            convert.export_command(str(src), "gguf", str(out), overwrite=True)
        with pytest.raises(CheckpointError, match="--overwrite would delete it"):
            convert.import_command(str(src), str(out), overwrite=True)
    assert artifacts.is_model_dir(src)


def test_replace_path_puts_the_old_entry_back_when_the_swap_fails(tmp_path, monkeypatch) -> None:
    import os

    from lmforge.util import replace_path

    final, new = tmp_path / "out", tmp_path / ".out.new"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    new.write_text("new")
    real = os.replace
    calls = []

    def failing(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the rename of the new entry into place
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        replace_path(new, final)
    monkeypatch.undo()
    assert (final / "keep.txt").read_text() == "old" and new.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.new", "out"]


def test_written_files_get_the_umask_modes_not_private_ones(tok, tmp_path) -> None:
    import stat

    from safetensors.torch import save_file

    from lmforge.util import DIR_MODE, FILE_MODE, atomic_dir

    bundle = convert.bundle_from_model(tiny_model(tok, **SHAPES["mha-tied"]), tok)
    outs = [artifacts.write_model_dir(bundle, tmp_path / "m"), convert.write_hf_dir(bundle, tmp_path / "hf"),
            convert.write_gguf(bundle, tmp_path / "m.gguf"),
            artifacts.write_model_dir(bundle, tmp_path / "m", overwrite=True)]
    with atomic_dir(tmp_path / "ckpt") as tmp:  # as checkpoints are written: safetensors' own file is 0600
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "model.safetensors"))
    outs.append(tmp_path / "ckpt")
    for out in outs:
        for p in [out, *out.rglob("*")]:
            want = DIR_MODE if p.is_dir() else FILE_MODE
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
