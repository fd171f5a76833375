"""A chat as the chat template sees it: OpenAI messages and tools checked and normalised (the Anthropic side
converts its own into these, anthropic.py), and the prompt rendered from them, with the tools and, for a forced
tool call, the start of that call."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from mlx_lm.server import process_message_content

from ..loading.load import encode_prompt, has_chat_template
from .schema import BadRequest

ROLES = ("system", "user", "assistant", "tool")
IMAGE_PARTS = ("image_url", "input_image", "image", "input_audio", "file", "document")


def messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as agents send them, as the template takes them: `developer` is `system`, a list of
    text parts one string, null content (an assistant turn with tool calls) empty, tool-call arguments a dict."""
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", "messages")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role is {role!r}; use system, developer, user, assistant or tool",
                             "messages")
        content, calls = message.get("content"), message.get("tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise BadRequest(f"messages[{i}] has no content (null only on an assistant message with tool_calls)",
                             "messages")
        if isinstance(content, list):
            _text_parts(content, i)
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        if calls is not None:
            _tool_calls(calls, i)
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise BadRequest(f"messages[{i}] (role tool) needs the string 'tool_call_id' it answers", "messages")
        out.append({**copy.deepcopy(message), "role": role})
    try:
        process_message_content(out)  # mlx-lm's own: text parts joined, null -> "", arguments parsed to a dict
    except (ValueError, KeyError, TypeError) as error:
        raise BadRequest(f"a message could not be read: {error}", "messages") from None
    return out


def _text_parts(parts: list[Any], i: int) -> None:
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PARTS:
            raise BadRequest(f"messages[{i}] holds a {kind!r} part: this server serves text-only models; send text",
                             "messages")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}", "messages")


def _tool_calls(calls: Any, i: int) -> None:
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", ""), (str, dict))):
            raise BadRequest(f"messages[{i}].tool_calls must be a list of {{'function': {{'name', 'arguments'}}}}",
                             "messages")
        if isinstance(function.get("arguments"), str) and function["arguments"].strip():
            try:
                json.loads(function["arguments"])
            except ValueError:
                raise BadRequest(f"messages[{i}].tool_calls[].function.arguments is not JSON", "messages") from None


def tools(value: Any) -> list[dict[str, Any]] | None:
    """OpenAI function tools, checked; none (null, []) is None."""
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise BadRequest("'tools' must be a list of {type: 'function', function: {name, parameters}}", "tools")
    for tool in value:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]
                and isinstance(function.get("parameters", {}), dict)):
            raise BadRequest("'tools' must be a list of {type: 'function', function: {name, parameters}}", "tools")
    return value


def tool_choice(value: Any, functions: list[dict[str, Any]] | None, param: str = "tool_choice") -> str:
    """"auto", "none", "required" or the name of the one function the model must call."""
    if value is None:
        return "auto"
    name = value if value in ("auto", "none", "required") else None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
    if not isinstance(name, str):
        raise BadRequest(f"'{param}' must be auto, none, required or {{type: 'function', function: {{name}}}}",
                         param)
    if name in ("auto", "none"):
        return name
    known = [tool["function"]["name"] for tool in functions or []]
    if not known or (name != "required" and name not in known):
        raise BadRequest(f"'{param}' asks for {name!r}, but 'tools' offers {known or 'nothing'}", param)
    return name


def prepare(request: Any) -> None:
    """A chat request's messages, tools and tool_choice, checked and normalised in place (once)."""
    if request.kind == "chat" and request.rendered is None:
        request.prompt = messages(request.prompt)
        request.tools = tools(request.tools)
        request.tool_choice = tool_choice(request.tool_choice, request.tools)


@dataclass
class Rendered:
    """The prompt's tokens, the state its answer starts in ("normal", "reasoning" or "tool") and, for a forced
    call, the call's text the prompt already holds after its start marker."""

    tokens: list[int]
    state: str = "normal"
    forced: str = ""


def parser_name(tokenizer: Any) -> str:
    """The tokenizer's mlx-lm tool parser module (json_tools, qwen3_coder, ...), "" for none."""
    return getattr(getattr(tokenizer, "tool_parser", None), "__module__", "").rsplit(".", 1)[-1]


def _named_call(tokenizer: Any, name: str) -> str:
    """A call's text from its start marker up to its arguments, for the formats whose calls name the function
    first: forcing it names the function; the arguments are the model's own continuation."""
    kind = parser_name(tokenizer)
    if kind == "json_tools":
        return '\n{"name": ' + json.dumps(name) + ', "arguments":'  # no trailing space: the model writes " {"
    if kind == "qwen3_coder":
        return f"\n<function={name}>\n"
    raise BadRequest(f"this model's tool-call format ({kind or 'unknown'}) cannot be started with a function's "
                     "name; use tool_choice 'required'", "tool_choice")


def _encode(tokenizer: Any, prompt: Any, param: str) -> list[int]:
    try:
        return encode_prompt(tokenizer, prompt, chat=param == "messages")
    except ValueError as error:
        raise BadRequest(str(error), param) from None


def render(tokenizer: Any, request: Any, head: list[dict[str, Any]] | None = None) -> Rendered:
    """The request's prompt; `head` (earlier messages of the chat, for prompt-cache checkpoints) renders those
    alone, without the generation prompt."""
    if request.kind != "chat":
        return Rendered(_encode(tokenizer, request.prompt, "prompt"))
    functions = request.tools if request.tool_choice != "none" else None
    if functions and not getattr(tokenizer, "has_tool_calling", False):
        raise BadRequest("this model's tokenizer has no tool-call format mlx-lm knows, so it cannot call tools; "
                         "leave 'tools' out", "tools")
    if not has_chat_template(tokenizer):
        return Rendered(_encode(tokenizer, request.prompt if head is None else head, "messages"))  # a 400
    try:
        text = tokenizer.apply_chat_template(request.prompt if head is None else head, tools=functions,
                                             tokenize=False, add_generation_prompt=head is None)
    except Exception as error:  # templates reject message sequences they do not support by raising
        raise BadRequest(f"the chat template rejected the messages: {error}", "messages") from None
    state, forced = "normal", ""
    if head is None and functions and request.tool_choice != "auto":
        forced = "" if request.tool_choice == "required" else _named_call(tokenizer, request.tool_choice)
        text += tokenizer.tool_call_start + forced
        state = "tool"
    elif getattr(tokenizer, "has_thinking", False) and text.rfind(tokenizer.think_start) > text.rfind(
            tokenizer.think_end):
        state = "reasoning"
    if state != "tool":
        state = getattr(tokenizer, "response_initial_state", None) or state
    return Rendered(list(tokenizer.encode(text, add_special_tokens=False)), state, forced)
