"""Prompt lookup: a drafter that needs no model. Text often repeats itself (code, quotes, lists, names), so the
tokens that followed earlier occurrences of the current suffix are good guesses for what comes next.

Every earlier position whose preceding tokens match the suffix ending at the root (by at least `min_ngram`
tokens, counted up to `max_ngram`) is a match; the tokens after it are its continuation. Each match weighs
`length_base ** (matched - 1) * recency ** age`, where age counts the newer matches, so longer and more recent
matches dominate. At depth d the probability of token t is

    (weight of the matches whose continuation has t at depth d + prior / vocab) / (their total weight + prior)

so different continuations leave several tokens with mass (the DDTree heap branches over them), little evidence
stays uncertain, and a depth no continuation reaches is uniform.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..models.adapter import TargetAdapter
from ..tree.build import Candidates


class PromptLookupDrafter:
    def __init__(self, block_size: int = 8, max_ngram: int = 4, min_ngram: int = 1, max_matches: int = 64,
                 length_base: float = 4.0, recency: float = 0.8, prior: float = 1.0):
        if block_size < 2:
            raise ValueError(f"block_size {block_size} leaves no draft positions; it must be >= 2")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if max_matches < 1 or length_base < 1 or not 0 < recency <= 1 or prior <= 0:
            raise ValueError("need max_matches >= 1, length_base >= 1, 0 < recency <= 1 and prior > 0")
        self.block_size = block_size
        self.target_layer_ids: list[int] = []
        self.max_ngram, self.min_ngram, self.max_matches = max_ngram, min_ngram, max_matches
        self.length_base, self.recency, self.prior = length_base, recency, prior
        self.vocab_size = 0
        self.history = History()

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        # The prompt arrives again as the first draft call's context_tokens, so history starts empty.
        self.vocab_size = target.vocab_size
        self.history = History()

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
              depth: int | None = None) -> mx.array:
        """The protocol's dense form: [block_size - 1 (or depth), vocab] log-probs."""
        return self.dense(self.smoothed(*self.weights(root_token, context_tokens, depth)))

    def candidates(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
                   width: int, depth: int | None = None) -> Candidates:
        """The same distributions' top `width` tokens per depth, without building the dense rows: the session
        asks for these when a drafter has them, so drafting costs microseconds, not a vocabulary-wide top-k."""
        return self.top(self.smoothed(*self.weights(root_token, context_tokens, depth)), width)

    def dense(self, evidence: tuple[np.ndarray, ...]) -> mx.array:
        floor, rows, tokens, log_probs = evidence
        out = np.empty((len(floor), self.vocab_size), dtype=np.float32)
        out[:] = floor[:, None]
        out[rows, tokens] = log_probs
        return mx.array(out)

    def top(self, evidence: tuple[np.ndarray, ...], width: int) -> Candidates:
        """The top `width` per depth of `smoothed` evidence. Depths with fewer evidenced tokens are filled with
        floor tokens (the lowest ids with no evidence)."""
        floor, rows, tokens, log_probs = evidence
        depths, width = len(floor), min(width, self.vocab_size)
        out_tokens = np.empty((depths, width), dtype=np.int64)
        out_log_probs = np.empty((depths, width))
        order = np.lexsort((tokens, -log_probs, rows))  # by depth, then best first
        rows, tokens, log_probs = rows[order], tokens[order], log_probs[order]
        for depth in range(depths):
            mine = rows == depth
            top, values = tokens[mine][:width], log_probs[mine][:width]
            fill = np.setdiff1d(np.arange(width), top, assume_unique=True)[: width - len(top)]
            out_tokens[depth] = np.r_[top, fill]
            out_log_probs[depth] = np.r_[values, np.full(len(fill), floor[depth])]
        return Candidates(out_tokens, out_log_probs)

    def smoothed(self, total: np.ndarray, rows: np.ndarray, tokens: np.ndarray,
                 weight: np.ndarray) -> tuple[np.ndarray, ...]:
        """From `weights`: each depth's floor log-prob, and the (depth, token) pairs the matches' continuations
        give mass to, with their log-probs."""
        smooth = self.prior / self.vocab_size
        scale = np.log(total + self.prior)
        return np.log(smooth) - scale, rows, tokens, np.log(weight + smooth) - scale[rows]

    def weights(self, root_token: int, context_tokens: list[int], depth: int | None = None) -> tuple[np.ndarray, ...]:
        """The matches' total weight per depth (the block's, or the first `depth`), and the distinct (depth, token)
        pairs their continuations reach, with each pair's summed weight: the evidence before any prior is mixed in."""
        self.history.extend(context_tokens)
        sequence = np.append(self.history.tokens, root_token)
        starts, weights = self.matches(sequence)
        depths = self.block_size - 1 if depth is None else max(1, min(depth, self.block_size - 1))
        offsets = starts[:, None] + np.arange(depths)[None, :]  # [matches, depths] positions in `sequence`
        reaches = offsets < len(sequence)
        rows = np.broadcast_to(np.arange(depths), offsets.shape)[reaches]
        tokens = sequence[offsets[reaches]]
        mass = np.broadcast_to(weights[:, None], offsets.shape)[reaches]
        total = np.bincount(rows, weights=mass, minlength=depths)
        # Merge repeated (depth, token) pairs so each gets its summed weight.
        pairs, inverse = np.unique(rows * self.vocab_size + tokens, return_inverse=True)
        summed = np.bincount(inverse, weights=mass, minlength=len(pairs))
        return total, pairs // self.vocab_size, pairs % self.vocab_size, summed

    def matches(self, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuation starts (the position after each match) and their weights, heaviest max_matches kept.
        `sequence` is the history and the root; a match ends at an earlier occurrence of the root, so only those
        (from the history's index) are compared."""
        ends = self.history.positions(int(sequence[-1]))
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for back in range(1, min(self.max_ngram, len(sequence) - 1)):
            earlier = ends - back  # compared with the suffix token `back` places before the root
            alive &= (earlier >= 0) & (sequence[np.maximum(earlier, 0)] == sequence[-1 - back])
            matched += alive
        keep = matched >= self.min_ngram
        starts, matched = ends[keep] + 1, matched[keep]
        age = np.arange(len(starts))[::-1]  # the newest match has age 0
        weights = self.length_base ** (matched - 1.0) * self.recency ** age
        best = np.argsort(-weights, kind="stable")[: self.max_matches]
        return starts[best], weights[best]


class History:
    """The tokens so far, with every token's positions, so finding the root's earlier occurrences costs what
    they number, not the history's length (a 6K-token context would otherwise be scanned every cycle)."""

    def __init__(self):
        self.buffer = np.zeros(256, dtype=np.int64)
        self.length = 0
        self.index: dict[int, list[int]] = {}

    @property
    def tokens(self) -> np.ndarray:
        return self.buffer[: self.length]

    def extend(self, tokens: list[int]) -> None:
        if self.length + len(tokens) > len(self.buffer):
            self.buffer = np.resize(self.buffer, 2 * (self.length + len(tokens)))
        self.buffer[self.length : self.length + len(tokens)] = tokens
        for offset, token in enumerate(tokens, self.length):
            self.index.setdefault(int(token), []).append(offset)
        self.length += len(tokens)

    def positions(self, token: int) -> np.ndarray:
        return np.array(self.index.get(int(token), []), dtype=np.int64)
