"""Chat templates: a conversation -> the prompt's token ids.

Design
------
A `ChatTemplate` is a Jinja template (a model's recorded one, one passed with --chat-template,
or the plain default below) rendered in Jinja's immutable sandbox (a template is code that came
with a model: it may not touch Python objects or mutate what it is given), with the variables
Hugging Face templates expect: `messages`, `add_generation_prompt` (always true: the model
answers next), `bos_token`, `eos_token`, and `raise_exception(message)`.

Control tokens: only the template's own text may hold them (`<|im_start|>` written by the
template becomes its id), never a message, so a user cannot smuggle an end-of-turn or a system
turn into the prompt. `parts` finds which text is whose by rendering twice (with the messages,
and with a marker in place of each message's content); `Tokenizer.encode_template` then reads
control tokens in the template's parts only.

The default template (`Role: content` lines, then `Assistant:`) has no end-of-turn token, so
its next turn (`DEFAULT_CHAT_STOP`) ends a reply; a model's own template ends turns with its end
token (`Tokenizer.end_ids`).

Trade-off: a template that changes the content it is given (`| trim`) cannot be split by the
marker; then the whole text counts as the template's if no message holds a special-token string,
and as plain text otherwise (a message must never become a control token, at the cost of the
template's own control tokens in that rare case).
"""

from __future__ import annotations

import re

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LmforgeError
from ..tokenizer import Tokenizer
from .protocol import ApiError, ChatMessage

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

    def encode(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt for a conversation (400 for non-text content or a template that fails)."""
        plain = []
        for m in messages:
            if isinstance(m.content, list):
                if any(part.type != "text" for part in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(part.text or "" for part in m.content)
            else:
                content = m.content or ""
            plain.append({"role": m.role, "content": content})
        try:
            ids = self.tokenizer.encode_template(self.parts(plain))
        except TemplateError as e:
            raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        return ids or ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else [])

    def parts(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, written_by_the_template) parts (see the module doc)."""
        text = self._render(messages)
        marked = self._render([dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)])
        pieces = re.split("\ue000(\\d+)\ue001", marked)  # template, index, template, index, ..., template
        parts = [(piece, True) if k % 2 == 0 else (messages[int(piece)]["content"], False) for k, piece in enumerate(pieces)]
        if "".join(t for t, _ in parts) == text:
            return parts
        specials = [t.content for t in self.tokenizer.hf.get_added_tokens_decoder().values() if t.special]
        clean = not any(sp in m["content"] for m in messages for sp in specials)
        return [(text, clean)]

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token=special_token(self.tokenizer, self.tokenizer.bos_id),
                                    eos_token=special_token(self.tokenizer, self.tokenizer.eos_id))


__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_CHAT_STOP", "special_token"]
