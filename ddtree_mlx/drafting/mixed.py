"""Prompt lookup and a DFlash drafter in one tree: the DFlash drafter is prompt lookup's prior.

Prompt lookup is right where text repeats (code restating its signature, quotes, edits of the prompt, names) and
costs nothing to draft; a trained DFlash drafter is right more often on new text. Prompt lookup already mixes its
matches with a prior (uniform on its own); here the prior is the DFlash drafter's distribution q_d at depth d:

    p_d(t) = (weight of the matches whose continuation has t at depth d + prior * q_d(t))
             / (their total weight + prior)

`prior` = 4 by default: a two-token match (weight 4 with prompt lookup's default weights) gets half the mass, a
longer one most of it (measured on SmolLM2 at budget 4: 0-10% more tokens per cycle than prior 1, BENCHMARKS.md).
With no match this is the DFlash drafter; a long match's continuation dominates it; and where the two disagree
both keep mass, so the tree branches over both. Where prompt lookup is sure of itself (its best next token weighs
`alone_at` or more: a match of three tokens or longer with the default weights), the DFlash forward is skipped and
prompt lookup drafts alone, for free; the DFlash drafter reads the context it missed at its next draft.
"""

from __future__ import annotations

import copy
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..config import DDTreeConfig
from ..models.adapter import TargetAdapter
from ..models.verify import join_rows
from ..tree.build import Candidates, top_candidates
from .dflash import DFlashDrafter
from .prompt_lookup import PromptLookupDrafter


class LookupDFlashDrafter:
    def __init__(self, dflash: DFlashDrafter, lookup: PromptLookupDrafter | None = None, prior: float = 4.0,
                 alone_at: float = 16.0):
        if prior <= 0 or alone_at <= 0:
            raise ValueError(f"need prior > 0 and alone_at > 0 (inf: always mix), got {prior} and {alone_at}")
        lookup = lookup or PromptLookupDrafter(block_size=dflash.block_size)
        if lookup.block_size != dflash.block_size:
            raise ValueError(f"prompt lookup's block_size {lookup.block_size} differs from the DFlash drafter's "
                             f"{dflash.block_size}; build it with PromptLookupDrafter(block_size={dflash.block_size})")
        self.dflash, self.lookup, self.prior, self.alone_at = dflash, lookup, prior, alone_at
        self.unseen: mx.array | None = None  # context rows the DFlash drafter has not read (drafts it skipped)
        self.block_size = dflash.block_size
        self.target_layer_ids = dflash.target_layer_ids
        self.ids: np.ndarray | None = None  # the DFlash drafter's vocabulary (None: the whole vocabulary)
        self.column: np.ndarray | None = None  # per target token: its column in that vocabulary, -1 if absent

    def configure(self, config: DDTreeConfig) -> None:
        self.dflash.configure(config)

    def fork(self) -> "LookupDFlashDrafter":
        """One more generation's drafter (a batch's row): the same weights, its own context and history."""
        return LookupDFlashDrafter(copy.copy(self.dflash), copy.copy(self.lookup), self.prior, self.alone_at)

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        self.dflash.reset(target, prompt_tokens)
        self.lookup.reset(target, prompt_tokens)
        self.unseen = None
        if self.dflash.vocab is not None:
            self.ids = np.array(self.dflash.vocab)
            self.column = np.full(target.vocab_size, -1)
            self.column[self.ids] = np.arange(len(self.ids))

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
              depth: int | None = None) -> mx.array:
        """The protocol's dense form, [block_size - 1 (or depth), vocab] log-probs (the reference `candidates` is
        tested against)."""
        total, rows, tokens, weight = evidence = self.lookup.weights(root_token, context_tokens, depth)
        if self.sure(evidence, context_hidden):
            return self.lookup.dense(self.lookup.smoothed(*evidence))
        q = mx.exp(self.dflash.draft(root_token, context_tokens, self.read_unseen(), depth))  # 0 outside its vocabulary
        matched = np.zeros(q.shape, dtype=np.float32)
        matched[rows, tokens] = weight
        prior = self.prior
        return mx.log(mx.array(matched) + prior * q) - mx.log(mx.array(total + prior, dtype=mx.float32))[:, None]

    def candidates(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
                   width: int, depth: int | None = None) -> Candidates:
        """The top `width` tokens per depth of the same mixture, over the DFlash drafter's vocabulary and the
        matched tokens outside it; still lazy, so the session evaluates them with the draft (device time)."""
        return self.candidates_together([self], [(root_token, context_tokens, context_hidden)], width, depth)[0]

    @staticmethod
    def candidates_together(drafters: Sequence["LookupDFlashDrafter"], contexts: Sequence[tuple], width: int,
                            depth: int | None = None) -> list[Candidates]:
        """Several rows' `candidates` (contexts[b] for drafters[b]): the rows prompt lookup does not draft alone
        share one DFlash forward (DFlashDrafter.log_probs_rows)."""
        evidence = [d.lookup.weights(root, tokens, depth) for d, (root, tokens, _) in zip(drafters, contexts)]
        alone = [d.sure(e, hidden) for d, e, (_, _, hidden) in zip(drafters, evidence, contexts)]
        mixing = [(d, root) for d, (root, _, _), a in zip(drafters, contexts, alone) if not a]
        log_q = iter(DFlashDrafter.log_probs_rows([d.dflash for d, _ in mixing], [root for _, root in mixing],
                                                  [d.read_unseen() for d, _ in mixing], depth) if mixing else [])
        return [d.lookup.top(d.lookup.smoothed(*e), width) if a else d.mix(next(log_q), e, width)
                for d, e, a in zip(drafters, evidence, alone)]

    def mix(self, log_q: mx.array, evidence: tuple[np.ndarray, ...], width: int) -> Candidates:
        """The mixture's top `width` per depth from the DFlash drafter's log-probs [depths, its vocabulary]."""
        total, rows, tokens, weight = evidence
        depths, size = log_q.shape
        columns = tokens if self.column is None else self.column[tokens]
        outside = columns < 0  # a matched token outside the drafter's vocabulary (q = 0) gets a column of its own
        extra, at = np.unique(tokens[outside], return_inverse=True)
        columns = np.where(outside, 0, columns)
        columns[outside] = size + at
        q = mx.concatenate([mx.exp(log_q), mx.zeros((depths, len(extra)))], axis=1)
        matched = mx.zeros(q.shape)
        if len(rows):
            matched = matched.at[mx.array(rows), mx.array(columns)].add(mx.array(weight, dtype=mx.float32))
        scores = mx.log(matched + self.prior * q) - mx.log(mx.array(total + self.prior, dtype=mx.float32))[:, None]
        top = top_candidates(scores, width)
        if self.ids is None and not len(extra):
            return top
        ids = np.r_[np.arange(size) if self.ids is None else self.ids, extra]
        return Candidates(mx.array(ids)[top.tokens], top.log_probs)

    def sure(self, evidence: tuple[np.ndarray, ...], context_hidden: mx.array | None) -> bool:
        """Whether prompt lookup drafts alone; the DFlash drafter's new context waits in `unseen` either way."""
        self.unseen = join_rows(self.unseen, context_hidden)
        _, rows, _, weight = evidence
        return weight[rows == 0].max(initial=0.0) >= self.alone_at

    def read_unseen(self) -> mx.array | None:
        unseen, self.unseen = self.unseen, None
        return unseen
