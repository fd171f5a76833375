"""What a client may ask for: the request body, checked field by field into a `Request`, and `BadRequest`, the
refusal every layer of the server raises and the handler turns into an OpenAI error body."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import is_int, is_number
from ..engine.logprobs import MAX_TOP


class BadRequest(ValueError):
    """A request the server refuses, with HTTP `status` (400 unless said); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Request:
    kind: str  # "chat" or "completion"
    prompt: Any  # the messages for chat, the prompt string for completion
    max_tokens: int | None  # None: the client did not say (the server's default, within the context)
    stream: bool
    stop: list[str]
    sampling: dict[str, Any]  # temperature, top_p, top_k, seed: only those the client sent
    tools: Any = None  # chat: OpenAI function tools; conversation.prepare checks these three
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    rendered: Any = None  # the prompt, rendered once (conversation.Rendered)
    logprobs: int | None = None  # None: none; k: every completion token's log-prob and its top k (logprobs.py)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))


# Types only: the engine checks ranges (temperature >= 0, top_p in (0, 1], ...) and its ValueError becomes a 400.
_SAMPLING = {"temperature": (is_number, "a number"), "top_p": (is_number, "a number"),
             "top_k": (is_int, "an integer"), "seed": (is_int, "an integer")}


def _field(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:  # OpenAI clients send null for "not set"
        return default
    if not check(value):
        raise BadRequest(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    return messages  # each message is checked where it is rendered (conversation.prepare)


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    return prompt


# OpenAI fields this server cannot honour, each with the values that ask for nothing more: anything else is
# refused, not silently ignored.
_UNSUPPORTED = {
    "n": (lambda v: is_int(v) and v == 1, "one completion per request"),
    "best_of": (lambda v: is_int(v) and v == 1, "one completion per request"),
    # Each of these changes the output in a way decoding the model's own distribution cannot honour.
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") == "text", "free text only"),
    "logit_bias": (lambda v: v == {}, "the model's own distribution, unbiased"),
    "presence_penalty": (lambda v: is_number(v) and v == 0, "the model's own distribution, no penalties"),
    "frequency_penalty": (lambda v: is_number(v) and v == 0, "the model's own distribution, no penalties"),
    "functions": (lambda v: v == [], "no function calling"),
    "function_call": (lambda v: v == "none", "no function calling"),
}


def _logprobs(kind: str, body: Mapping[str, Any]) -> int | None:
    """How many top alternatives per token the request asks for (None: no log-probs). Chat: `logprobs: true` and
    `top_logprobs` 0..20; legacy completions: `logprobs` 0..20 (OpenAI's went to 5)."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if kind != "chat":
        if top is not None:
            raise BadRequest("'top_logprobs' is a chat field; completions take 'logprobs': <count>", "top_logprobs")
        if logprobs is not None and not (is_int(logprobs) and 0 <= logprobs <= MAX_TOP):
            raise BadRequest(f"'logprobs' must be an integer in [0, {MAX_TOP}] (top tokens per position), got "
                             f"{logprobs!r}", "logprobs")
        return logprobs
    _field(body, "logprobs", lambda v: isinstance(v, bool), "a boolean")
    _field(body, "top_logprobs", lambda v: is_int(v) and 0 <= v <= MAX_TOP, f"an integer in [0, {MAX_TOP}]")
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if logprobs else None


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, (harmless, what) in _UNSUPPORTED.items():
        if body.get(name) is not None and not harmless(body[name]):
            raise BadRequest(f"'{name}' is not supported: this server gives {what}; leave it out", name)


def parse_request(kind: str, body: Any) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unsupported(body)
    prompt = _messages(body) if kind == "chat" else _prompt(body)
    # Newer chat clients send max_completion_tokens instead of max_tokens.
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, limit, lambda v: is_int(v) and v > 0, "a positive integer")
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    stop = _field(body, "stop", _is_stop, "a string or a list of strings", [])
    sampling = {name: value for name, (check, what) in _SAMPLING.items()
                if (value := _field(body, name, check, what)) is not None}
    stop = [stop] if isinstance(stop, str) else stop
    parallel = _field(body, "parallel_tool_calls", lambda v: isinstance(v, bool), "a boolean", True)
    options = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    return Request(kind, prompt, max_tokens, stream, [s for s in stop if s], sampling, tools=body.get("tools"),
                   tool_choice=body.get("tool_choice"), parallel_tool_calls=parallel,
                   include_usage=bool(options.get("include_usage")), logprobs=_logprobs(kind, body))
