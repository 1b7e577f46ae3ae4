"""The wire format of the OpenAI-compatible API: request bodies, errors, log-probs, response shapes.

Design
------
Everything here is about JSON in and JSON out, and nothing about the model or the engine, so a
route reads as "body -> engine requests -> events -> these shapes".

- Bodies are read by hand (`read_body`: size-limited, then `json.loads`, then `check_json`, then
  a strict pydantic model: JSON's types, no bool as a number, no "5" as 5), so malformed JSON, a
  wrong type, an unknown chat role or an oversized body is a 4xx whose OpenAI-shaped error names
  the field (`param`, and the message starts with it), never a 500. Validating a field at the
  edge belongs here, in its body model.
- `check_json` refuses, anywhere in a body (also in fields the server ignores), what Python's
  json module accepts but no model input can mean: nesting deeper than MAX_JSON_DEPTH (deeper
  bodies would exhaust the parser's recursion), NaN and Infinity (not JSON) and numbers beyond a
  float's range (1e999), and strings with a lone UTF-16 surrogate (`"\\ud800"`: not Unicode text,
  no tokenizer can encode it). Refusing beats repairing here: a prompt is never silently changed.
- `ApiError` is every refusal a route makes; the app turns it into `error_body` with its status
  (`code` is the status as a string, so an error event inside a stream, after a 200, still says
  what it was).
- Log-probs come as `Scored` triples (token id, log-prob, best alternatives) and are shaped as
  OpenAI's legacy completions format (a null first echoed log-prob; `text_offset`) or as chat's
  `content` list. A token's text is the decode of that token alone (`token_text`), so a token that
  ends inside a UTF-8 character shows U+FFFD there, as in OpenAI's and vLLM's output.
- `reply` is the envelope every completion, chat completion and stream chunk shares; `sse` frames
  one server-sent event, `SSE_DONE` ends a stream.

Trade-off: response objects are plain dicts, not pydantic models: they are built in one place
each and never parsed back, and a dict keeps the key order clients see obvious.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.requests import Request as HttpRequest

from ..generate import SEED_MAX, SEED_MIN
from ..tokenizer import lone_surrogate
from ..understand.index import MODES as SEARCH_MODES
from .engine import MAX_LOGPROBS, Prompt

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_JSON_DEPTH = 32  # arrays and objects inside each other; OpenAI's bodies need about 5

M = TypeVar("M", bound=BaseModel)
Scored = tuple[int, float | None, list[tuple[int, float]] | None]  # (token id, log-prob, best (id, log-prob))


# ---- request bodies ----------------------------------------------------------------------


# Every request model is strict: JSON's types, no coercion. A bool is not an int (`"max_tokens": true`
# is not 1), a string is not a number (`"5"`), 5.0 is not an int; an int is still a float. OpenAI
# refuses these too. `extra="ignore"`: clients send fields we do not use (user, ...).
STRICT = ConfigDict(extra="ignore", strict=True)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's; the template gets them as is


class GenerationBody(BaseModel):
    """The fields completions and chat completions share: sampling, n, streaming, stops."""

    model_config = STRICT

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension (vLLM's); 0 or -1 = off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # 64-bit signed, as OpenAI's; choice i uses nth_seed(seed, i)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # an extension (vLLM's): run to max_tokens (benchmarks)

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk that carries only the usage."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_required(cls, content: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")  # absent when the role itself was invalid
        if content is None and role is not None and role != "assistant":
            raise ValueError(f"a {role} message needs content (a string or a list of text parts); "
                             "only an assistant message may leave it out or null")
        return content


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeBody(BaseModel):
    model_config = STRICT
    prompt: str | None = None  # a text, or
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # a conversation, as chat renders it
    model: str | None = None


class DetokenizeBody(BaseModel):
    model_config = STRICT
    tokens: list[int]
    model: str | None = None


class EmbeddingBody(BaseModel):
    model_config = STRICT
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    input_type: Literal["document", "query"] = "document"  # an extension: which of the model's prefixes strings get


class ClassifyBody(BaseModel):
    """POST /v1/classify (an lmforge route: `lmforge serve clf/NAME`)."""

    model_config = STRICT
    input: str | list[str]
    model: str | None = None
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)  # overrides the classifier's recorded threshold


MAX_SEARCH_K = 100


class SearchBody(BaseModel):
    """POST /v1/search: the index the server was started with (--index)."""

    model_config = STRICT
    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=MAX_SEARCH_K)
    mode: Literal[SEARCH_MODES] | None = None  # type: ignore[valid-type]  # None: the index's own (lmforge index tune)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A body's `stop` as a tuple of strings (400 past MAX_STOP_STRINGS or for an empty one)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return tuple(stops)


# ---- errors and reading a body -----------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. `code` is a string or null there (the openai client reads it as one):
    here always the HTTP status as a string, so an error event inside a stream (sent after a 200)
    still says what it was. A message or param quoting a client's lone surrogate shows it escaped
    (it has no UTF-8 form, so the response could not be written)."""
    return {"error": {"message": _printable(message), "type": kind, "param": None if param is None else _printable(param),
                      "code": str(status)}}


def _printable(text: str) -> str:
    return text if lone_surrogate(text) is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_type(value: Any) -> str:
    if isinstance(value, _Constant):
        return value.token
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _describe(e: ValidationError) -> tuple[str, str | None]:
    """(message naming the first bad field, its dotted path) for a pydantic error."""
    first = e.errors()[0]
    loc = [p for p in first["loc"] if not isinstance(p, str) or p not in {"str", "list[str]", "list[int]", "list[list[int]]"}]
    where = ".".join(str(p) for p in loc)
    message = first["msg"].removeprefix("Value error, ")  # our own validators' messages
    if first["type"].endswith("_type") and len(loc) == len(first["loc"]):  # a wrong type, not one branch of a union:
        # say which JSON type came (`true` is not an integer)
        message += f", got {_json_type(first['input'])}"
    more = f" ({len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return f"{where or 'body'}: {message}{more}", where or None


class _Constant:
    """What json.loads makes of NaN, Infinity and -Infinity here: a marker check_json refuses."""

    def __init__(self, token: str) -> None:
        self.token = token


def check_json(data: Any) -> None:
    """400 naming the place of the first value in a parsed body that is nested deeper than
    MAX_JSON_DEPTH, a NaN / Infinity / out-of-range number, or a string (value or key) holding a
    lone surrogate. Iterative, in document order; a 1 MiB array of ids takes a few milliseconds."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            _check_depth(path)
            for key in value:
                if (i := lone_surrogate(key)) is not None:
                    where = _dotted((*path, key))
                    raise ApiError(400, f"{where}: the key holds a lone surrogate ({_escaped(key[i])} at character "
                                        f"{i}), which is not Unicode text", param=where)
            stack.extend(reversed([(v, (*path, k)) for k, v in value.items()]))
        elif isinstance(value, list):
            _check_depth(path)
            stack.extend(reversed([(v, (*path, i)) for i, v in enumerate(value)]))
        elif isinstance(value, str):
            if (i := lone_surrogate(value)) is not None:
                where = _dotted(path)
                raise ApiError(400, f"{where}: holds a lone surrogate ({_escaped(value[i])} at character {i}), "
                                    "which is not Unicode text; send valid UTF-8 or a surrogate pair", param=where)
        elif isinstance(value, _Constant):
            where = _dotted(path)
            raise ApiError(400, f"{where}: {value.token} is not a JSON number; send a finite number", param=where)
        elif isinstance(value, float) and not math.isfinite(value):
            where = _dotted(path)
            raise ApiError(400, f"{where}: the number is beyond a 64-bit float's range (about 1.8e308)", param=where)


def _escaped(char: str) -> str:
    return f"\\u{ord(char):04x}"


def _check_depth(path: tuple[str | int, ...]) -> None:
    if len(path) >= MAX_JSON_DEPTH:  # the body itself is level 1
        where = _dotted(path[:MAX_JSON_DEPTH])
        raise ApiError(400, f"{where}: nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects", param=where)


def _dotted(path: tuple[str | int, ...]) -> str:
    """A place in a body as `_describe` names it: messages.0.content."""
    return ".".join(map(str, path)) or "body"


async def read_body(request: HttpRequest, model: type[M], limit: int) -> M:
    """The request's JSON body as `model`: 413 past `limit` bytes, 400 for bad JSON (`check_json`)
    or types."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over this server's limit of {limit} bytes (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over this server's limit of {limit} bytes (--max-body-bytes)")
    try:
        data = json.loads(body, parse_constant=_Constant)
    except RecursionError:  # the parser recurses per level; far deeper than check_json allows
        raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(data)}")
    check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _describe(e)
        raise ApiError(400, message, param=param) from None


# ---- log-probs ---------------------------------------------------------------------------


def prompt_scores(ids: list[int], prompt: Prompt) -> list[Scored]:
    """An echoed prompt's tokens with their log-probs (the first has none: nothing precedes it)."""
    return list(zip(ids, prompt.logprobs, prompt.top))


def legacy_logprobs(scored: list[Scored], offset: int, token_text: Callable[[int], str]) -> dict[str, Any]:
    """OpenAI's legacy (completions) format; `offset` is the first token's place in the choice's
    text. A token without alternatives (top None: the first echoed one) gets a null entry."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in scored:
        s = token_text(token)
        out["tokens"].append(s)
        out["token_logprobs"].append(logprob)
        if top is None:
            out["top_logprobs"].append(None)
        else:
            best: dict[str, float] = {}
            for t, lp in top:  # best first; tokens that print alike keep the higher log-prob
                best.setdefault(token_text(t), lp)
            best.setdefault(s, logprob)  # the chosen token is always listed
            out["top_logprobs"].append(best)
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def chat_logprobs(scored: list[Scored], token_text: Callable[[int], str]) -> dict[str, Any]:
    """Chat's format: a `content` list with each token's text, log-prob, UTF-8 bytes and best ones."""
    def entry(t: int, lp: float | None) -> dict[str, Any]:
        s = token_text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in (top or [])])
                        for t, lp, top in scored]}


# ---- responses and streams ---------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reply(call_id: str, kind: str, model: str, choices: list[dict[str, Any]],
          used: dict[str, int] | None = None) -> dict[str, Any]:
    """The envelope of a response or a stream chunk (`kind`: "text_completion", "chat.completion",
    "chat.completion.chunk"); a stream's usage chunk has no choices."""
    out = {"id": call_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if used is not None:
        out["usage"] = used
    return out


def sse(obj: Any) -> str:
    """One server-sent event holding obj as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # OpenAI's end of a stream


__all__ = ["GenerationBody", "CompletionBody", "ChatBody", "ChatMessage", "ContentPart", "TokenizeBody",
           "DetokenizeBody", "EmbeddingBody", "ClassifyBody", "SearchBody", "MAX_SEARCH_K", "ApiError", "error_body",
           "read_body", "check_json", "MAX_JSON_DEPTH", "stop_strings", "Scored", "prompt_scores",
           "legacy_logprobs", "chat_logprobs", "usage", "reply", "sse", "SSE_DONE", "DEFAULT_COMPLETION_TOKENS",
           "MAX_STOP_STRINGS", "MAX_N"]
