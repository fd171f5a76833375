"""The OpenAI shapes of what the server sends: a whole completion, the chunks of a streamed one, an error."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from .generation import Piece
from .schema import Request

_OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "completion": ("text_completion", "text_completion")}


def _envelope(request: Request, model: str, choice: dict[str, Any], *, stream: bool, **extra: Any) -> dict:
    prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
    return {"id": prefix + request.id, "object": _OBJECTS[request.kind][stream], "created": request.created,
            "model": model, "choices": [{"index": 0, **choice, "logprobs": None}], **extra}


def full_response(request: Request, model: str, pieces: Sequence[Piece]) -> dict[str, Any]:
    text, last = "".join(p.text for p in pieces), pieces[-1]
    body = {"message": {"role": "assistant", "content": text}} if request.kind == "chat" else {"text": text}
    return _envelope(request, model, {**body, "finish_reason": last.finish_reason}, stream=False, **last.final)


def stream_chunks(request: Request, model: str, pieces: Iterator[Piece]) -> Iterator[dict[str, Any]]:
    def chunk(text: str, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        body = {"text": text} if request.kind == "completion" else {"delta": {"content": text} if text else {}}
        return _envelope(request, model, {**body, "finish_reason": finish_reason}, stream=True, **extra)

    if request.kind == "chat":
        yield _envelope(request, model, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                        stream=True)
    for piece in pieces:
        if piece.text:
            yield chunk(piece.text)
        if piece.finish_reason:
            yield chunk("", piece.finish_reason, **piece.final)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
