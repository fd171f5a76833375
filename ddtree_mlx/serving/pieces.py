"""One request's committed tokens -> the `Piece`s of text its client gets. Pushed one step at a time, so the same
conversion serves a generation run alone (stream_generate's steps) and a row of a batch (its BatchResponses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine.generate import DecodeStep, GenerationStats
from .logprobs import Carried
from .schema import Request
from .text import TextStream


@dataclass
class Piece:
    """New text from one committed step; the last piece has a finish_reason and the usage and ddtree fields."""

    text: str
    finish_reason: str | None = None
    final: dict[str, Any] | None = None
    stop_string: str | None = None  # on the last piece: the client's stop string that ended the text
    logprobs: list[dict[str, Any]] | None = None  # with logprobs asked: those of the tokens this text carries


class Pieces:
    """Turns one request's steps into pieces: text cut at its stop strings, log-prob entries with the text that
    carries them, usage on the last. `done` once the last piece went out, which a stop string may make happen
    before the generation ends: its caller then ends the generation."""

    def __init__(self, tokenizer: Any, request: Request, prompt_tokens: int):
        self.text = TextStream(tokenizer, request.stop)
        self.carried = Carried(self.text, tokenizer) if request.logprobs is not None else None  # None: no log-probs
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.done = False

    def push(self, step: DecodeStep) -> Piece:
        """The piece of one step (a DecodeStep, or a BatchResponse: the same fields)."""
        text, carried = self.text, self.carried
        self.generated += len(step.tokens)
        # A "stop" step ends with the stop token, which is not part of the text.
        words = step.tokens[:-1] if step.finish_reason == "stop" else step.tokens
        piece = text.add(words) if carried is None else carried.add(words, step.logprobs)
        if step.finish_reason is None and not text.stopped:
            return Piece(piece, logprobs=carried and carried.ready())
        self.done = True
        stop = step.logprobs[-1] if carried and step.finish_reason == "stop" and not text.stopped else None
        entries = carried and carried.rest(stop)  # the stop token's too: it counts as a completion token
        piece += text.finish()
        completion = text.tokens if text.stopped else self.generated
        prompt = self.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        final = {"usage": usage, "ddtree": _stats(step.stats, self.generated)}
        return Piece(piece, "stop" if text.stopped else step.finish_reason, final, text.matched, entries)


def _stats(stats: GenerationStats, generated: int) -> dict[str, Any]:
    summary = stats.summary(generated)
    keys = ("tokens_per_second", "cycles", "avg_acceptance", "fast_path_ratio", "prefill_seconds",
            "reused_prompt_tokens")
    return {key: summary[key] for key in keys}
