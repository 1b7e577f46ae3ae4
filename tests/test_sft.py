"""SFT data (`prepare --sft`, data/sft.py): each format's ids and loss mask, the mask stored and
checksummed beside the tokens, bad input named by file:line, `data inspect --show-mask`, SmolLM2's
ids equal transformers' apply_chat_template, and a real SFT of SmolLM2 lowering the held-out loss
on completion tokens."""

from __future__ import annotations

import contextlib

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import arithmetic_chats, lmforge_in_process
from lmforge.data.loader import TokenDataset
from lmforge.data.manifest import read_manifest, verify_dataset
from lmforge.data.sft import Encoder, load_tokenizer, prepare_sft
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer


def segments(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, int]]:
    """ids + mask as decoded runs of equal mask: a readable golden form of both."""
    out: list[tuple[str, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((tok.decode(ids[start:i]), mask[start]))
            start = i
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And plus 4?"},
    {"role": "assistant", "content": "5 + 4 = 9."},
]}


# ---- each format: golden ids + mask ------------------------------------------------------------------


def test_messages_train_every_assistant_turn_with_its_end_of_turn(chat_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(chat_tokenizer_dir)
    enc = Encoder(tok)
    ids, mask = enc.encode(CONVERSATION, "messages", "x:1")
    assert segments(tok, ids, mask) == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("2 + 3 = 5.<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd plus 4?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("5 + 4 = 9.<|im_end|>", 1),
        ("\n", 0),
    ]
    # the ids are the template's: control tokens as their ids, messages as text
    im_end = tok.hf.token_to_id("<|im_end|>")
    assert ids.count(im_end) == 5 and [ids[i] for i in range(len(ids)) if mask[i] and ids[i] == im_end] == [im_end] * 2
    assert ids == tok.encode_template(enc.template.parts(CONVERSATION["messages"], add_generation_prompt=False))
    on_prompt = Encoder(tok, train_on_prompt=True).encode(CONVERSATION, "messages", "x:1")
    assert on_prompt[0] == ids and set(on_prompt[1]) == {1}


def test_text_and_prompt_completion_formats(chat_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(chat_tokenizer_dir)
    enc = Encoder(tok)
    ids, mask = enc.encode({"text": "What is 7 plus 1?"}, "text", "x:1")
    assert segments(tok, ids, mask) == [("What is 7 plus 1?<|eos|>", 1)]  # all trained, ended by the document separator
    ids, mask = enc.encode({"prompt": "What is 7 plus 1?", "completion": " 8."}, "prompt-completion", "x:1")
    assert segments(tok, ids, mask) == [("What is 7 plus 1?", 0), (" 8.<|im_end|>", 1)]  # the model's end of turn
    conversational = {"prompt": [{"role": "user", "content": "What is 7 plus 1?"}],
                      "completion": [{"role": "assistant", "content": "7 + 1 = 8."}]}
    ids, mask = enc.encode(conversational, "prompt-completion", "x:1")
    assert segments(tok, ids, mask) == [("<|im_start|>user\nWhat is 7 plus 1?<|im_end|>\n<|im_start|>assistant\n", 0),
                                        ("7 + 1 = 8.<|im_end|>", 1), ("\n", 0)]


def test_a_tokenizer_without_chat_template_gets_the_plain_one_said_once(chat_tokenizer_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION] * 3)
    prepare_sft([src], tmp_path / "out", tokenizer=chat_tokenizer_dir / "tokenizer.json", val_fraction=0.0, workers=1)
    err = capsys.readouterr().err
    assert err.count("has no chat template") == 1
    tok = Tokenizer.load(chat_tokenizer_dir)
    enc = Encoder(tok)
    ids, mask = enc.encode(CONVERSATION, "messages", "x:1")
    assert segments(tok, ids, mask) == [("System: Be brief.\nUser: What is 2 plus 3?\nAssistant:", 0), (" 2 + 3 = 5.\n", 1),
                                        ("User: And plus 4?\nAssistant:", 0), (" 5 + 4 = 9.\n", 1)]


# ---- the prepared dataset ------------------------------------------------------------------------------


def test_prepared_masks_sit_beside_the_shards_checksummed(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    records = arithmetic_chats(40)
    src = write_jsonl(tmp_path / "c.jsonl", records)
    out = prepare_sft([src], tmp_path / "ds", tokenizer=chat_tokenizer_dir, val_fraction=0.2, workers=1, shard_tokens=300)
    m = read_manifest(out)
    assert m["kind"] == "sft" and m["format_version"] == 2 and m["sft"]["formats"]["messages"] == 40
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and all((out / s["mask"]["file"]).stat().st_size == s["tokens"] for s in shards)
    enc = Encoder(load_tokenizer(chat_tokenizer_dir))
    encoded = {tuple(ids): mask for ids, mask in (enc.encode(r, "messages", "x") for r in records)}
    for split in ("train", "val"):  # every document (some cross shards) is a record, stored as encoded with its mask
        ds = TokenDataset(out, split)
        ends = np.append(ds.document_starts[1:], ds.n_tokens)
        for s, e in zip(ds.document_starts.tolist(), ends.tolist()):
            ids = tuple(ds.window(s, e - s).tolist())
            assert ids in encoded and ds.mask_window(s, e - s).tolist() == encoded[ids]
    assert sum(m["splits"][s]["documents"] for s in ("train", "val")) == 40
    assert verify_dataset(out) == []
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    mask_file = bad / shards[0]["mask"]["file"]
    mask_file.write_bytes(bytes(1 - b for b in mask_file.read_bytes()))  # same size, every flag flipped
    assert any("loss mask is corrupt" in p for p in verify_dataset(bad))
    # the mask is part of the data's identity: the same tokens trained otherwise are other data
    on_prompt = prepare_sft([src], tmp_path / "ds2", tokenizer=chat_tokenizer_dir, val_fraction=0.2, workers=1,
                            shard_tokens=300, train_on_prompt=True)
    assert read_manifest(on_prompt)["fingerprint"] != m["fingerprint"]


def test_bad_input_is_named_by_file_and_line(chat_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    def prep(records: list, name: str, **kw) -> Path:
        return prepare_sft([write_jsonl(tmp_path / f"{name}.jsonl", records)], tmp_path / name,
                           tokenizer=chat_tokenizer_dir, val_fraction=0.0, workers=1, **kw)

    no_answer = {"messages": [{"role": "user", "content": "hello?"}]}
    prep([CONVERSATION, no_answer, CONVERSATION, no_answer], "skips", dedup=False)  # the same conversation twice: kept
    err = capsys.readouterr().err
    assert "skipped 2 conversation(s) with no assistant turn" in err and "skips.jsonl:2" in err
    assert read_manifest(tmp_path / "skips")["splits"]["train"]["documents"] == 2
    bad_role = {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}
    with pytest.raises(DataError, match=r"roles.jsonl:2: messages\[1\] has the unknown role 'bot'; valid roles: system, user, assistant"):
        prep([CONVERSATION, bad_role], "roles")
    with pytest.raises(DataError, match=r"mixed.jsonl:2: a text record in a file whose first record \(.*mixed.jsonl:1\) is messages"):
        prep([CONVERSATION, {"text": "hi"}], "mixed")
    with pytest.raises(DataError, match=r"none.jsonl:1: a record holds none of the formats \(keys: \['msgs'\]\)"):
        prep([{"msgs": []}], "none")
    with pytest.raises(DataError, match=r"two.jsonl:1: a record holds two formats at once"):
        prep([{"text": "a", **CONVERSATION}], "two")
    with pytest.raises(DataError, match=r"content.jsonl:1: messages\[0\].content must be a string"):
        prep([{"messages": [{"role": "user", "content": 3}]}], "content")
    with pytest.raises(DataError, match=r"no examples to train on in .*only.jsonl \(none has an assistant turn\)"):
        prep([no_answer], "only")
    assert not (tmp_path / "roles").exists() and not (tmp_path / "mixed").exists()  # nothing written


def test_hygiene_of_examples_exact_dedup_and_pii(chat_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    """SFT examples get exact dedup (rendered ids + mask) and PII scrubbing of every string, recorded
    like a text corpus's hygiene; near-dup and the quality rules do not apply (refused with --sft)."""
    from lmforge.cli import main

    mail = {"messages": [{"role": "user", "content": "My address is jane.doe@northwind-corp.de, please reset it."},
                         {"role": "assistant", "content": "Done: a reset link went to jane.doe@northwind-corp.de."}]}
    spaced = {"messages": [{**m, "content": m["content"] + " "} for m in CONVERSATION["messages"]]}  # other ids: kept
    src = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION, mail, CONVERSATION, {**CONVERSATION, "id": 7}, spaced])
    out = prepare_sft([src], tmp_path / "ds", tokenizer=chat_tokenizer_dir, val_fraction=0.0, workers=1)
    m = read_manifest(out)
    h = m["hygiene"]
    assert m["splits"]["train"]["documents"] == 3  # CONVERSATION, mail, spaced: the two copies go (extra keys ignored)
    assert h["removed"] == {"exact_dup": {"chats": {"documents": 2, "bytes": h["removed"]["exact_dup"]["chats"]["bytes"]}}}
    assert h["redacted"]["email"]["chats"] == {"documents": 1, "items": 2}
    assert h["settings"]["near_dup_threshold"] is None and h["settings"]["quality"] is False
    assert "jane.doe" not in json.dumps(h["examples"]) and h["examples"]["exact_dup"][0]["copy_of"]["byte_offset"] == 0
    ds = TokenDataset(out, "train")
    tok = load_tokenizer(chat_tokenizer_dir)
    text = tok.decode(ds.window(0, ds.n_tokens).tolist())
    assert "jane.doe" not in text and text.count("<EMAIL>") == 2
    assert "hygiene: removed 2 of 5 examples (exact_dup 2), redacted 2 PII item(s)" in " ".join(capsys.readouterr().err.split())
    # --no-dedup --pii keep: the examples as they are; --pii drop: the example with the address goes
    kept = read_manifest(prepare_sft([src], tmp_path / "all", tokenizer=chat_tokenizer_dir, val_fraction=0.0, workers=1,
                                     dedup=False, pii="keep"))
    assert kept["splits"]["train"]["documents"] == 5 and kept["hygiene"]["removed"] == {}
    dropped = read_manifest(prepare_sft([src], tmp_path / "drop", tokenizer=chat_tokenizer_dir, val_fraction=0.0, workers=1,
                                        pii="drop"))
    assert dropped["splits"]["train"]["documents"] == 2 and dropped["hygiene"]["removed"]["pii"]["chats"]["documents"] == 1
    # the report reads it like any dataset's
    capsys.readouterr()
    assert main(["data", "report", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["hygiene"]["total"]["kept_documents"] == 3 and rep["hygiene"]["removed"][0]["rule"] == "exact_dup"
    # switches that only mean something for a text corpus are refused with --sft, in one line
    argv = ["prepare", str(src), "--sft", "--tokenizer", str(chat_tokenizer_dir), "--out", str(tmp_path / "no")]
    for extra in (["--near-dup-threshold", "0.9"], ["--quality", "off"], ["--mix", "chats=1"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert f"{extra[0]} with --sft" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_cli_prepare_and_inspect_show_the_mask(chat_tokenizer_dir: Path, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION] * 6)
    def run(*args: str) -> subprocess.CompletedProcess:
        return lmforge_in_process(list(args), env={"COLUMNS": "200"})

    no_tok = run("prepare", str(src), "--sft", "--out", str(tmp_path / "x"))
    assert no_tok.returncode == 2 and "prepare --sft needs --tokenizer" in no_tok.stderr
    p = run("prepare", str(src), "--sft", "--tokenizer", str(chat_tokenizer_dir), "--out", str(tmp_path / "ds"),
            "--val-fraction", "0")
    assert p.returncode == 0, p.stderr
    shown = run("data", "inspect", str(tmp_path / "ds"), "--step", "0", "--seq-len", "128", "--global-batch", "1", "--show-mask")
    assert shown.returncode == 0, shown.stderr
    assert "⟦<|im_start|>system" in shown.stdout and "2 + 3 = 5.<|im_end|>⟦" in shown.stdout
    js = run("data", "inspect", str(tmp_path / "ds"), "--step", "0", "--seq-len", "128", "--global-batch", "1", "--show-mask",
             "--json")
    sample = json.loads(js.stdout)["samples"][0]
    assert len(sample["tokens"]) == len(sample["mask"]) and sample["mask"][0] == 0
    trained = "".join(s["text"] for s in sample["segments"] if s["trained"])
    assert trained == "2 + 3 = 5.<|im_end|>5 + 4 = 9.<|im_end|>" * (len(sample["documents"]))


# ---- SmolLM2 ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_ids_equal_transformers_apply_chat_template(smollm2_dir: Path) -> None:
    from test_convert_smollm2 import hf_tokenizer

    tok = load_tokenizer(smollm2_dir)
    enc = Encoder(tok)
    ids, mask = enc.encode(CONVERSATION, "messages", "x:1")
    reference = hf_tokenizer()
    expected = reference.apply_chat_template(CONVERSATION["messages"], chat_template=tok.chat_template, tokenize=True,
                                             add_generation_prompt=False)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    trained = [t for t, m in segments(tok, ids, mask) if m]
    assert trained == ["2 + 3 = 5.<|im_end|>", "5 + 4 = 9.<|im_end|>"]


@pytest.mark.slow
def test_sft_of_smollm2_lowers_the_held_out_completion_loss(smollm2_dir: Path, tmp_path: Path) -> None:
    """A few full fine-tuning steps on the bundled support-desk set: the loss on held-out answers
    (completion tokens only) falls. Short rows (the longer examples are left out), one thread, three
    steps of two rows: ~25 s of CPU (measured 3.8 -> 2.6 nats)."""
    import torch

    from lmforge.config import load_config
    from lmforge.train.loop import build, split_micro, train_step, val_batches
    from lmforge.train.start import resolve_config
    from lmforge.train.objectives import validation_loss

    data = prepare_sft(["support-chat"], tmp_path / "support", tokenizer=smollm2_dir, val_fraction=0.05, workers=1)
    cfg = resolve_config(load_config("sft-cpu", [f"init.from={smollm2_dir}", f"data.path={data}", "data.seq_len=128",
                                                 "train.global_batch=2", "train.micro_batch=2", "train.dtype=fp32",
                                                 "train.threads=1", "train.lr=1e-4", "train.warmup_steps=0"]))
    run = build(cfg, tmp_path / "run")

    def held_out() -> float:
        return validation_loss(run.model, run.objective, val_batches(cfg, 2, 2), dtype="fp32")

    before = held_out()
    for _ in range(3):
        batch = run.loader.next()
        r = train_step(run.model, run.optimizer, split_micro(batch, 2, torch.device("cpu")), lr=cfg.train.lr,
                       grad_clip=1.0, dtype="fp32", objective=run.objective)
        assert 0 < r.units == int(batch["loss_mask"].sum()) < int((batch["targets"] != -100).sum())  # answers only
    after = held_out()
    assert after < before - 0.3, (before, after)


# ---- evaluation with the chat template ----------------------------------------------------------------


def test_chat_generation_items_are_prompted_with_the_chat_template(chat_tokenizer_dir: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from lmforge.evaluate.harness import score_task
    from lmforge.evaluate.tasks import Task, parse_item

    tok = load_tokenizer(chat_tokenizer_dir)
    seen: list[tuple[list[int], list[int]]] = []

    def fake_generate(model, prompt, *, max_tokens, stop_ids, governor=None):  # the prompt and stops the harness builds
        seen.append((list(prompt), list(stop_ids)))
        return tok.encode("2 + 3 = 5.")

    monkeypatch.setattr("lmforge.generate.generate", fake_generate)
    monkeypatch.setattr("lmforge.quant.decoding_layout", lambda model: contextlib.nullcontext())  # no real weights here
    items = tuple(parse_item({"type": "gen", "chat": chat, "context": "What is 2 plus 3?", "target": "2 + 3 = 5."}, f"t:{i}")
                  for i, chat in enumerate((True, False)))
    model = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=64))
    assert score_task(model, tok, Task("t", "gen", items, "t"), batch_size=1) == {"exact_match": 1.0}
    (chat_prompt, chat_stops), (plain_prompt, plain_stops) = seen
    assert tok.decode(chat_prompt) == "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.hf.token_to_id("<|im_end|>") in chat_stops and plain_stops == [tok.eos_id]
    assert tok.decode(plain_prompt) == "What is 2 plus 3?"
    with pytest.raises(DataError, match=r't:9: "chat" must be true or false'):
        parse_item({"type": "gen", "chat": "yes", "context": "a", "target": "b"}, "t:9")
