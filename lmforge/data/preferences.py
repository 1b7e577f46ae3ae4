"""`lmforge prepare --dpo`: preference pairs -> token shards for DPO (train.objective: dpo).

Format (TRL's, one JSON object per line of a .jsonl file; other keys are ignored):

  {"prompt": "...", "chosen": "...", "rejected": "..."}             standard: plain text
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  conversational
  {"prompt": [messages], "chosen": "...", "rejected": "..."}        a reply as the assistant's text

Each pair becomes two documents of the dataset, the chosen sequence (prompt + chosen completion)
then the rejected one (prompt + rejected completion), rendered exactly as `prepare --sft` renders
a prompt / completion example (data/sft.py `Encoder`, one code path): a message prompt goes through
the model's own chat template and the completion is its assistant turn(s), each with its
end-of-turn token; a string prompt and completion are encoded separately and joined, the
model's end of turn appended (TRL's rule for its standard format, which applies no template). A
completion given as a string after a message prompt is the assistant's reply. The loss mask is on
the completion's tokens only: DPO compares the log-probability of the two completions given the
same prompt (train/objectives.py `DPO`).

The dataset has `"kind": "dpo"` and format version 3 (an older lmforge refuses it instead of
reading it as a token stream); its manifest's `dpo` entry counts the pairs and those skipped. The
loader reads it as `PreferencePairs` (data/loader.py): sample i is pair i.

A pair whose chosen and rejected render to the same tokens holds no preference (its DPO loss is
log 2 whatever the weights, and its gradient zero): it is counted and skipped, with one warning
naming the first (file:line). A pair longer than the training seq_len is left out at training
time and counted, never cut (as SFT examples are).

Bad input, one line each and nothing written: a record that is not an object, a missing field
(naming it, file:line), a completion given as messages after a string prompt, a completion with no
assistant turn, and what `prepare --sft` refuses in messages (unknown roles, non-string content).

Splits: from a hash of the pair's line (as prepare does), so a pair keeps its split when the file
grows; both sequences of a pair are in the same split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np

from ..errors import DataError
from ..jsonl import parse_jsonl
from ..util import human_count, warn
from .manifest import DPO_FORMAT_VERSION
from .prepare import _SplitWriter, _check_out, _check_val, _check_writable, _set_threads, _u, collect_sources, report, token_dtype, write_dataset
from .sft import Encoder, _bundled, _messages, end_of_turn, load_tokenizer

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    """One encoded pair: each sequence's ids and loss mask (uint8, 1: a completion token)."""

    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]
    source: int
    byte_offset: int
    u: float  # the record's hash in [0, 1): decides the split


@dataclass
class Stats:
    pairs: int = 0
    identical: int = 0  # chosen renders to the same tokens as rejected: skipped
    first_identical: str = ""
    templated: int = 0  # pairs with a message prompt (rendered with the chat template)
    longest: int = 0


def encode_pair(encoder: Encoder, record: Any, where: str) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], bool]:
    """((chosen ids, mask), (rejected ids, mask), templated) of one record (module docstring)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(map(repr, FIELDS))}, got {type(record).__name__}")
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise DataError(f"{where}: a preference pair needs \"prompt\", \"chosen\" and \"rejected\"; missing "
                        f"{', '.join(map(repr, missing))} (keys: {sorted(record)}); see docs/finetune.md#preference-tuning-dpo")
    prompt = record["prompt"]
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if isinstance(prompt, list):
        prompt = _messages(prompt, where, "prompt")  # named by their own key (the encoder would say "completion")
    out = []
    for key in ("chosen", "rejected"):
        completion = record[key]
        if isinstance(prompt, str) and not isinstance(completion, str):
            raise DataError(f"{where}: {key!r} must be a string after a string prompt (give the prompt as messages "
                            "for a conversational pair), got " + type(completion).__name__)
        if isinstance(prompt, list) and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]  # the reply to the prompt's conversation
        if not isinstance(completion, (str, list)):
            raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {type(completion).__name__}")
        if isinstance(completion, list):
            completion = _messages(completion, where, key)
        encoded = encoder.encode({"prompt": prompt, "completion": completion}, "prompt-completion", where)
        if encoded is None:
            raise DataError(f"{where}: {key!r} has no assistant turn: there is no reply to prefer")
        out.append(encoded)
    return out[0], out[1], isinstance(prompt, list)


def read_pairs(sources: Sequence[Any], encoder: Encoder, stats: Stats) -> list[Pair]:
    """Every pair of the JSONL sources, encoded (validated in full before anything is written)."""
    pairs: list[Pair] = []
    for index, src in enumerate(sources):
        if src.kind != "jsonl":
            raise DataError(f"{src.path}: prepare --dpo reads .jsonl files (one pair per line), not {src.path.suffix or 'this file'}")
        try:
            data = src.path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {src.path}: {e.strerror or e}") from None
        for line in parse_jsonl(data, src.path, what="one JSON object (a preference pair) per line, see docs/finetune.md"):
            chosen, rejected, templated = encode_pair(encoder, line.value, line.where)
            if chosen[0] == rejected[0]:
                stats.identical += 1
                stats.first_identical = stats.first_identical or line.where
                continue
            stats.pairs += 1
            stats.templated += templated
            stats.longest = max(stats.longest, len(chosen[0]), len(rejected[0]))
            end = data.find(b"\n", line.offset)
            raw = data[line.offset : end if end >= 0 else len(data)]
            pairs.append(Pair(*((np.asarray(ids), np.asarray(mask, dtype=np.uint8)) for ids, mask in (chosen, rejected)),
                              index, line.offset, _u(raw)))
    return pairs


def prepare_dpo(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a preference dataset at `out` (see the module docstring); returns its path."""
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
    encoder = Encoder(tok)
    stats = Stats()
    pairs = read_pairs(sources, encoder, stats)
    if encoder.plain and stats.templated:
        warn(f"the tokenizer {tokenizer} has no chat template: conversations are rendered with the plain template "
             "(`Role: content` lines); prepare with a model directory (--tokenizer models/NAME) to use its own")
    if stats.identical:
        warn(f"skipped {stats.identical} pair(s) whose chosen equals rejected (no preference to learn; "
             f"the first at {stats.first_identical})")
    if not pairs:
        why = " (every chosen equals its rejected)" if stats.identical else ""
        raise DataError(f"no preference pairs to train on in {', '.join(map(str, inputs))}{why}")
    val = [p.u < val_fraction for p in pairs]
    if not any(val) and val_fraction > 0 and len(pairs) >= 2:  # as prepare: the smallest hash goes to val
        val[min(range(len(pairs)), key=lambda i: pairs[i].u)] = True
    dtype = token_dtype(tok)

    def fill(writers: dict[str, _SplitWriter]) -> None:
        for p, is_val in zip(pairs, val):
            for ids, mask in (p.chosen, p.rejected):  # two consecutive documents: chosen, then rejected
                writers["val" if is_val else "train"].add(ids.astype(dtype), p.source, p.byte_offset, int(is_val), mask=mask)

    dpo = {"pairs": stats.pairs, "val_pairs": int(sum(val)), "identical_skipped": stats.identical,
           "chat_template": "plain" if encoder.plain else "model", "end_of_turn_id": end_of_turn(tok),
           "longest_sequence": stats.longest}
    splits = write_dataset(out, overwrite=overwrite, tok=tok, dtype=dtype, sources=sources, skipped=[],
                           val_fraction=val_fraction, shard_tokens=shard_tokens, fill=fill, masks=True,
                           extra={"kind": "dpo", "dpo": dpo}, format_version=DPO_FORMAT_VERSION)
    report(out, splits, tok, dtype, note=f"; {stats.pairs} pairs ({dpo['val_pairs']} val), the longest sequence "
           f"{stats.longest} tokens, {human_count(sum(int(m.sum()) for p in pairs for _, m in (p.chosen, p.rejected)))} completion tokens")
    _check_val(splits["val"], val_fraction)
    return out


__all__ = ["prepare_dpo", "encode_pair", "FIELDS"]
