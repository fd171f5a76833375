"""A chat answer's text -> what it holds: content, reasoning (between the tokenizer's think markers) and tool calls
(between its tool-call markers, read by the tokenizer's mlx-lm tool parser). Both APIs shape these events.

The text goes through mlx-lm's own text state machine (`make_text_state_machine`), which strips the markers and
holds back text that may still become one, so text before a marker streams as it comes. A call is reported once
its end marker came; one that does not parse, is cut off, or comes when no tools were given stays text."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class Event:
    """One part of the answer, in order: "text" and "reasoning" carry text, "call" a tool call."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


class Output:
    """Feed it the answer's text piece by piece (`feed`), then `finish`; each returns the events now certain."""

    def __init__(self, tokenizer: Any, request: Any, rendered: Any):
        self.tokenizer = tokenizer
        self.tools = request.tools if request.tool_choice != "none" else None
        self.parallel = request.parallel_tool_calls
        self.machine = make_text_state_machine(tokenizer)
        self.state = self.machine.make_state(rendered.state)
        self.current = rendered.state
        self.call = rendered.forced  # the text of the call being read, after its start marker
        self.calls = 0  # calls reported

    def take(self, text: str, last: bool) -> list[Event]:
        """What a piece of the answer adds; the last piece also flushes what was held back."""
        return _merged(self.feed(text) + (self.finish() if last else []))

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        self.state, segments = TextStateMachine.split(self.state, text)
        return _merged(self._events(segments))

    def finish(self) -> list[Event]:
        """The text held back as a possible marker, and a call that never ended (stays text unless the format
        has no end marker)."""
        self.state, rest, current = TextStateMachine.flush(self.state)
        events = self._events([(current, rest)])
        if self.current == "tool":
            events += self._close(ended=not self.tokenizer.tool_call_end)
            self.current = "normal"
        return _merged(events)

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def _events(self, segments: list[tuple[str | None, str]]) -> list[Event]:
        events = []
        for state, text in segments:
            if state != self.current:
                if self.current == "tool":  # its end marker came
                    events += self._close(ended=True)
                if state == "tool":
                    self.call = ""
                self.current = state
            if not text:
                continue
            if state == "tool":
                self.call += text
            else:
                events.append(Event("reasoning" if state == "reasoning" else "text", text))
        return events

    def _close(self, ended: bool) -> list[Event]:
        tokenizer, text = self.tokenizer, self.call
        self.call = ""
        calls = self._parse(text) if ended and self.tools else None
        if calls is None:
            end = (tokenizer.tool_call_end or "") if ended else ""
            return [Event("text", tokenizer.tool_call_start + text + end)]
        if not self.parallel:  # parallel_tool_calls false: the first call only
            calls = calls[: max(0, 1 - self.calls)]
        self.calls += len(calls)
        return [Event("call", call=call) for call in calls]

    def _parse(self, text: str) -> list[ToolCall] | None:
        try:
            parsed = self.tokenizer.tool_parser(text, self.tools)
        except Exception:  # each parser fails its own way on text that is not a call
            return None
        calls = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(item["name"], arguments))
        return calls or None


def _merged(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if out and event.kind != "call" and out[-1].kind == event.kind:
            out[-1].text += event.text
        else:
            out.append(event)
    return out
