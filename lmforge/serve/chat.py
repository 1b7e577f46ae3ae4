"""Chat templates for serving: a request's messages -> the prompt's token ids.

The template itself (rendering in Jinja's sandbox, which text is whose, the plain default) lives
in lmforge/chat.py, shared with the SFT data path (data/sft.py), so a model is trained on exactly
the prompts it is served with. This module adds what a request needs: OpenAI content parts
joined into text, the generation prompt (the model answers next), and failures as HTTP 400.
"""

from __future__ import annotations

from jinja2 import TemplateError

from .. import chat
from ..chat import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, special_token
from .protocol import ApiError, ChatMessage


class ChatTemplate(chat.ChatTemplate):
    """lmforge.chat.ChatTemplate with `encode` for a request's messages."""

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
            ids = self.tokenizer.encode_template(self.parts(plain, add_generation_prompt=True))
        except TemplateError as e:
            raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        return ids or ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else [])


__all__ = ["ChatTemplate", "DEFAULT_CHAT_TEMPLATE", "DEFAULT_CHAT_STOP", "special_token"]
