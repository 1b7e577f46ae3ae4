"""Task files: small JSONL benchmarks, validated line by line.

Format (docs/eval.md): one JSON object per line; blank lines are ignored. The task's name is the
file's stem, and every line of a file is the same kind of item:

  multiple choice  {"context": "...", "choices": ["...", "...", ...], "gold": 0}
  cloze            {"context": "...", "target": "..."}
  generation       {"type": "gen", "context": "...", "target": "...", "stop": ["\\n"], "max_tokens": 32}
                   (+ "chat": true: the context is a user message, rendered with the model's chat
                   template as `serve` renders it; the reply ends at the model's end of turn)
  retrieval        a corpus and queries in one file (evaluate/retrieval.py scores it):
                   {"type": "doc", "id": "d1", "text": "..."}
                   {"type": "query", "id": "q1", "text": "...", "relevant": ["d1", ...]}
                   ("relevant" may also map doc ids to graded gains: {"d1": 2, "d2": 1})

Every item may carry an "id" (any string) and an explicit "type" ("mc", "cloze" or "gen"); without
"type", "choices" makes an item multiple choice and "target" makes it cloze. A choice or target is
scored as the exact text that follows the context, so it usually starts with a space or newline.

Design: validation reads the whole file before anything is scored and raises `DataError` naming
`file:line` and the field, so a typo costs a second, not an evaluation. Items are plain frozen
dataclasses; turning text into token requests (`encode_request`) lives here too, so the fast and the
naive scorer are fed exactly the same tokens.

Trade-off: no prompt templates, few-shot sampling or answer extraction: a task file holds the
final text. That keeps numbers reproducible and tasks easy to write for one's own domain; rich
suites belong to lm-evaluation-harness, which can be pointed at `lmforge serve`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from ..bundled import resolve_bundled
from ..errors import DataError
from ..jsonl import read_jsonl
from ..tokenizer import Tokenizer

KINDS = ("mc", "cloze", "gen", "retrieval")
_FIELDS = {
    "mc": {"id", "type", "context", "choices", "gold"},
    "cloze": {"id", "type", "context", "target"},
    "gen": {"id", "type", "context", "target", "stop", "max_tokens", "chat"},
    "doc": {"type", "id", "text"},
    "query": {"type", "id", "text", "relevant"},
}


@dataclass(frozen=True)
class Item:
    kind: str  # mc | cloze | gen
    context: str
    choices: tuple[str, ...] = ()  # mc
    gold: int = 0  # mc: index into choices
    target: str = ""  # cloze, gen
    stop: tuple[str, ...] = ("\n",)  # gen: generation ends at the first of these strings
    max_tokens: int = 32  # gen
    chat: bool = False  # gen: the context is a user message in the model's chat template
    id: str = ""
    where: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class Query:
    """A retrieval query and the gain of each relevant document (1 for a plain list)."""

    id: str
    text: str
    relevant: dict[str, float]
    where: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # mc | cloze | gen (items) | retrieval (docs and queries)
    items: tuple[Item, ...]
    path: str
    docs: tuple[tuple[str, str], ...] = ()  # retrieval: (id, text) in file order
    queries: tuple[Query, ...] = ()  # retrieval


def load_task(path: str | os.PathLike) -> Task:
    """Read and validate one task file, or a bundled task by name (`python-mc`; see bundled.py);
    DataError names file:line for the first bad line."""
    p = resolve_bundled(path, "task")
    if not p.is_file():
        raise DataError(f"task file {p} is not a file; give a JSONL task file")
    lines = [(where, raw) for where, _, _, raw in read_jsonl(p, what="one JSON object (an item) per line, see docs/eval.md")]
    if lines and isinstance(lines[0][1], dict) and lines[0][1].get("type") in ("doc", "query"):
        return _retrieval_task(p, lines)
    items = [parse_item(raw, where) for where, raw in lines]
    if not items:
        raise DataError(f"{p}: no items (expected one JSON object per line, see docs/eval.md)")
    kinds = {i.kind for i in items}
    if len(kinds) > 1:
        first = items[0]
        other = next(i for i in items if i.kind != first.kind)
        raise DataError(
            f"{other.where}: a {other.kind} item in a file whose first item ({first.where}) is {first.kind}; "
            "one kind of item per task file"
        )
    return Task(name=p.stem, kind=items[0].kind, items=tuple(items), path=str(p))


def _retrieval_task(p: Path, lines: list[tuple[str, Any]]) -> Task:
    """A retrieval task: "doc" and "query" lines in any order; every relevant id names a doc."""
    docs: dict[str, str] = {}
    queries: list[Query] = []
    for where, raw in lines:
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in ("doc", "query"):
            raise DataError(f"{where}: a retrieval task holds only {{\"type\": \"doc\"}} and {{\"type\": \"query\"}} "
                            f"lines (its first line is one), got {json.dumps(raw)[:80]}")
        unknown = sorted(set(raw) - _FIELDS[kind])
        if unknown:
            raise DataError(f"{where}: unknown field {unknown[0]!r} for a {kind} line (valid: {', '.join(sorted(_FIELDS[kind]))})")
        ident, text = _string(raw, "id", where, allow_empty=False), _string(raw, "text", where, allow_empty=False)
        if kind == "doc":
            if ident in docs:
                raise DataError(f"{where}: doc id {ident!r} appears twice; ids must be unique")
            docs[ident] = text
            continue
        rel = raw.get("relevant")
        if isinstance(rel, list) and all(isinstance(r, str) for r in rel):
            gains = {r: 1.0 for r in rel}
        elif isinstance(rel, dict) and all(isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0
                                           for g in rel.values()):
            gains = {r: float(g) for r, g in rel.items()}
        else:
            raise DataError(f"{where}: \"relevant\" must be a list of doc ids or an object of doc id -> gain > 0, "
                            f"got {rel!r}")
        if not gains:
            raise DataError(f"{where}: \"relevant\" is empty; a query needs at least one relevant doc")
        queries.append(Query(ident, text, gains, where))
    if not docs or not queries:
        raise DataError(f"{p}: a retrieval task needs at least one doc and one query line (docs/eval.md)")
    for q in queries:
        missing = sorted(set(q.relevant) - set(docs))
        if missing:
            raise DataError(f"{q.where}: relevant doc {missing[0]!r} is not a doc of this file")
    if len({q.id for q in queries}) != len(queries):
        raise DataError(f"{p}: two queries share an id; ids must be unique")
    return Task(name=p.stem, kind="retrieval", items=(), path=str(p), docs=tuple(docs.items()), queries=tuple(queries))


def parse_item(raw: Any, where: str) -> Item:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("type") in ("doc", "query"):
        raise DataError(f"{where}: a retrieval {raw['type']} line in a file whose first line is a task item; "
                        "put a retrieval task in a file of its own")
    kind = raw.get("type") or ("mc" if "choices" in raw else "cloze" if "target" in raw else None)
    if kind not in KINDS[:3]:
        if "type" in raw:
            raise DataError(f"{where}: \"type\" must be one of {', '.join(KINDS[:3])}, doc or query, got {raw['type']!r}")
        raise DataError(f"{where}: cannot tell the item's kind: give \"choices\" and \"gold\" (multiple choice) "
                        "or \"target\" (cloze), or a \"type\"")
    unknown = sorted(set(raw) - _FIELDS[kind])
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r} for a {kind} item (valid: {', '.join(sorted(_FIELDS[kind]))})")
    context = _string(raw, "context", where, allow_empty=True)
    item_id = str(raw.get("id", ""))
    if kind == "mc":
        choices = raw.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: \"choices\" must be a list of at least 2 strings")
        for i, c in enumerate(choices):
            if not isinstance(c, str) or not c:
                raise DataError(f"{where}: choices[{i}] must be a non-empty string, got {c!r}")
        if len(set(choices)) != len(choices):
            raise DataError(f"{where}: two choices are the same text; each must differ")
        gold = raw.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: \"gold\" must be the index of the right choice, 0..{len(choices) - 1}, got {gold!r}")
        return Item("mc", context, choices=tuple(choices), gold=gold, id=item_id, where=where)
    target = _string(raw, "target", where, allow_empty=False)
    if kind == "cloze":
        return Item("cloze", context, target=target, id=item_id, where=where)
    stop = raw.get("stop", ["\n"])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise DataError(f"{where}: \"stop\" must be a list of non-empty strings, got {stop!r}")
    max_tokens = raw.get("max_tokens", 32)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise DataError(f"{where}: \"max_tokens\" must be a positive integer, got {max_tokens!r}")
    chat = raw.get("chat", False)
    if not isinstance(chat, bool):
        raise DataError(f"{where}: \"chat\" must be true or false, got {chat!r}")
    return Item("gen", context, target=target, stop=tuple(stop), max_tokens=max_tokens, chat=chat, id=item_id, where=where)


def _string(raw: dict[str, Any], key: str, where: str, *, allow_empty: bool) -> str:
    if key not in raw:
        raise DataError(f"{where}: missing field {key!r}")
    v = raw[key]
    if not isinstance(v, str) or (not v and not allow_empty):
        raise DataError(f"{where}: {key!r} must be a {'' if allow_empty else 'non-empty '}string, got {v!r}")
    return v


# ---- text -> token requests --------------------------------------------------------------------


def context_ids(tokenizer: Tokenizer, context: str) -> list[int]:
    """Token ids of a context; an empty context becomes the document separator (as in
    lm-evaluation-harness, which uses its end-of-text token), so the first token has a condition."""
    ids = tokenizer.encode(context) if context else []
    if not ids:
        start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if start is None:
            raise DataError("an item has an empty context and the tokenizer has no EOS/BOS token to stand for it")
        ids = [start]
    return ids


def encode_request(tokenizer: Tokenizer, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, each continuation's ids) exactly as lm-evaluation-harness builds a
    loglikelihood request, so a task scores the same here and through `lmforge serve`:

    - the context's trailing whitespace moves to the front of every continuation (a context
      ending in "x = " is scored as "x =" followed by " 1", the way running text tokenizes);
    - the continuation's ids are what follows the context's own ids in the joint encoding
      of context + continuation (so a merge across the boundary is tokenized as in running text);
    - an empty context becomes the document separator (`context_ids`).

    Where the joint encoding would leave a continuation no ids of its own (BPE merged it into
    the context's last token), it is encoded alone instead of being scored as nothing.
    """
    head = context.rstrip()
    moved = context[len(head):]
    if not head:
        return context_ids(tokenizer, ""), [tokenizer.encode(moved + c) for c in continuations]
    ctx = tokenizer.encode(head)
    conts = []
    for c in continuations:
        ids = tokenizer.encode(head + moved + c)[len(ctx):]
        conts.append(ids if ids else tokenizer.encode(moved + c))
    return ctx, conts


__all__ = ["Item", "Query", "Task", "load_task", "parse_item", "context_ids", "encode_request", "KINDS"]
