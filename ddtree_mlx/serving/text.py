"""Committed tokens -> text that is safe to send to a client, one token's worth of work per token."""

from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """Turns committed tokens into text that is safe to send: whole characters only, cut before the first stop
    string, and holding back a tail that could still grow into one. Its pieces, joined, are `tokenizer.decode` of
    the tokens, up to the stop string.

    Tokens go through mlx-lm's streaming detokenizer (`tokenizer.detokenizer`), which itself holds back an
    incomplete character, so a token costs the text it adds, not a decode of everything so far."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.detokenizer = tokenizer.detokenizer  # a fresh one per call: requests do not share its state
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        self.pending = ""  # text the detokenizer gave that was not handed out yet
        self.tokens = 0  # tokens whose text counts: after a stop, those it took to complete the stop string
        self.started = False  # whether any text came yet
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def add(self, tokens: Sequence[int]) -> str:
        """The text these tokens make safe to send; tokens after a stop string are not counted."""
        for token in tokens:
            if self.stopped:
                break
            self.detokenizer.add_token(token)
            self.tokens += 1
            self._extend()
        return self._release(hold=not self.stopped)

    def finish(self) -> str:
        """What is held back, once no more tokens will come; it may still complete a stop string."""
        if not self.stopped:
            self.detokenizer.finalize()
            self._extend()
        return self._release(hold=False)

    def _extend(self) -> None:
        segment = self.detokenizer.last_segment
        if segment and not self.started:
            self.started = True
            segment = self._restore_lead(segment)
        self.pending += segment
        # Checked after every token, so the token that completes a stop string is known without re-decoding. Only
        # the pending text is searched: what was held back keeps a stop string from starting in what was sent.
        found = min(((i, s) for s in self.stops if (i := self.pending.find(s)) >= 0), default=None)
        if found is not None:
            self.pending = self.pending[: found[0]]
            self.stopped, self.matched = True, found[1]

    def _restore_lead(self, segment: str) -> str:
        """mlx-lm's BPE and SPM detokenizers drop the space the text starts with, which `decode` keeps: the first
        text is checked against one decode of the few tokens that made it."""
        decoded = self.tokenizer.decode(self.detokenizer.tokens)
        lead = decoded[: len(decoded) - len(segment)]
        return decoded if lead.isspace() and decoded.endswith(segment) else segment

    def _release(self, hold: bool) -> str:
        keep = self._stop_prefix() if hold else 0
        piece = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(piece):]
        return piece

    def _stop_prefix(self) -> int:
        """The length of the longest tail of the pending text that begins a stop string (a whole one was cut)."""
        for n in range(min(len(self.pending), self.longest - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
