"""The OpenAI shapes of what the server sends: a whole completion, the chunks of a streamed one, an error."""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from .logprobs import shape
from .output import Event, Output
from .pieces import Piece
from .schema import Request

_OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "completion": ("text_completion", "text_completion")}


def _envelope(request: Request, model: str, choice: dict[str, Any], *, stream: bool, **extra: Any) -> dict:
    prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
    return {"id": prefix + request.id, "object": _OBJECTS[request.kind][stream], "created": request.created,
            "model": model, "choices": [{"index": 0, "logprobs": None, **choice}], **extra}


def _final(piece: Piece) -> dict[str, Any]:
    """The last piece's usage and ddtree fields, the usage with the prompt tokens the prefix cache held."""
    cached = {"cached_tokens": piece.final["ddtree"]["reused_prompt_tokens"]}
    return {**piece.final, "usage": {**piece.final["usage"], "prompt_tokens_details": cached}}


def _call(call: Any, index: int | None = None) -> dict[str, Any]:
    entry = {"index": index} if index is not None else {}
    return {**entry, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _delta(event: Event, index: int) -> dict[str, Any]:
    if event.kind == "call":
        return {"tool_calls": [_call(event.call, index)]}
    return {"reasoning_content" if event.kind == "reasoning" else "content": event.text}


def full_response(request: Request, model: str, pieces: Sequence[Piece],
                  output: Output | None = None) -> dict[str, Any]:
    text, last = "".join(p.text for p in pieces), pieces[-1]
    entries = [entry for piece in pieces for entry in piece.logprobs or []]
    scored = {"logprobs": shape(request.kind, entries)} if request.logprobs is not None else {}
    if output is None:  # a completion
        return _envelope(request, model, {"text": text, "finish_reason": last.finish_reason, **scored}, stream=False,
                         **_final(last))
    said = [event for piece in pieces for event in output.take(piece.text, bool(piece.finish_reason))]
    calls = [_call(e.call) for e in said if e.kind == "call"]
    message = {"role": "assistant", "content": "".join(e.text for e in said if e.kind == "text") or
               (None if calls else "")}
    if reasoning := "".join(e.text for e in said if e.kind == "reasoning"):
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    choice = {"message": message, "finish_reason": output.finish_reason(last.finish_reason), **scored}
    return _envelope(request, model, choice, stream=False, **_final(last))


def stream_chunks(request: Request, model: str, pieces: Iterator[Piece],
                  output: Output | None = None) -> Iterator[dict[str, Any]]:
    """Chat: the role, then content, reasoning_content and one tool_calls entry per call as each is certain,
    the finish, and with stream_options.include_usage a last chunk with no choice and the usage."""
    owed: list[dict[str, Any]] = []  # log-prob entries of text since the last chunk: the next chunk takes them

    def chunk(body: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        scored = {"logprobs": shape(request.kind, owed[:])} if owed else {}
        owed.clear()
        return _envelope(request, model, {**body, "finish_reason": finish_reason, **scored}, stream=True, **extra)

    if output is not None:
        yield chunk({"delta": {"role": "assistant", "content": ""}})
    calls = 0
    for piece in pieces:
        owed.extend(piece.logprobs or [])
        if output is None and piece.text:
            yield chunk({"text": piece.text})
        for event in output.take(piece.text, bool(piece.finish_reason)) if output is not None else []:
            yield chunk({"delta": _delta(event, calls)})
            calls += event.kind == "call"
        if piece.finish_reason:
            final = _final(piece)
            reason = output.finish_reason(piece.finish_reason) if output else piece.finish_reason
            yield chunk({"delta": {}} if output else {"text": ""}, reason, **final)
            if request.include_usage:
                yield {**chunk({}), "choices": [], "usage": final["usage"]}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
