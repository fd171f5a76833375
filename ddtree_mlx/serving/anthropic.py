"""The Anthropic Messages API over the same engine: POST /v1/messages (streamed as server-sent events with
`event:` lines, or whole) and /v1/messages/count_tokens. A request becomes the OpenAI-side `Request` (its messages
and tools in the form the chat template takes, conversation.py), so the prompt and the parsing of the answer
(output.py: text, thinking, tool calls) are the ones the OpenAI routes use."""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from ..config import is_int, is_number
from .output import Event, Output
from .pieces import Piece
from .schema import BadRequest, Request

# Anthropic's error type for each HTTP status this server answers with.
_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
           405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large", 500: "api_error",
           529: "overloaded_error"}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERRORS.get(status, "api_error"), "message": message}}


def parse_request(body: Any, counting: bool = False) -> Request:
    """A Messages request (count_tokens: without max_tokens). Fields that do not change the output (metadata,
    thinking, cache_control, ...) are ignored."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    max_tokens = body.get("max_tokens")
    if not counting and not (is_int(max_tokens) and max_tokens > 0):
        raise BadRequest("max_tokens: a positive integer is required", "max_tokens")
    stops = body.get("stop_sequences") or []
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise BadRequest("stop_sequences: must be a list of strings", "stop_sequences")
    sampling = {}
    for name, check in (("temperature", is_number), ("top_p", is_number), ("top_k", is_int)):
        if body.get(name) is not None:
            if not check(body[name]):
                raise BadRequest(f"{name}: must be a number", name)
            sampling[name] = body[name]
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream: must be a boolean", "stream")
    tools = _tools(body.get("tools"))
    choice, parallel = _tool_choice(body.get("tool_choice"))
    prompt = _system(body.get("system")) + _messages(body.get("messages"))
    return Request("chat", prompt, max_tokens, bool(body.get("stream")), [s for s in stops if s], sampling,
                   tools=tools, tool_choice=choice, parallel_tool_calls=parallel)


def fit(request: Request, engine: Any) -> int:
    """Render the prompt (its token count), refuse one the context cannot hold in Anthropic's words, and let
    max_tokens (a bound, often larger than a local model's context) stop at the context's end."""
    tokens = len(engine.render(request).tokens)
    context = engine.target.context_length
    if context and tokens >= context:
        raise BadRequest(f"prompt is too long: {tokens} tokens > {context - 1} maximum", "messages")
    if context and request.max_tokens is not None:
        request.max_tokens = min(request.max_tokens, context - tokens)
    return tokens


def _text(value: Any, where: str) -> str:
    """A string, or a list of text blocks joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for block in value:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind in ("image", "document"):
                raise BadRequest(f"{where}: {kind} blocks are not supported (text-only models); send text")
            if kind != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f"{where}: must be a string or a list of text blocks")
        return "".join(block["text"] for block in value)
    raise BadRequest(f"{where}: must be a string or a list of text blocks")


def _system(value: Any) -> list[dict[str, Any]]:
    return [] if value in (None, "", []) else [{"role": "system", "content": _text(value, "system")}]


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages: a non-empty list of {role, content} is required", "messages")
    out = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages.{i}.role: must be 'user' or 'assistant'", "messages")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise BadRequest(f"messages.{i}.content: must be a string or a list of content blocks", "messages")
        out += _turn(role, blocks, f"messages.{i}.content")
    return out


def _turn(role: str, blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """One Anthropic turn as chat-template messages: tool results become `tool` messages, tool uses the
    assistant's tool_calls; thinking sent back is dropped (the template renders the turn without it)."""
    out, text, calls = [], [], []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind in ("thinking", "redacted_thinking"):
            continue
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            arguments = block.get("input") or {}
            calls.append({"id": str(block.get("id", "")), "type": "function",
                          "function": {"name": block["name"], "arguments": arguments}})
        elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
            if text:  # what the user said before it stays before it
                out.append({"role": "user", "content": "".join(text)})
                text = []
            result = _text(block.get("content") or "", f"{where}.tool_result.content")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": ("Error: " + result) if block.get("is_error") else result})
        elif kind in ("image", "document"):
            raise BadRequest(f"{where}: {kind} blocks are not supported (text-only models); send text", "messages")
        else:
            raise BadRequest(f"{where}: a {kind!r} block is not supported in a {role} turn", "messages")
    if text or calls or not out:
        message = {"role": role, "content": "".join(text) if text or not calls else None}
        out.append({**message, "tool_calls": calls} if calls else message)
    return out


def _tools(value: Any) -> list[dict[str, Any]] | None:
    """Anthropic tools as the OpenAI function tools the chat template takes."""
    if value in (None, []):
        return None
    if not isinstance(value, list):
        raise BadRequest("tools: must be a list of {name, description, input_schema}", "tools")
    out = []
    for tool in value:
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str)
                and isinstance(tool.get("input_schema"), dict)):
            raise BadRequest("tools: each tool needs a name and an input_schema (server tools are not "
                             "supported)", "tools")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> tuple[Any, bool]:
    """(the OpenAI tool_choice, whether several calls may come)."""
    if value is None:
        return None, True
    kind = value.get("type") if isinstance(value, dict) else None
    choice = {"auto": "auto", "none": "none", "any": "required"}.get(kind)
    if kind == "tool" and isinstance(value.get("name"), str):
        choice = {"type": "function", "function": {"name": value["name"]}}
    if choice is None:
        raise BadRequest("tool_choice: must be {type: auto|none|any} or {type: 'tool', name}", "tool_choice")
    return choice, not value.get("disable_parallel_tool_use", False)


def _block(event: Event) -> dict[str, Any]:
    if event.kind == "call":
        return {"type": "tool_use", "id": "toolu_" + event.call.id[5:], "name": event.call.name,
                "input": event.call.arguments}
    if event.kind == "reasoning":
        return {"type": "thinking", "thinking": event.text, "signature": ""}
    return {"type": "text", "text": event.text}


def _stop(piece: Piece, output: Output) -> dict[str, Any]:
    if piece.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if output.calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if piece.stop_string is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": piece.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


def _usage(piece: Piece) -> dict[str, int]:
    """Anthropic counts cache reads apart from input_tokens: the prompt tokens the prefix cache held."""
    usage, cached = piece.final["usage"], piece.final["ddtree"]["reused_prompt_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _message(request: Request, model: str, content: list[Any], **fields: Any) -> dict[str, Any]:
    return {"id": "msg_" + request.id, "type": "message", "role": "assistant", "model": model,
            "content": content, **fields}


def full_message(request: Request, model: str, pieces: Sequence[Piece], output: Output) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    for event in (e for piece in pieces for e in output.take(piece.text, bool(piece.finish_reason))):
        block = _block(event)
        if blocks and event.kind != "call" and blocks[-1]["type"] == block["type"]:
            key = "thinking" if event.kind == "reasoning" else "text"
            blocks[-1][key] += block[key]
        else:
            blocks.append(block)
    last = pieces[-1]
    return _message(request, model, blocks, **_stop(last, output), usage=_usage(last))


def stream_events(request: Request, model: str, pieces: Iterator[Piece],
                  output: Output) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs: message_start, ping, each block's start, deltas and stop (blocks 0, 1, 2, ...),
    message_delta with the stop reason and the usage, message_stop."""
    usage = {"input_tokens": len(request.rendered.tokens), "output_tokens": 0, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}
    start = _message(request, model, [], stop_reason=None, stop_sequence=None, usage=usage)
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    index, open_kind = -1, None
    for piece in pieces:
        for event in output.take(piece.text, bool(piece.finish_reason)):
            if open_kind is not None and (event.kind == "call" or event.kind != open_kind):
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
                open_kind = None
            block = _block(event)
            if open_kind is None:
                index += 1
                empty = {**block, "input": {}} if event.kind == "call" else {**block, block_key(event): ""}
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}
            if event.kind == "call":
                delta = {"type": "input_json_delta", "partial_json": json.dumps(event.call.arguments)}
            elif event.kind == "reasoning":
                delta = {"type": "thinking_delta", "thinking": event.text}
            else:
                delta = {"type": "text_delta", "text": event.text}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
            open_kind = event.kind
        if piece.finish_reason:
            if open_kind is not None:
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
            yield "message_delta", {"type": "message_delta", "delta": _stop(piece, output), "usage": _usage(piece)}
            yield "message_stop", {"type": "message_stop"}


def block_key(event: Event) -> str:
    return "thinking" if event.kind == "reasoning" else "text"
