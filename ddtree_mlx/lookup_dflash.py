"""Prompt lookup and a DFlash drafter in one tree: the DFlash drafter is prompt lookup's prior.

Prompt lookup is right where text repeats (code restating its signature, quotes, edits of the prompt, names) and
costs nothing to draft; a trained DFlash drafter is right more often on new text. Prompt lookup already mixes its
matches with a prior (uniform on its own); here the prior is the DFlash drafter's distribution q_d at depth d:

    p_d(t) = (weight of the matches whose continuation has t at depth d + prior * q_d(t))
             / (their total weight + prior)

With no match this is the DFlash drafter; a long match's continuation dominates it; and where the two disagree
both keep mass, so the tree branches over both. Where prompt lookup is sure of itself (its best next token weighs
`alone_at` or more: a match of three tokens or longer with the default weights), the DFlash forward is skipped and
prompt lookup drafts alone, for free; the DFlash drafter reads the context it missed at its next draft.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .drafters import DFlashDrafter
from .models.base import TargetAdapter, join_rows
from .prompt_lookup import PromptLookupDrafter
from .tree import Candidates, top_candidates


class LookupDFlashDrafter:
    def __init__(self, dflash: DFlashDrafter, lookup: PromptLookupDrafter | None = None, alone_at: float = 16.0):
        lookup = lookup or PromptLookupDrafter(block_size=dflash.block_size)
        if lookup.block_size != dflash.block_size:
            raise ValueError(f"prompt lookup's block_size {lookup.block_size} differs from the DFlash drafter's "
                             f"{dflash.block_size}; build it with PromptLookupDrafter(block_size={dflash.block_size})")
        self.dflash, self.lookup, self.alone_at = dflash, lookup, alone_at
        self.unseen: mx.array | None = None  # context rows the DFlash drafter has not read (drafts it skipped)
        self.block_size = dflash.block_size
        self.target_layer_ids = dflash.target_layer_ids
        self.ids: np.ndarray | None = None  # the DFlash drafter's vocabulary (None: the whole vocabulary)
        self.column: np.ndarray | None = None  # per target token: its column in that vocabulary, -1 if absent

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        self.dflash.reset(target, prompt_tokens)
        self.lookup.reset(target, prompt_tokens)
        self.unseen = None
        if self.dflash.vocab is not None:
            self.ids = np.array(self.dflash.vocab)
            self.column = np.full(target.vocab_size, -1)
            self.column[self.ids] = np.arange(len(self.ids))

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None) -> mx.array:
        """The protocol's dense form, [block_size - 1, vocab] log-probs (the reference `candidates` is tested
        against)."""
        total, rows, tokens, weight = evidence = self.lookup.weights(root_token, context_tokens)
        if self.sure(evidence, context_hidden):
            return self.lookup.dense(self.lookup.smoothed(*evidence))
        q = mx.exp(self.dflash.draft(root_token, context_tokens, self.read_unseen()))  # 0 outside its vocabulary
        matched = np.zeros(q.shape, dtype=np.float32)
        matched[rows, tokens] = weight
        prior = self.lookup.prior
        return mx.log(mx.array(matched) + prior * q) - mx.log(mx.array(total + prior, dtype=mx.float32))[:, None]

    def candidates(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
                   width: int) -> Candidates:
        """The top `width` tokens per depth of the same mixture. A token no match reaches scores prior * q_d(t),
        so the best of the whole vocabulary is among the DFlash drafter's own top `width` and the matched tokens:
        only those are scored, on the host, after one evaluation of the draft."""
        total, rows, tokens, weight = evidence = self.lookup.weights(root_token, context_tokens)
        if self.sure(evidence, context_hidden):
            return self.lookup.top(self.lookup.smoothed(*evidence), width)
        log_q = self.dflash.log_probs(root_token, self.read_unseen())  # [depths, its vocabulary]
        top = top_candidates(log_q, width)
        columns = tokens if self.column is None else self.column[tokens]
        known = columns >= 0  # a matched token outside the drafter's vocabulary has q = 0
        matched = log_q.reshape(-1)[mx.array(rows * log_q.shape[1] + np.maximum(columns, 0))]
        mx.eval(top.tokens, top.log_probs, matched)
        depths, width = top.tokens.shape
        top_tokens = np.array(top.tokens) if self.ids is None else self.ids[np.array(top.tokens)]
        rows = np.r_[np.repeat(np.arange(depths), width), rows]
        tokens = np.r_[top_tokens.ravel(), tokens]
        weight = np.r_[np.zeros(depths * width), weight]
        log_q = np.r_[np.array(top.log_probs, dtype=np.float64).ravel(), np.where(known, np.array(matched), -np.inf)]
        # A token both matched and in the drafter's top is listed twice: one entry each, its weight summed.
        keys, first, inverse = np.unique(rows * (tokens.max() + 1) + tokens, return_index=True, return_inverse=True)
        weight = np.bincount(inverse, weights=weight, minlength=len(keys))
        rows, tokens, log_q = rows[first], tokens[first], log_q[first]
        with np.errstate(divide="ignore"):
            scores = np.log(weight + self.lookup.prior * np.exp(log_q)) - np.log(total + self.lookup.prior)[rows]
        order = np.lexsort((tokens, -scores, rows))  # by depth, then best first
        rank = np.arange(len(order)) - np.searchsorted(rows[order], rows[order])  # place within its depth
        best = order[rank < width]  # every depth has at least `width` entries: the drafter's own top
        return Candidates(tokens[best].reshape(depths, width), scores[best].reshape(depths, width))

    def sure(self, evidence: tuple[np.ndarray, ...], context_hidden: mx.array | None) -> bool:
        """Whether prompt lookup drafts alone; the DFlash drafter's new context waits in `unseen` either way."""
        self.unseen = join_rows(self.unseen, context_hidden)
        _, rows, _, weight = evidence
        return weight[rows == 0].max(initial=0.0) >= self.alone_at

    def read_unseen(self) -> mx.array | None:
        unseen, self.unseen = self.unseen, None
        return unseen
