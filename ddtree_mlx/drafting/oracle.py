"""An oracle drafter for benchmarks and tests: it knows the continuation and ranks the true token where told, so
it drives the engine down deep, off-first-rank paths independently of any trained drafter's quality."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import numpy as np

from ..models.adapter import TargetAdapter
from ..tree.build import Candidates, top_candidates


class ScriptedDrafter:
    """A drafter that knows the target's continuation `truth` (prompt + output) and ranks each true next token
    1st, 2nd, 3rd or nowhere with the given probabilities, seeded per position. It measures the engine
    independently of any drafter's quality (benchmarks) and drives deep, off-first-rank paths (tests)."""

    target_layer_ids: list[int] = []

    def __init__(self, truth: Sequence[int], block_size: int = 8, rank_weights=(0.55, 0.2, 0.1, 0.15), seed: int = 0):
        self.truth = list(truth)
        self.block_size = block_size
        self.rank_weights = np.asarray(rank_weights, dtype=np.float64) / np.sum(rank_weights)
        self.seed = seed
        self.position = 0
        self.ranked = np.zeros((0, len(rank_weights) - 1), dtype=np.int64)
        self.floor = 0.0

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        """Script every position once, so drafting costs the engine almost no host time."""
        self.position = 0
        vocab = target.vocab_size
        rng = np.random.default_rng(self.seed)
        count, ranked = len(self.truth) + self.block_size, len(self.rank_weights) - 1
        true = np.concatenate([self.truth, rng.integers(vocab, size=self.block_size)])
        # Distractors are offsets from the true token, so none of them is it; rank `ranked` means "absent".
        self.ranked = (true[:, None] + rng.integers(1, vocab, size=(count, ranked))) % vocab
        rank = rng.choice(ranked + 1, size=count, p=self.rank_weights)
        placed = (rank < ranked) & (np.arange(count) < len(self.truth))
        self.ranked[placed, rank[placed]] = true[placed]
        self.floor = np.log(self.rank_weights[-1] / vocab)
        self.vocab_size = vocab

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None) -> mx.array:
        """Calibrated: rank r carries probability rank_weights[r]; the last weight ("absent") is spread thin."""
        self.position += len(context_tokens)  # the root sits at truth[self.position]
        return self.dense()

    def dense(self) -> mx.array:
        depth = self.block_size - 1
        rows = np.full((depth, self.vocab_size), self.floor, dtype=np.float32)
        tokens = self.ranked[self.position + 1 : self.position + 1 + depth]
        rows[np.arange(depth)[:, None], tokens] = np.log(self.rank_weights[:-1])
        return mx.array(rows)

    def candidates(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
                   width: int) -> Candidates:
        """The dense rows' top `width` without building them: the synthetic preset measures the engine's host
        time, not this instrument's (a [depths, vocab] array per draft was 0.6 ms of a ~34 ms cycle). The ranked
        tokens first, then the lowest other ids at the floor."""
        self.position += len(context_tokens)
        best = np.argsort(-self.rank_weights[:-1], kind="stable")  # the ranks by weight, best first
        ranked = self.ranked[self.position + 1 : self.position + self.block_size][:, best]
        weights = np.log(self.rank_weights[:-1][best])
        count = ranked.shape[1]
        if width < count or weights[-1] < self.floor or any(len(set(row)) < count for row in ranked.tolist()):
            return top_candidates(self.dense(), width)  # rare (two distractors met): the dense rows decide
        ids = np.arange(width + count)
        order = np.argsort((ids[None, :, None] == ranked[:, None, :]).any(-1), axis=1, kind="stable")
        tokens = np.concatenate([ranked, ids[order[:, : width - count]]], axis=1)
        log_probs = np.r_[weights, np.full(width - count, self.floor)]
        return Candidates(tokens, np.broadcast_to(log_probs, tokens.shape).astype(np.float32))
