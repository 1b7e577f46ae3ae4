"""`lmforge eval`: one checkpoint -> metrics (validation loss / perplexity / bits per byte, tasks).

Design: `evaluate_model` takes a loaded model and returns a flat {metric name: float} dict —
`loss`, `perplexity`, `bits_per_byte` for the text part and `<task>/<metric>` for each task file —
which the command prints and the sidecar (watch.py) records as `eval/<name>` in the store. Models
are loaded only through `artifacts.load_model` (verified checksums, safetensors, no
pickle). Evaluation runs in fp32 whatever the training dtype, so a number does not depend on the
autocast kernels of the machine that computed it.

Text source, in order: `--text FILE`, `--data DIR` (a prepared dataset's val split), else the
run config's `data.mix` datasets or its `data.path`. A prepared dataset must have been tokenized
with the checkpoint's tokenizer (sha256 compared), otherwise its token ids mean nothing to the model.

Per-source loss (docs/eval.md): for a run's `data.mix`, each dataset's metrics as `loss/NAME` (...)
and the overall ones as their means weighted by data.mix, as the trainer's val_loss; for a dataset
prepared from several inputs, each target counted for its document's input (`loss/INPUT`), the
overall loss unchanged (one reduction over all targets, as without inputs).
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config
from ..data.manifest import MANIFEST_FILE, read_manifest
from ..errors import DataError, LmforgeError
from ..jsonl import dumps_record
from ..threads import Governor, govern
from ..tokenizer import Tokenizer
from ..util import out as results_out  # command results: stdout, every progress mode
from ..util import progress_bar
from . import metrics as M
from .loss import dataset_batches, nll_by_input, nll_totals, stream_batches
from .score import make_request, score_naive, score_packed
from .tasks import Task, context_ids, encode_request, load_task


def score_task(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, *, batch_size: int,
               scorer: str = "packed", config: Config | None = None, governor: Governor | None = None,
               compile: bool = False) -> dict[str, float]:
    """Metrics of one task: mc -> acc, acc_norm; cloze -> acc, logprob; gen -> exact_match;
    retrieval -> ndcg@10, recall@1/10/100, mrr@10 (the pooling of `config`, fp32). compile: a
    generation task's decode step compiled (`generate.compile_decode`)."""
    max_len = model.cfg.max_seq_len
    if task.kind == "gen":
        return _generate_task(model, tokenizer, task, governor, compile)
    if task.kind == "retrieval":
        from ..understand.embed import Embedder
        from .retrieval import score_retrieval

        if config is None:
            raise LmforgeError(f"task {task.name}: a retrieval task needs the model's config (its embed: pooling)")
        return score_retrieval(Embedder.from_model(model, tokenizer, config, batch_size=batch_size, dtype="fp32"), task)
    requests = []
    for item in task.items:
        conts = item.choices if task.kind == "mc" else (item.target,)
        ctx, cont_ids = encode_request(tokenizer, item.context, conts)
        requests.append(make_request(ctx, cont_ids, max_len, item.where))
    if scorer == "packed":
        scores = score_packed(model, requests, batch_size=batch_size)
    elif scorer == "naive":
        scores = score_naive(model, requests)
    else:
        raise LmforgeError(f"unknown scorer {scorer!r}; use packed or naive")
    if task.kind == "mc":
        return M.mc_metrics([[s.logprob for s in row] for row in scores], [i.gold for i in task.items],
                            [i.choices for i in task.items])
    return M.cloze_metrics([row[0].greedy for row in scores], [row[0].logprob for row in scores])


def _generate_task(model: torch.nn.Module, tokenizer: Tokenizer, task: Task, governor: Governor | None,
                   compile: bool = False) -> dict[str, float]:
    """Greedy generation per item; a `chat` item's context is a user message in the model's chat
    template (lmforge/chat.py: the prompt `serve` would build), its reply ending at the model's end
    of turn (or the plain template's next turn). Decodes in the decoding layout (lmforge/quant.py),
    only while it decodes: scoring keeps the numbers of the layout the model was trained in. With
    `compile`, the decode step compiled instead (`generate.compile_decode`: it reads the weights
    row-major, the layout of training, so nothing is laid out; the compiled decode step touches
    nothing that scoring runs)."""
    from ..chat import ChatTemplate
    from ..generate import compile_decode, decode_compiled, generate
    from ..quant import decoding_layout

    template = ChatTemplate(tokenizer, tokenizer.chat_template) if any(i.chat for i in task.items) else None
    predictions = []
    if compile and not decode_compiled(model):
        compile_decode(model)
    with contextlib.nullcontext(model) if compile else decoding_layout(model):
        for item in task.items:
            if item.chat and template is not None:
                prompt = tokenizer.encode_template(template.parts([{"role": "user", "content": item.context}]))
                stop_ids, stops = list(tokenizer.end_ids), item.stop + template.stop
            else:
                prompt = context_ids(tokenizer, item.context)
                stop_ids, stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else [], item.stop
            new = generate(model, prompt, max_tokens=item.max_tokens, stop_ids=stop_ids, governor=governor)
            predictions.append(M.cut_at_stop(tokenizer.decode(new), stops))
    return M.exact_match(predictions, [i.target for i in task.items])


def text_source(cfg: Config, tokenizer: Tokenizer, *, data: str | None, text: str | None) -> tuple[str, str] | None:
    """("text", file) or ("data", dataset dir) to compute loss metrics on, or None when there is none."""
    if text:
        if not Path(text).is_file():
            raise DataError(f"--text: no such file: {text}")
        return "text", text
    if not data and cfg.data.mix:  # the run's datasets, each scored (`loss/NAME`): all of them, or none when one is not here
        here = [_dataset_here(p, tokenizer, given=False) for p in cfg.data.mix]
        return ("mix", "") if all(here) else None
    path = data or cfg.data.path
    if not path:
        return None
    return ("data", str(path)) if _dataset_here(path, tokenizer, given=bool(data)) else None


def _dataset_here(path: str, tokenizer: Tokenizer, *, given: bool) -> bool:
    """Whether `path` is a prepared dataset here (False for a run's dataset that is not: another
    machine, moved; a DataError when the user gave it); refused when its tokenizer is not the model's."""
    if not (Path(path) / MANIFEST_FILE).is_file():
        if given:
            raise DataError(f"--data: {path} is not a prepared dataset (no {MANIFEST_FILE}); run `lmforge prepare` or pass --text FILE")
        return False  # the run's dataset is not here (another machine, moved); tasks can still run
    sha = read_manifest(path).get("tokenizer_sha256")
    if sha != tokenizer.sha256:
        raise DataError(
            f"{path} was prepared with another tokenizer (sha256 {str(sha)[:12]}…) than the checkpoint's "
            f"({tokenizer.sha256[:12]}…); its token ids mean nothing to this model. Pass --text FILE instead"
        )
    return True


def _dataset_loss(model: torch.nn.Module, tokenizer: Tokenizer, cfg: Config, path: str, *, seq_len: int, batch_size: int,
                  max_batches: int, progress: Progress, governor: Governor | None, by_input: bool = True) -> dict[str, float]:
    """loss, perplexity, bits_per_byte on a prepared dataset's val split, read as the run read its
    data (SFT rows, document masking); for a dataset prepared from several inputs (by_input), the
    same per input as `loss/NAME` (each target counts for the input its document came from)."""
    from ..data.loader import open_source
    from ..data.manifest import input_names

    d = cfg.data
    manifest = read_manifest(path)
    names = input_names(manifest) if by_input and manifest.get("kind", "text") != "dpo" else []
    n_windows = open_source(path, "val", seq_len=seq_len, document_mask=d.document_mask, packing=d.packing).n_samples
    batches = dataset_batches(path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
                              document_mask=d.document_mask, packing=d.packing, inputs=len(names) > 1)
    total = -(-n_windows // batch_size)
    if max_batches:
        total = min(total, max_batches)
    bar = progress.add_task(f"loss on {Path(path).name}", total=total)
    counted = _counted(batches, progress, bar, governor)
    if len(names) < 2:
        return M.loss_metrics(*nll_totals(model, counted, tokenizer.token_nbytes()))
    overall, per = nll_by_input(model, counted, tokenizer.token_nbytes(), len(names))
    return M.loss_metrics(*overall) | {f"{k}/{name}": v for name, totals in zip(names, per)
                                       for k, v in M.loss_metrics(*totals).items()}


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    cfg: Config,
    *,
    tasks: list[Task],
    source: tuple[str, str] | None,
    batch_size: int,
    max_batches: int = 0,
    scorer: str = "packed",
    show_progress: bool = True,
    governor: Governor | None = None,
    compile: bool = False,
) -> dict[str, float]:
    """Flat {name: value}: loss/perplexity/bits_per_byte on `source`, then `<task>/<metric>`.
    governor: told each batch's time (lmforge/threads.py: fewer threads while the machine is busy).
    compile: generation tasks decode with the decode step compiled (`eval --compile`)."""
    model.eval()
    out: dict[str, float] = {}
    seq_len = min(cfg.data.seq_len, model.cfg.max_seq_len)
    with _progress(show_progress) as progress:
        if source is not None:
            kind, path = source
            if kind == "text":
                if Path(path).stat().st_size == 0:
                    raise DataError(f"--text {path}: the file is empty")
                pieces = encoded(tokenizer, text_pieces(path))
                if tokenizer.eos_id is None:  # no document separator: the text's first token starts it
                    first = next(pieces)
                    pieces, start = itertools.chain([first[1:]], pieces), first[0]
                else:
                    start = tokenizer.eos_id
                batches = stream_batches(pieces, start_id=start, seq_len=seq_len, batch_size=batch_size)
                if max_batches:
                    batches = itertools.islice(batches, max_batches)
                total = max_batches or None  # the number of windows is known only at the end of a streamed text
                bar = progress.add_task(f"loss on {Path(path).name}", total=total)
                nll, tokens, nbytes = nll_totals(model, _counted(batches, progress, bar, governor), tokenizer.token_nbytes())
                out.update(M.loss_metrics(nll, tokens, nbytes))
            elif kind == "data":
                out.update(_dataset_loss(model, tokenizer, cfg, path, seq_len=seq_len, batch_size=batch_size,
                                         max_batches=max_batches, progress=progress, governor=governor))
            else:  # "mix": each of the run's data.mix datasets, and their mean weighted as the run mixed them
                from ..data.mix import input_names

                paths = list(cfg.data.mix)
                per = {name: _dataset_loss(model, tokenizer, cfg, p, seq_len=seq_len, batch_size=batch_size,
                                           max_batches=max_batches, progress=progress, governor=governor, by_input=False)
                       for name, p in zip(input_names(paths), paths)}
                weights = {name: cfg.data.mix[p] for name, p in zip(per, paths) if cfg.data.mix[p] > 0}
                loss = sum(w * per[n]["loss"] for n, w in weights.items()) / sum(weights.values())
                bpb = sum(w * per[n]["bits_per_byte"] for n, w in weights.items()) / sum(weights.values())
                out.update({"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "bits_per_byte": bpb})
                out.update({f"{k}/{name}": v for name, values in per.items() for k, v in values.items()})
        for task in tasks:
            size = f"{len(task.queries)} queries, {len(task.docs)} docs" if task.kind == "retrieval" else len(task.items)
            bar = progress.add_task(f"{task.name} ({size} {task.kind})", total=1)
            for k, v in score_task(model, tokenizer, task, batch_size=batch_size, scorer=scorer, config=cfg,
                                   governor=governor, compile=compile).items():
                out[f"{task.name}/{k}"] = v
            progress.advance(bar)
    return out


# `eval --text` reads and tokenizes its file in pieces of at most this many characters, TEXT_PIECES of
# them per encode_batch call (the tokenizer's threads share them), so memory is bounded by
# TEXT_PIECE_CHARS * TEXT_PIECES whatever the file (a 50 MB file of one line passed 8.9 GB read whole).
TEXT_PIECE_CHARS = 1 << 16
TEXT_PIECES = 16


def encoded(tokenizer: Tokenizer, pieces: Iterator[str]) -> Iterator[list[int]]:
    """The token ids of each text piece, encoded TEXT_PIECES at a time."""
    group: list[str] = []
    for piece in itertools.chain(pieces, [None]):
        if piece is not None:
            group.append(piece)
        if group and (piece is None or len(group) == TEXT_PIECES):
            yield from tokenizer.encode_batch(group)
            group = []


def text_pieces(path: str | os.PathLike, piece_chars: int = TEXT_PIECE_CHARS) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of at most `piece_chars` characters, read as it goes.

    The cut rule: after the last newline within the piece's last half; else before the last space
    there (byte-level BPE starts a word's token with its space, so the word stays whole); else at
    the character limit (a code point boundary: a UTF-8 character is never split). No token spans
    a cut, so the tokens equal those of the whole text except at cuts, where a run of whitespace or
    a word longer than half a piece may be split into more tokens (one cut per ~64K characters).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(piece_chars)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
            try:
                carry += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise DataError(f"--text {path}: not UTF-8 text (byte {offset - pending + e.start} is not valid UTF-8)") from None
            offset += len(chunk)
            while len(carry) > piece_chars or (not chunk and carry):  # more than a piece: one can be cut by the rule
                cut = _cut(carry, piece_chars)
                yield carry[:cut]
                carry = carry[cut:]
            if not chunk:
                return


def _cut(text: str, limit: int) -> int:
    """Where a piece of `text` ends (see text_pieces): all of it when it is within the limit."""
    if len(text) <= limit:
        return len(text)
    half = limit // 2
    newline = text.rfind("\n", half, limit)
    if newline >= 0:
        return newline + 1
    space = text.rfind(" ", half, limit)
    return space if space > 0 else limit


def _counted(batches, progress: Progress, bar, governor: Governor | None = None) -> Any:
    for b in batches:
        start = time.perf_counter()
        yield b  # the caller scores the batch before asking for the next
        if governor is not None:
            governor.step(time.perf_counter() - start, work=b["inputs"].numel())
        progress.advance(bar)


def _progress(show: bool) -> Progress:
    bar = progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    bar.disable = bar.disable or not show
    return bar


def load_tasks(paths: list[str], retrieval: list[str] | None = None) -> list[Task]:
    """Task files (any kind) and `--retrieval` files (which must be retrieval tasks), validated."""
    tasks = [load_task(p) for p in paths]
    for p in retrieval or []:
        task = load_task(p)
        if task.kind != "retrieval":
            raise DataError(f"--retrieval {p}: a {task.kind} task, not a retrieval task (doc and query lines, "
                            "docs/eval.md); give it to --tasks")
        tasks.append(task)
    names = [t.name for t in tasks]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"two task files share the name {sorted(dup)[0]!r} (the file stem names the task); rename one")
    return tasks


def own_tasks(cfg: Config) -> list[Task]:
    """The tasks a run brings itself: a contrastive run's val pairs as a retrieval task (retrieval.pairs_task)."""
    from .retrieval import pairs_task

    task = pairs_task(cfg)
    return [task] if task is not None else []


def check_eval_options(data: str | None, text: str | None, batch_size: int | None, max_batches: int) -> None:
    """The argument checks `lmforge eval` and its --watch sidecar share (before any model loads)."""
    if data and text:
        raise LmforgeError("give --data or --text, not both")
    if batch_size is not None and batch_size < 1:
        raise LmforgeError(f"--batch-size must be >= 1, got {batch_size}")
    if max_batches < 0:
        raise LmforgeError(f"--max-batches must be >= 0 (0 = all), got {max_batches}")


def eval_command(
    path: str | os.PathLike,
    *,
    tasks: list[str] | None,
    data: str | None,
    text: str | None,
    batch_size: int | None,
    threads: int | None,
    max_batches: int,
    as_json: bool,
    scorer: str = "packed",
    retrieval: list[str] | None = None,
    compile: bool = False,
) -> int:
    """`lmforge eval RUN_OR_CKPT`: print the metrics of one checkpoint (newest intact of a run)."""
    from ..artifacts import load_model

    check_eval_options(data, text, batch_size, max_batches)
    task_list = load_tasks(list(tasks or []), retrieval)  # validate task files before loading any model
    # up to --threads (or all cores), powers of two: a checkpoint's metrics do not depend on the count (lmforge/threads.py)
    governor = govern(threads, exact=True)
    loaded = load_model(path)  # as trained: generation tasks decode in the decoding layout (_generate_task)
    model, tokenizer, cfg, origin = loaded.model, loaded.tokenizer, loaded.config, loaded.origin
    bs = batch_size or cfg.eval.batch_size
    source = None if retrieval and not (data or text or tasks) else text_source(cfg, tokenizer, data=data, text=text)
    if not (tasks or retrieval or data or text):
        task_list = own_tasks(cfg)  # a contrastive run: its val pairs as a retrieval task
    if source is None and not task_list:
        raise DataError(
            f"nothing to evaluate: the run's data ({', '.join(cfg.data.datasets) or 'data.path unset'}) is not a prepared dataset here "
            "and no --tasks were given; pass --data DIR, --text FILE or --tasks FILE.jsonl (or a bundled task, e.g. python-mc)"
        )
    results = evaluate_model(model, tokenizer, cfg, tasks=task_list, source=source, batch_size=bs,
                             max_batches=max_batches, scorer=scorer, show_progress=not as_json, governor=governor,
                             compile=compile)
    if as_json:
        print(dumps_record({"checkpoint": str(path), "step": origin.step, "metrics": results}, indent=2))
        return 0
    table = Table(title=f"{path} ({origin.describe()})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.4f}")
    results_out.print(table)
    return 0


__all__ = ["evaluate_model", "score_task", "text_source", "load_tasks", "own_tasks", "eval_command"]
