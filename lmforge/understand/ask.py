"""`lmforge ask`: answer a question from an index's documents, citing the sources it used.

Design
------
1. Retrieve: the index's search (`Searcher`, hybrid by default) gives the k best chunks.
2. Prompt: one user turn holding the numbered sources (`[1] path:lines` and the chunk's text) and
   the question, with the instruction to answer from the sources and cite them as [n]. A model
   with a chat template (its recorded one, or --chat-template) gets that turn through its template
   (`serve.chat.ChatTemplate`: control tokens only from the template, never from a document); a
   base model gets the same text as a plain completion prompt ending in "Answer:".
3. Fit the context: the answer keeps `max_tokens` of room (at most half the model's context); the
   sources fill the rest, and the lowest-ranked ones that do not fit are dropped, which ask
   reports (it never truncates a source mid-way or lets generation slide the window).
4. Generate: `generate.stream`, greedy by default, until the model's end of turn / end of text,
   the template's stop strings, or `max_tokens`.
5. Cite: the answer's [n] markers name the sources it cites; they are printed after the answer
   as `[n] path:lines`. --json returns the answer, the cited and every retrieved source.

The generating model and the embedding model may differ (a chat model answering over an index
built by an embedding model); when they are the same weights, they are loaded once.

Trade-offs: the answer is printed when complete (not streamed), since a stop string can only be
cut once it is whole; citations are whatever [n] the model writes, so a model that cites nothing
gets its retrieved sources listed as such, never invented citations.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LmforgeError
from ..tokenizer import StreamDecoder, lone_surrogate
from ..util import console
from ..util import out as results_out
from .index.store import Hit

INSTRUCTION = ("Answer the question using only the numbered sources below. Cite the sources you use as [1], [2], ... "
               "If the sources do not hold the answer, say so.")
_CITE = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit]  # the retrieved chunks that went into the prompt, source n = sources[n - 1]
    retrieved: list[Hit]  # every retrieved chunk, best first (sources is a prefix of it)
    cited: list[int]  # the source numbers the answer cites, in order of first citation
    prompt_tokens: int
    answer_tokens: int

    def to_dict(self) -> dict[str, Any]:
        def source(n: int, h: Hit) -> dict[str, Any]:
            return {"n": n, "where": h.where(), "in_prompt": n <= len(self.sources), "cited": n in self.cited, **h.to_dict()}

        return {"question": self.question, "answer": self.text, "cited": self.cited,
                "sources": [source(n, h) for n, h in enumerate(self.retrieved, 1)],
                "dropped": len(self.retrieved) - len(self.sources), "prompt_tokens": self.prompt_tokens,
                "answer_tokens": self.answer_tokens}


def render_sources(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{n}] {h.where()}\n{h.text.strip()}" for n, h in enumerate(hits, 1))


def user_turn(question: str, hits: list[Hit]) -> str:
    return f"{INSTRUCTION}\n\nSources:\n\n{render_sources(hits)}\n\nQuestion: {question}"


class Prompter:
    """Turns (question, sources) into prompt token ids: through a chat template, or plain."""

    def __init__(self, tokenizer: Any, template: str | None) -> None:
        from ..serve.chat import ChatTemplate

        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer, template) if template is not None else None
        self.stop: tuple[str, ...] = self.chat.stop if self.chat is not None else ("\nQuestion:",)

    def encode(self, question: str, hits: list[Hit]) -> list[int]:
        from jinja2 import TemplateError

        text = user_turn(question, hits)
        if self.chat is None:  # a base model: the same text, as a document to continue
            ids = self.tokenizer.encode(f"{text}\nAnswer:")
            return ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + ids
        try:
            return self.tokenizer.encode_template(self.chat.parts([{"role": "user", "content": text}]))
        except TemplateError as e:
            raise LmforgeError(f"the chat template failed on the prompt: {e}") from None


def fit(prompter: Prompter, question: str, hits: list[Hit], budget: int) -> tuple[list[int], list[Hit]]:
    """The prompt with as many of the best-ranked sources as fit in `budget` tokens."""
    for n in range(len(hits), -1, -1):
        ids = prompter.encode(question, hits[:n])
        if len(ids) <= budget:
            return ids, hits[:n]
    raise LmforgeError(f"the prompt without sources (instruction and question) takes {len(ids)} tokens, more than the "
                       f"{budget} the model's context leaves beside the answer; shorten the question or lower --max-tokens")


def cited(text: str, n_sources: int) -> list[int]:
    """Source numbers cited as [n] in the answer (within 1..n_sources), in order of first citation."""
    seen: list[int] = []
    for m in _CITE.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= n_sources and n not in seen:
            seen.append(n)
    return seen


def ask(index_path: str | os.PathLike, question: str, *, model: str | os.PathLike, k: int = 5,
        mode: str | None = None, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
        embed_model: str | os.PathLike | None = None, chat_template: str | None = None,
        threads: int | None = None, compile: bool = False) -> Answer:
    """Retrieve, prompt, generate and cite (module docstring). threads: as every computing verb's
    --threads (lmforge/threads.py: 0 or None, lmforge chooses and adapts). compile: the answer's
    decode step compiled, as `sample --compile` (`generate.compile_decode`)."""
    from ..artifacts import load_model
    from ..generate import check_sampling, compile_decode, compile_wait, stream
    from ..quant import prepare
    from ..threads import govern
    from .embed import Embedder, Pooling
    from .index.search import Searcher, Settings, check_embedder, load_embedder
    from .index.store import Index

    if not question.strip():
        raise LmforgeError("the question is empty")
    if lone_surrogate(question) is not None:
        raise LmforgeError("the question is not valid UTF-8 text; pass it as UTF-8")
    if max_tokens < 1:
        raise LmforgeError(f"--max-tokens must be >= 1, got {max_tokens}")
    check_sampling(temperature, 0, 1.0, seed)
    governor = govern(threads)
    with Index.open(index_path) as index:
        loaded = load_model(model)
        mode = mode or Settings.of(index).mode  # None: the index's own (lmforge index tune)
        if mode == "bm25":
            embedder = None
        elif embed_model is None and loaded.origin.model_sha256 == index.fingerprint.get("model_sha256"):
            embedder = Embedder(loaded, Pooling.from_dict(index.fields["pooling"]))  # the same weights: loaded once
            check_embedder(index, embedder)
        else:
            embedder = load_embedder(index, embed_model)
        retrieved = Searcher(index, embedder).search(question, k=k, mode=mode)
    if not hasattr(loaded.model, "weights"):  # retrieval is done: lay the weights out for decoding, as sample does
        prepare(loaded.model, "fp32", compiled=compile)
    if compile:
        compile_decode(loaded.model)
        console.print(f"compiling the decode step (--compile): the answer's first token takes {compile_wait(loaded.model)}",
                      markup=False)
    tok, context = loaded.tokenizer, loaded.model.cfg.max_seq_len
    room = min(max_tokens, context // 2)
    if room < max_tokens:
        console.print(f"the answer is limited to {room} tokens: half the model's context of {context}")
    prompter = Prompter(tok, chat_template or tok.chat_template)
    ids, sources = fit(prompter, question, retrieved, context - room)
    if len(sources) < len(retrieved):
        console.print(f"dropped the {len(retrieved) - len(sources)} lowest-ranked of {len(retrieved)} sources: "
                      f"they do not fit the model's context of {context} tokens beside a {room}-token answer")
    decoder, text, n = StreamDecoder(tok), "", 0
    for token in stream(loaded.model, ids, max_tokens=room, temperature=temperature, seed=seed, stop_ids=tok.end_ids,
                        governor=governor):
        n += 1
        text += decoder.push(token)
        if any(s in text for s in prompter.stop):
            break
    text += decoder.flush()
    for s in prompter.stop:
        text = text.split(s, 1)[0]
    text = text.strip()
    return Answer(question, text, sources, retrieved, cited(text, len(sources)), len(ids), n)


def ask_command(index_path: str, question: str, *, model: str, k: int = 5, mode: str | None = None,
                max_tokens: int = 256, temperature: float = 0.0, seed: int = 0, embed_model: str | None = None,
                chat_template: str | None = None, as_json: bool = False, threads: int | None = None,
                compile: bool = False) -> int:
    """Print the answer, then its cited sources (`[n] path:lines`); --json: everything."""
    template = None
    if chat_template is not None:
        try:
            template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise LmforgeError(f"cannot read the chat template {chat_template}: {e.strerror or e}") from None
    answer = ask(index_path, question, model=model, k=k, mode=mode, max_tokens=max_tokens, temperature=temperature,
                 seed=seed, embed_model=embed_model, chat_template=template, threads=threads, compile=compile)
    if as_json:
        print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return 0
    results_out.print(answer.text or "(no answer)", markup=False, highlight=False)
    results_out.print()
    if answer.cited:
        results_out.print("[bold]Sources[/]")
        for n in answer.cited:
            results_out.print(f"[{n}] {answer.sources[n - 1].where()}", markup=False)
    elif answer.sources:
        results_out.print("[bold]Sources retrieved[/] (the answer cites none)")
        for n, h in enumerate(answer.sources, 1):
            results_out.print(f"[{n}] {h.where()}", markup=False)
    else:
        results_out.print("no source fitted the model's context; the answer is the model's alone")
    return 0


__all__ = ["INSTRUCTION", "Answer", "Prompter", "user_turn", "render_sources", "fit", "cited", "ask", "ask_command"]
