"""Drafters: anything that turns the committed context into per-position log-probs for the next block.

The protocol (duck-typed; a test or a user may pass any object with these members):

    block_size: int                 # the block the drafter fills: the root plus block_size - 1 draft positions
    target_layer_ids: list[int]     # target layers whose outputs it conditions on ([] for none)
    configure(config)               # optional: the generation's DDTreeConfig, before reset
    reset(target, prompt_tokens)    # a new generation starts
    draft(root_token, context_tokens, context_hidden[, depth]) -> mx.array [block_size - 1, vocab] log-probs
    candidates(root_token, context_tokens, context_hidden, width[, depth]) -> tree.Candidates   # optional

`context_tokens` are the tokens the target processed since the last call (the prompt on the first call, then
the root and the accepted nodes of each cycle), and `context_hidden` [len(context_tokens), F] their outputs at
`target_layer_ids`, concatenated (None when target_layer_ids is empty). Row d of the result is the drafter's
distribution for the token d + 1 places after the root. A drafter may also offer `candidates`: the top `width`
tokens per depth, best first (numpy arrays, or lazy MLX ones the session evaluates), which the session then uses
instead of a top-k over the dense rows: prompt lookup's are sparse, a DFlash drafter's may span part of the
vocabulary. Either method may also take a keyword `depth`: the session then passes the depth the cycle's tree can
reach, min(block_size - 1, the tree budget or, with DDTREE_TREE_BUDGET=auto, its cap), block_size - 1 on the single
path, and the drafter returns that many rows (a DFlash drafter's forward costs less over a shorter block). A drafter
without it drafts its whole block, and the tree uses the rows it reaches.

A drafter class may also offer a static `candidates_together(drafters, contexts, width, depth)`: several rows'
candidates at once (a batch's rows, each with its own drafter of that class; contexts[b] = (root_token,
context_tokens, context_hidden) for drafters[b]), one forward shared where the drafters' weights are.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import mlx.core as mx
from dflash_mlx.model import DFlashDraftModel

from ..models.adapter import TargetAdapter
from ..tree.build import Candidates, top_candidates
from .dflash import DFlashDrafter


class Drafter(Protocol):
    block_size: int
    target_layer_ids: Sequence[int]

    def reset(self, target: TargetAdapter, prompt_tokens: list[int]) -> None: ...

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: mx.array | None) -> mx.array: ...


def as_drafter(draft_model: Any) -> Drafter:
    """Wrap a DFlashDraftModel; pass any object that follows the drafter protocol through unchanged."""
    if isinstance(draft_model, DFlashDraftModel):
        return DFlashDrafter(draft_model)
    missing = [name for name in ("block_size", "target_layer_ids", "reset", "draft") if not hasattr(draft_model, name)]
    if missing:
        raise ValueError(
            f"draft_model {type(draft_model).__name__} lacks {', '.join(missing)}: pass a dflash_mlx "
            "DFlashDraftModel or an object following the drafter protocol in ddtree_mlx.drafting.protocol"
        )
    return draft_model


def depth_keyword(method: Callable, depth: int) -> dict[str, int]:
    """The `depth` keyword for a drafter's draft or candidates if it takes one ({} otherwise: a drafter written
    without it keeps working, drafting its whole block)."""
    return {"depth": depth} if takes_depth(getattr(method, "__func__", method)) else {}


@functools.lru_cache(maxsize=64)
def takes_depth(function: Callable) -> bool:
    """Per function, not per call: reading a signature costs ~0.1 ms, on every cycle otherwise."""
    return "depth" in inspect.signature(function).parameters


class DraftRequest(NamedTuple):
    """What one generation's drafter reads this cycle: (root_token, context_tokens, context_hidden), and the top
    `width` per position it is asked for, `depth` positions deep."""

    context: tuple[int, list[int], mx.array | None]
    width: int
    depth: int


def propose(drafter: Drafter, request: DraftRequest) -> Candidates:
    """The drafter's top candidates for one generation (lazy where it drafts with MLX)."""
    if hasattr(drafter, "candidates"):  # it picks its own top tokens (sparse, or a part of the vocabulary)
        keyword = depth_keyword(drafter.candidates, request.depth)
        return drafter.candidates(*request.context, request.width, **keyword)
    return top_candidates(drafter.draft(*request.context, **depth_keyword(drafter.draft, request.depth)),
                          request.width)


def propose_rows(drafters: Sequence[Drafter], requests: Sequence[DraftRequest]) -> list[Candidates]:
    """`propose` for several generations (a batch's rows, asked alike), together where their drafters' class can."""
    kind = type(drafters[0])
    together = getattr(kind, "candidates_together", None)
    if len(drafters) > 1 and together is not None and all(type(drafter) is kind for drafter in drafters):
        return together(drafters, [request.context for request in requests], requests[0].width, requests[0].depth)
    return [propose(drafter, request) for drafter, request in zip(drafters, requests)]
