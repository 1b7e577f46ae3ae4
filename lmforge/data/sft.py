"""`lmforge prepare --sft`: instruction / chat examples -> token shards with a loss mask per token.

Formats (TRL's, one JSON object per line of a .jsonl file; other keys of a record are ignored):

  {"text": "..."}                                   language modelling: every token trained
  {"messages": [{"role": "...", "content": "..."}]} a conversation (system / user / assistant,
                                                    any number of turns)
  {"prompt": "...", "completion": "..."}            a completion of a prompt; both may also be
                                                    message lists (TRL's conversational form)

Rendering: conversations go through the model's own chat template (lmforge/chat.py, the template
`serve` renders prompts with, so a model is trained on exactly what it will be served), encoded
with `Tokenizer.encode_template` (ids equal transformers' `apply_chat_template`; message text can
never become a control token). A tokenizer without a chat template gets the plain one
(`Role: content` lines), said once.

The loss mask (1: the token is a trained target). Default: the assistant turns only, EVERY one of
them (not only the last), each INCLUDING its end-of-turn token (`<|im_end|>`): a model that never
sees its end of turn trained never learns to stop. Which characters make an assistant turn is
lmforge/chat.py's `assistant_spans`; a token is trained when its characters overlap one.
`train_on_prompt` trains every token. `{"text"}`: every token, plus the document separator (EOS)
after it, as prepare writes pretraining text. String prompt/completion: the prompt and the
completion are encoded separately and joined (TRL's rule, so the boundary is exact), the
completion and the end-of-turn token appended after it are trained.

Documents: each example is one document of the dataset (document index, as prepare writes them;
no separator is added between conversations: the template delimits them). The loader packs whole
examples into rows and masks attention between them (data/loader.py `DocumentRows`); an example
longer than the training seq_len is left out at training time and counted, never cut mid-answer
(prepare does not know the seq_len a run will use).

Bad input, one line each and nothing written: a record in none of the formats, or in two; unknown
roles (naming file:line and the valid roles); a message without string content; a file whose
records change format (one format per file; different files may differ). A conversation with no
assistant turn is counted and skipped, with one warning naming the first (file:line).

Splits: as in prepare, from a hash of the record's line, so an example keeps its split when the
file grows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
from jinja2 import TemplateError

from .. import artifacts
from ..chat import ChatTemplate
from ..errors import CheckpointError, DataError
from ..jsonl import parse_jsonl
from ..tokenizer import TOKENIZER_FILE, Tokenizer
from ..util import human_count, warn
from .manifest import SFT_FORMAT_VERSION
from .prepare import _SplitWriter, _check_out, _check_val, _check_writable, _set_threads, _u, collect_sources, report, token_dtype, write_dataset

ROLES = ("system", "user", "assistant")
FORMATS = ("text", "messages", "prompt-completion")


@dataclass
class Example:
    """One encoded example: its ids, the loss mask (uint8, 1: trained target), where it came from."""

    ids: np.ndarray
    mask: np.ndarray
    source: int
    byte_offset: int
    u: float  # the record's hash in [0, 1): decides the split
    format: str


@dataclass
class Stats:
    formats: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FORMATS})
    no_assistant: int = 0
    first_no_assistant: str = ""
    longest: int = 0


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """--tokenizer for SFT: a tokenizer.json, or a model directory, run or checkpoint, whose recorded
    chat template and end of turn (tokenizer_config.json) come with it."""
    p = Path(path)
    if p.is_file() or (p.is_dir() and (p / TOKENIZER_FILE).is_file()):
        tok = Tokenizer.load(p)
        if p.is_dir():
            tok.use_model_facts(artifacts.tokenizer_facts(p))
        return tok
    try:
        origin = artifacts.resolve_origin(p)  # a run directory: its newest intact checkpoint
    except CheckpointError as e:
        raise DataError(f"--tokenizer {p}: {e}") from None
    tok = Tokenizer.load(origin.path / TOKENIZER_FILE)
    tok.use_model_facts(artifacts.tokenizer_facts(origin.path))
    return tok


def end_of_turn(tok: Tokenizer) -> int:
    """The token that ends a turn: the model's recorded end of turn (an instruct model's
    `<|im_end|>`), else the document separator."""
    ids = [i for i in tok.end_ids if i != tok.eos_id]
    if ids:
        return ids[0]
    if tok.eos_id is None:
        raise DataError("the tokenizer has no end-of-turn or EOS token to end a completion with")
    return tok.eos_id


class Encoder:
    """Records -> (ids, mask) with one tokenizer and chat template (module docstring)."""

    def __init__(self, tok: Tokenizer, *, train_on_prompt: bool = False) -> None:
        self.tok, self.train_on_prompt = tok, train_on_prompt
        self.template = ChatTemplate(tok, tok.chat_template)
        self.plain = tok.chat_template is None

    def format_of(self, record: Any, where: str) -> str:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        found = [f for f, keys in (("messages", ("messages",)), ("prompt-completion", ("prompt", "completion")),
                                   ("text", ("text",))) if all(k in record for k in keys)]
        if "chosen" in record and "rejected" in record:
            raise DataError(f"{where}: a preference pair (\"chosen\", \"rejected\"): prepare preference data with --dpo "
                            "instead of --sft (docs/finetune.md#preference-tuning-dpo)")
        if len(found) != 1:
            what = "two formats at once" if found else f"none of the formats (keys: {sorted(record)})"
            raise DataError(f"{where}: a record holds {what}; give exactly one of {{\"text\"}}, {{\"messages\"}}, "
                            "{\"prompt\", \"completion\"} (docs/finetune.md)")
        return found[0]

    def encode(self, record: dict[str, Any], fmt: str, where: str) -> tuple[list[int], list[int]] | None:
        """(ids, mask) of a record, or None for a conversation without an assistant turn."""
        if fmt == "text":
            text = _string(record, "text", where)
            ids = self.tok.encode(text) + [self._eos(where)]
            return ids, [1] * len(ids)
        if fmt == "prompt-completion" and isinstance(record["prompt"], str) and isinstance(record["completion"], str):
            prompt, completion = self.tok.encode(record["prompt"]), self.tok.encode(record["completion"]) + [end_of_turn(self.tok)]
            return prompt + completion, [int(self.train_on_prompt)] * len(prompt) + [1] * len(completion)
        if fmt == "prompt-completion":
            prompt, completion = _messages(record["prompt"], where, "prompt"), _messages(record["completion"], where, "completion")
            return self._conversation(prompt + completion, where, first_trained=len(prompt))
        return self._conversation(_messages(record["messages"], where, "messages"), where, first_trained=0)

    def _eos(self, where: str) -> int:
        if self.tok.eos_id is None:
            raise DataError(f"{where}: the tokenizer has no EOS token to end a text record with")
        return self.tok.eos_id

    def _conversation(self, messages: list[dict[str, str]], where: str, first_trained: int) -> tuple[list[int], list[int]] | None:
        if not any(m["role"] == "assistant" for m in messages[first_trained:]):
            return None
        try:
            ids, spans = self.tok.encode_template_spans(self.template.parts(messages, add_generation_prompt=False))
            turns = self.template.assistant_spans(messages)
        except TemplateError as e:
            raise DataError(f"{where}: the chat template fails on this conversation: {e}") from None
        if self.train_on_prompt:
            return ids, [1] * len(ids)
        # the assistant turns at or after first_trained (prompt-completion trains the completion's turns)
        index = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = [span for i, span in zip(index, turns) if i >= first_trained]
        mask = [int(any(a < e and s < b for s, e in trained)) for a, b in spans]
        return ids, mask


def _string(record: dict[str, Any], key: str, where: str) -> str:
    v = record[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def _messages(raw: Any, where: str, key: str) -> list[dict[str, str]]:
    """A validated message list: dicts with a known role and string content."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has the unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_examples(sources: Sequence[Any], encoder: Encoder, stats: Stats) -> list[Example]:
    """Every example of the JSONL sources, encoded (validated in full before anything is written)."""
    examples: list[Example] = []
    for index, src in enumerate(sources):
        if src.kind != "jsonl":
            raise DataError(f"{src.path}: prepare --sft reads .jsonl files (one example per line), not {src.path.suffix or 'this file'}")
        try:
            data = src.path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {src.path}: {e.strerror or e}") from None
        first: tuple[str, str] | None = None  # (format, where) of the file's first record
        for line in parse_jsonl(data, src.path, what="one JSON object (an example) per line, see docs/finetune.md"):
            fmt = encoder.format_of(line.value, line.where)
            if first is None:
                first = (fmt, line.where)
            elif fmt != first[0]:
                raise DataError(f"{line.where}: a {fmt} record in a file whose first record ({first[1]}) is {first[0]}; "
                                "one format per file (different files may differ)")
            encoded = encoder.encode(line.value, fmt, line.where)
            if encoded is None:
                stats.no_assistant += 1
                stats.first_no_assistant = stats.first_no_assistant or line.where
                continue
            ids, mask = encoded
            stats.formats[fmt] += 1
            stats.longest = max(stats.longest, len(ids))
            end = data.find(b"\n", line.offset)
            raw = data[line.offset : end if end >= 0 else len(data)]
            examples.append(Example(np.asarray(ids), np.asarray(mask, dtype=np.uint8), index, line.offset, _u(raw), fmt))
    return examples


def prepare_sft(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    train_on_prompt: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build an SFT dataset at `out` (see the module docstring); returns its path."""
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    _check_out(out, inputs, overwrite)
    _set_threads(workers)
    sources = collect_sources([_bundled(i) for i in inputs], include, exclude)
    _check_writable(out)
    tok = load_tokenizer(tokenizer)
    encoder = Encoder(tok, train_on_prompt=train_on_prompt)
    if encoder.plain:
        warn(f"the tokenizer {tokenizer} has no chat template: conversations are rendered with the plain template "
             "(`Role: content` lines); prepare with a model directory (--tokenizer models/NAME) to use its own")
    stats = Stats()
    examples = read_examples(sources, encoder, stats)
    if stats.no_assistant:
        warn(f"skipped {stats.no_assistant} conversation(s) with no assistant turn (nothing to train on; "
             f"the first at {stats.first_no_assistant})")
    if not examples:
        why = " (none has an assistant turn)" if stats.no_assistant else ""
        raise DataError(f"no examples to train on in {', '.join(map(str, inputs))}{why}")
    val = [e.u < val_fraction for e in examples]
    if not any(val) and val_fraction > 0 and len(examples) >= 2:  # as prepare: the smallest hash goes to val
        val[min(range(len(examples)), key=lambda i: examples[i].u)] = True
    dtype = token_dtype(tok)

    def fill(writers: dict[str, _SplitWriter]) -> None:
        for e, is_val in zip(examples, val):
            writers["val" if is_val else "train"].add(e.ids.astype(dtype), e.source, e.byte_offset, int(is_val), mask=e.mask)

    sft = {"formats": stats.formats, "train_on_prompt": train_on_prompt, "no_assistant_skipped": stats.no_assistant,
           "chat_template": "plain" if encoder.plain else "model", "end_of_turn_id": end_of_turn(tok),
           "longest_example": stats.longest,
           "trained_tokens": int(sum(int(e.mask.sum()) for e in examples))}
    splits = write_dataset(out, overwrite=overwrite, tok=tok, dtype=dtype, sources=sources, skipped=[],
                           val_fraction=val_fraction, shard_tokens=shard_tokens, fill=fill, masks=True,
                           extra={"kind": "sft", "sft": sft}, format_version=SFT_FORMAT_VERSION)
    report(out, splits, tok, dtype, note=f"; {len(examples)} examples ({', '.join(f'{n} {f}' for f, n in stats.formats.items() if n)}), "
           f"{human_count(sft['trained_tokens'])} trained tokens, the longest {stats.longest} tokens")
    _check_val(splits["val"], val_fraction)
    return out


def _bundled(path: str | os.PathLike) -> str | os.PathLike:
    """A bundled example set by name (`support-chat`), else the path as given."""
    from ..bundled import resolve_bundled

    p = Path(path)
    if p.exists() or str(p) != p.name:
        return path
    try:
        return resolve_bundled(path, "data")
    except DataError:
        return path  # collect_sources names the missing input


__all__ = ["prepare_sft", "Encoder", "load_tokenizer", "end_of_turn", "ROLES", "FORMATS"]
