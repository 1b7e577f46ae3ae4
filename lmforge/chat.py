"""Chat templates: a conversation -> text whose parts say who wrote them, and where each
assistant turn lies (what supervised fine-tuning trains on).

Design
------
A `ChatTemplate` is a Jinja template (a model's recorded one, one passed with --chat-template,
or the plain default below) rendered in Jinja's immutable sandbox (a template is code that came
with a model: it may not touch Python objects or mutate what it is given), with the variables
Hugging Face templates expect: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and
`raise_exception(message)`. Serving renders with `add_generation_prompt=True` (the model answers
next: serve/chat.py), training data without it (the conversation is complete: data/sft.py).

Control tokens: only the template's own text may hold them (`<|im_start|>` written by the
template becomes its id), never a message, so a user cannot smuggle an end-of-turn or a system
turn into the prompt. `parts` finds which text is whose by rendering twice (with the messages,
and with a marker in place of each message's content); `Tokenizer.encode_template` then reads
control tokens in the template's parts only.

Assistant turns (`assistant_spans`): the characters assistant message i adds are those between
the render of messages[:i] with the generation prompt (everything the model is given before it
answers) and the render of messages[:i+1] without it (the conversation through its answer). That
is the answer and whatever the template closes the turn with; the span is cut right after the
first end-of-turn token in it (`<|im_end|>`), so the newline a ChatML template writes after that
token (never generated: generation stops at the token) is not trained. This needs a template whose
renders of a conversation's beginnings are beginnings of its render (true of ChatML, Llama 3,
SmolLM2 and the default template); one that is not is refused by name.

The default template (`Role: content` lines, then `Assistant:`) has no end-of-turn token, so its
next turn (`DEFAULT_CHAT_STOP`) ends a reply; a model's own template ends turns with its end
token (`Tokenizer.end_ids`).

Trade-off: a template that changes the content it is given (`| trim`) cannot be split by the
marker; then the whole text counts as the template's if no message holds a special-token string,
and as plain text otherwise (a message must never become a control token, at the cost of the
template's own control tokens in that rare case).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import LmforgeError
from .tokenizer import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ("\nUser:", "\nSystem:")  # the default template's next turn


def special_token(tokenizer: Tokenizer, token_id: int | None) -> str | None:
    """The string of a control token (`<|eos|>`), or None for no token."""
    return None if token_id is None else tokenizer.hf.id_to_token(token_id)


def _raise(message: str) -> None:
    raise TemplateError(message)


class TemplateMismatch(LmforgeError):
    """A chat template whose render of a conversation's beginning is not the beginning of its
    render of the whole: the assistant turns cannot be located."""


class ChatTemplate:
    """A compiled chat template over a tokenizer; `source` is its text, `stop` the stop strings
    its replies need (the default template's next turn; none for a model's own template)."""

    def __init__(self, tokenizer: Tokenizer, source: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.stop: tuple[str, ...] = DEFAULT_CHAT_STOP if source is None else ()
        jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        jinja.globals["raise_exception"] = _raise
        try:
            self.template = jinja.from_string(self.source)
        except TemplateError as e:
            raise LmforgeError(f"the chat template does not parse: {e}") from None

    def parts(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, written_by_the_template) parts (see the module doc).
        Raises jinja2.TemplateError when the template fails on these messages."""
        text = self.render(messages, add_generation_prompt)
        marked = self.render([dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)], add_generation_prompt)
        pieces = re.split("\ue000(\\d+)\ue001", marked)  # template, index, template, index, ..., template
        parts = [(piece, True) if k % 2 == 0 else (messages[int(piece)]["content"], False) for k, piece in enumerate(pieces)]
        if "".join(t for t, _ in parts) == text:
            return parts
        specials = [t.content for t in self.tokenizer.hf.get_added_tokens_decoder().values() if t.special]
        clean = not any(sp in m["content"] for m in messages for sp in specials)
        return [(text, clean)]

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=special_token(self.tokenizer, self.tokenizer.bos_id),
                                    eos_token=special_token(self.tokenizer, self.tokenizer.eos_id))

    def assistant_spans(self, messages: Sequence[dict[str, str]]) -> list[tuple[int, int]]:
        """[start, end) character spans of every assistant turn in `render(messages, False)`: the
        answer and the template's close of the turn through its first end-of-turn token (module
        doc). Raises TemplateMismatch for a template whose prefixes do not render as prefixes."""
        full = self.render(messages, add_generation_prompt=False)
        ends = [s for s in (special_token(self.tokenizer, i) for i in self.tokenizer.end_ids) if s]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise TemplateMismatch(
                    "the chat template renders the start of a conversation differently from the start of its full "
                    f"render (at message {i}), so its assistant turns cannot be located; give a template whose "
                    "renders of a conversation's beginnings begin its render (ChatML, Llama 3 and SmolLM2 do)")
            start, end = len(before), len(through)
            after = start + (len(m["content"]) if full.startswith(m["content"], start) else 0)  # the answer may quote a token
            cuts = [k + len(tok) for tok in ends if (k := full.find(tok, after, end)) >= 0]
            spans.append((start, min(cuts) if cuts else end))
        return spans


__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_CHAT_STOP", "TemplateMismatch", "special_token"]
