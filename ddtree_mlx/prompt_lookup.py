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

from .models.base import TargetAdapter


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
        self.history: list[int] = []

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        # The prompt arrives again as the first draft call's context_tokens, so history starts empty.
        self.vocab_size = target.vocab_size
        self.history = []

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None) -> mx.array:
        self.history.extend(context_tokens)
        sequence = np.asarray(self.history + [root_token], dtype=np.int64)
        starts, weights = self.matches(sequence)
        return mx.array(self.log_probs(sequence, starts, weights))

    def matches(self, sequence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuation starts (the position after each match) and their weights, heaviest max_matches kept."""
        starts = np.arange(1, len(sequence))  # a match ends at start - 1, before the root
        matched = np.zeros(len(starts), dtype=np.int64)
        alive = np.ones(len(starts), dtype=bool)
        for back in range(min(self.max_ngram, len(sequence) - 1)):
            # Compare sequence[start - 1 - back] with the suffix token `back` places before the root.
            earlier = starts - 1 - back
            alive &= (earlier >= 0) & (sequence[np.maximum(earlier, 0)] == sequence[-1 - back])
            matched += alive
        keep = matched >= self.min_ngram
        starts, matched = starts[keep], matched[keep]
        age = np.arange(len(starts))[::-1]  # the newest match has age 0
        weights = self.length_base ** (matched - 1.0) * self.recency ** age
        best = np.argsort(-weights, kind="stable")[: self.max_matches]
        return starts[best], weights[best]

    def log_probs(self, sequence: np.ndarray, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """[block_size - 1, vocab]: each depth's floor, with the continuations' tokens scattered over it."""
        depths = self.block_size - 1
        offsets = starts[:, None] + np.arange(depths)[None, :]  # [matches, depths] positions in `sequence`
        reaches = offsets < len(sequence)
        rows = np.broadcast_to(np.arange(depths), offsets.shape)[reaches]
        tokens = sequence[offsets[reaches]]
        mass = np.broadcast_to(weights[:, None], offsets.shape)[reaches]
        total = np.bincount(rows, weights=mass, minlength=depths)
        # Merge repeated (depth, token) pairs so each gets its summed weight.
        pairs, inverse = np.unique(rows * self.vocab_size + tokens, return_inverse=True)
        summed = np.bincount(inverse, weights=mass, minlength=len(pairs))
        smooth = self.prior / self.vocab_size
        scale = np.log(total + self.prior)
        out = np.empty((depths, self.vocab_size), dtype=np.float32)
        out[:] = (np.log(smooth) - scale)[:, None]
        pair_rows = pairs // self.vocab_size
        out[pair_rows, pairs % self.vocab_size] = np.log(summed + smooth) - scale[pair_rows]
        return out
