"""Log-probabilities in OpenAI's shapes. The engine gives each completion token's exact log-probability under the
target (engine/logprobs.py); here each is handed out with the piece of text that carries the end of its text
(`Carried`), spelt as text and bytes (`Spelling`), and shaped as the chat API's `logprobs.content` or the legacy
completions API's `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` (`shape`)."""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

from ..engine.logprobs import TokenLogprob
from .text import TextStream


class Spelling:
    """A token id's text and UTF-8 bytes, from the tokenizer's own tables where mlx-lm's detokenizer has them
    (a token may be part of a character: its text then spells the bytes as \\xNN)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer
        self.known: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.known:
            raw = self._bytes(token)
            self.known[token] = raw.decode("utf-8", "backslashreplace"), list(raw)
        return self.known[token]

    def _bytes(self, token: int) -> bytes:
        detokenizer = self.detokenizer
        if isinstance(detokenizer, BPEStreamingDetokenizer) and token < len(detokenizer.tokenmap):
            table = _byte_decoder()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in detokenizer.tokenmap[token])
        if isinstance(detokenizer, SPMStreamingDetokenizer) and token < len(detokenizer.tokenmap):
            return detokenizer.tokenmap[token].replace(SPMStreamingDetokenizer._sep, b" ")
        return self.tokenizer.decode([token]).encode()


class Carried:
    """Feeds the text stream token by token, so each token's entry goes out with the piece of text that carries the
    end of its text: a token whose text is held back (part of a possible stop string) waits for it, and one that
    made no text yet (part of a character) waits for the token that completes it. Entries are dicts: token,
    logprob, bytes, top_logprobs, and `offset`, where its text starts in the completion."""

    def __init__(self, text: TextStream, tokenizer: Any):
        self.text, self.spell = text, Spelling(tokenizer)
        self.sent = 0  # characters handed out
        self.waiting: deque[tuple[int, dict[str, Any]]] = deque()  # (where its text ends, its entry)
        self.blank: list[dict[str, Any]] = []  # entries of tokens that made no text yet

    def add(self, tokens: Sequence[int], entries: Sequence[TokenLogprob]) -> str:
        """TextStream.add, with the tokens' entries; those of tokens after a stop string are dropped."""
        piece = ""
        for token, entry in zip(tokens, entries):
            counted, start = self.text.tokens, self.sent + len(piece) + len(self.text.pending)
            piece += self.text.add([token])
            if self.text.tokens > counted:
                self.blank.append(self.entry(entry, start))
            end = self.sent + len(piece) + len(self.text.pending)
            if end > start:  # this token's text ends here, and that of those before it that made none
                self.waiting.extend((end, blank) for blank in self.blank)
                self.blank.clear()
        self.sent += len(piece)
        return piece

    def ready(self) -> list[dict[str, Any]]:
        """The entries of the tokens whose text has all gone out."""
        out = []
        while self.waiting and self.waiting[0][0] <= self.sent:
            out.append(self.waiting.popleft()[1])
        return out

    def rest(self, stop: TokenLogprob | None) -> list[dict[str, Any]]:
        """At the end: every entry left, then the stop token's (its text is not in the completion)."""
        out = [entry for _, entry in self.waiting] + self.blank
        self.waiting.clear()
        self.blank = []
        return out + ([self.entry(stop, self.sent)] if stop is not None else [])

    def entry(self, scored: TokenLogprob, offset: int) -> dict[str, Any]:
        token, raw = self.spell(scored.token)
        top = [{"token": text, "logprob": value, "bytes": raw_top}
               for text, raw_top, value in ((*self.spell(t), v) for t, v in scored.top)]
        return {"token": token, "logprob": scored.logprob, "bytes": raw, "top_logprobs": top, "offset": offset}


def shape(kind: str, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """`choices[i].logprobs` of a response or chunk carrying these entries (None when log-probs are off)."""
    if entries is None:
        return None
    if kind == "chat":
        return {"content": [{key: e[key] for key in ("token", "logprob", "bytes", "top_logprobs")} for e in entries]}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [e["offset"] for e in entries]}
