"""A z-lab DFlash block-diffusion drafter (dflash-mlx's DFlashDraftModel) behind the drafter protocol: it reads
the target's tapped hidden states and fills a block in one forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
from dflash_mlx.model import (
    ContextOnlyDraftKVCache,
    DFlashDraftModel,
    FullContextDraftKVCache,
)

from ..config import DDTreeConfig
from ..models.adapter import TargetAdapter
from ..tree.build import Candidates, top_candidates
from .dflash_rows import can_draft_together, log_probs_together

SINK = 64  # a drafter reading a window of the context keeps its first tokens too (attention sinks), as dflash-mlx does


DRAFT_VOCAB = "draft_vocab.json"  # beside a DFlash checkpoint's weights: {"token_ids": [...]} it may propose


def read_draft_vocab(checkpoint: Path) -> list[int] | None:
    """The checkpoint's draft vocabulary, or None (it proposes from the whole vocabulary)."""
    path = checkpoint / DRAFT_VOCAB
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text())["token_ids"]
        if ids and all(isinstance(i, int) and i >= 0 for i in ids):
            return ids
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(f"{path} is not a draft vocabulary ({{\"token_ids\": [non-negative ids]}}); fix or delete it")


class DFlashDrafter:
    """dflash-mlx's block-diffusion drafter, run through the target's embedding and LM head. `vocab`: the token ids
    it may propose (a drafter trained over the tokens of its data, `draft_vocab.json` beside its weights): its head
    then computes those rows only, a fifth of SmolLM2's 49,152 for the shipped drafter."""

    def __init__(self, model: DFlashDraftModel, vocab: Sequence[int] | None = None):
        self.model = model
        self.block_size = model.block_size
        self.target_layer_ids = list(model.target_layer_ids)
        self.vocab = None if vocab is None else mx.array(sorted(set(vocab)), dtype=mx.int32)
        self.target: TargetAdapter | None = None
        self.rows: mx.array | None = None  # the target's LM head rows for `vocab`
        self.cache: list[Any] = []
        self.window = DDTreeConfig.draft_window  # the context tokens it reads besides the SINK's (0: all of them)

    def configure(self, config: DDTreeConfig) -> None:
        self.window = config.draft_window

    def check(self, target: TargetAdapter) -> None:
        args = self.model.args
        if args.hidden_size != target.hidden_size:
            raise ValueError(
                f"drafter hidden size {args.hidden_size} does not match the target's {target.hidden_size}; "
                "load the DFlash drafter trained for this target"
            )
        if args.vocab_size != target.vocab_size:
            raise ValueError(
                f"drafter vocab size {args.vocab_size} does not match the target's {target.vocab_size}; "
                "load the DFlash drafter trained for this target"
            )
        bad = [i for i in self.target_layer_ids if not 0 <= i < target.num_layers]
        if bad:
            raise ValueError(
                f"drafter target_layer_ids {bad} are outside the target's {target.num_layers} layers; "
                "load the DFlash drafter trained for this target"
            )
        if self.block_size < 2:
            raise ValueError(f"drafter block_size {self.block_size} leaves no draft positions; it must be >= 2")
        if self.vocab is not None and not 0 <= self.vocab.min().item() <= self.vocab.max().item() < target.vocab_size:
            raise ValueError(f"the drafter's draft vocabulary has ids outside the target's [0, {target.vocab_size})")

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None:
        self.check(target)
        if self.vocab is not None and (self.target is None or target.model is not self.target.model):
            # A vocabulary-sharded head's rows are split across ranks: that target computes the whole head.
            sharded = getattr(target.text, "sharding_group", None) is not None
            self.rows = None if sharded else target.head_rows(self.vocab)
        self.target = target
        self.cache = [ContextOnlyDraftKVCache(SINK, self.window) if self.window else FullContextDraftKVCache()
                      for _ in self.model.layers]
        # Compute in the dtype the target hands over (its embeddings and hidden states): a bf16 checkpoint beside
        # a float32 target would otherwise have every weight converted at every draft (MLX promotes per op), and
        # a CPU's BLAS multiplies float32 only (the shipped drafter's two layers: 8.0 -> 6.9 ms, OpenBLAS).
        dtype = target.embed(mx.array([0])).dtype
        if self.model.fc.weight.dtype != dtype:
            self.model.set_dtype(dtype)

    def positions(self, depth: int | None) -> int:
        """The draft positions to fill: the whole block, or the `depth` a tree can reach (at least 1)."""
        return self.block_size - 1 if depth is None else max(1, min(depth, self.block_size - 1))

    def log_probs(self, root_token: int, context_hidden: mx.array, depth: int | None = None) -> mx.array:
        """[positions(depth), V or len(vocab)]: over the draft vocabulary when there is one. A shorter block costs
        less (each of its rows is a row of every projection, MLP and the head) and reads the context the same way;
        its positions see fewer mask positions after them than in training (whole blocks), which may change what
        they propose (measured: no fewer tokens per cycle). Padding the block to a multiple of 8 rows, as BLAS
        likes, measured slower than the exact block (BENCHMARKS.md, "Drafting only as deep as the tree")."""
        block = mx.array([root_token] + [self.model.mask_token_id] * self.positions(depth))
        noise = self.target.embed(block[None])
        context_hidden = self.within_window(context_hidden)
        # The head runs over the whole block and the anchor's row is dropped after: BLAS multiplies a block of 8
        # rows faster than 7 (measured here: 2.3 vs 3.1 ms for the shipped drafter's 9,883-token head); at shorter
        # blocks dropping it first measured no different.
        return self.head(self.model(noise_embedding=noise, target_hidden=context_hidden[None], cache=self.cache)[0])

    def head(self, hidden: mx.array) -> mx.array:
        """Log-probs at every position of blocks' final hidden states [..., block, hidden] but the anchor's."""
        if self.rows is not None:
            logits = hidden @ self.rows.T
        else:
            logits = self.target.lm_head(hidden)
            logits = logits if self.vocab is None else logits[..., self.vocab]
        logits = logits[..., 1:, :].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def within_window(self, hidden: mx.array) -> mx.array:
        """The rows of `hidden` (the context since the last draft) the window keeps, at the positions it keeps them
        at, as dflash-mlx's windowed cache would after projecting every row (a first draft after a 6K-token prompt:
        227 -> 62 ms here): the last `window` rows, and on a first read its first SINK rows too, projected now."""
        first, count = self.cache[0].offset == 0, hidden.shape[0]
        sink = SINK if first else 0
        if not self.window or count <= sink + self.window:
            return hidden
        if sink:
            projected = self.model.project_target_hidden(hidden[None, :sink])
            self.model.advance_projected_context_cache(draft_context=projected, cache=self.cache)
        for layer_cache in self.cache:
            layer_cache.offset += count - sink - self.window  # the positions of the rows it drops
        return hidden[-self.window :]

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
              depth: int | None = None) -> mx.array:
        log_probs = self.log_probs(root_token, context_hidden, depth)
        if self.vocab is None:
            return log_probs
        dense = mx.full((log_probs.shape[0], self.target.vocab_size), -mx.inf)
        dense[:, self.vocab] = log_probs
        return dense

    def candidates(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None,
                   width: int, depth: int | None = None) -> Candidates:
        """The top `width` per depth, still lazy (the session evaluates them), ids in the target's vocabulary."""
        return self.top(self.log_probs(root_token, context_hidden, depth), width)

    def top(self, log_probs: mx.array, width: int) -> Candidates:
        top = top_candidates(log_probs, width)
        return top if self.vocab is None else Candidates(self.vocab[top.tokens], top.log_probs)

    @staticmethod
    def candidates_together(drafters: Sequence["DFlashDrafter"], contexts: Sequence[tuple], width: int,
                            depth: int | None = None) -> list[Candidates]:
        """Several rows' `candidates`, contexts[b] = (root_token, context_tokens, context_hidden) for drafters[b]."""
        log_probs = DFlashDrafter.log_probs_rows(drafters, [root for root, _, _ in contexts],
                                                 [hidden for _, _, hidden in contexts], depth)
        return [drafter.top(rows, width) for drafter, rows in zip(drafters, log_probs)]

    @staticmethod
    def log_probs_rows(drafters: Sequence["DFlashDrafter"], roots: Sequence[int], hiddens: Sequence[mx.array | None],
                       depth: int | None = None) -> list[mx.array]:
        """Several rows' `log_probs`, from one forward where they can share it (dflash_rows); still lazy."""
        if len(drafters) == 1 or not can_draft_together(drafters) or any(hidden is None for hidden in hiddens):
            return [drafter.log_probs(root, hidden, depth) for drafter, root, hidden in zip(drafters, roots, hiddens)]
        return list(log_probs_together(drafters, roots, hiddens, depth))

