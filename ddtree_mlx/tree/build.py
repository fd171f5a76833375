"""Growing a draft tree from a drafter's candidates: best-first construction (DDTree, Algorithm 1) and the single
path (the DFlash baseline). Every prefix of the pop order is the best tree of that size.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .draft_tree import DraftTree


@dataclass
class Candidates:
    """The drafter's top tokens per depth, best first: tokens[d] and log_probs[d] for depth d + 1."""

    tokens: np.ndarray  # [D, K] int
    log_probs: np.ndarray  # [D, K] float, descending along K

    def to_numpy(self) -> "Candidates":
        return Candidates(np.array(self.tokens), np.array(self.log_probs, dtype=np.float64))

    def first(self, depths: int) -> "Candidates":
        return Candidates(self.tokens[:depths], self.log_probs[:depths])


def top_candidates(log_probs: mx.array, k: int) -> Candidates:
    """Top-k per position, best first, selected in MLX so only [D, k] values cross to the host.
    Returns MLX arrays (lazy); `to_numpy` after evaluating them."""
    k = min(k, log_probs.shape[-1])
    tokens = mx.argpartition(-log_probs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(log_probs, tokens, axis=-1).astype(mx.float32)
    order = mx.argsort(-values, axis=-1)
    return Candidates(mx.take_along_axis(tokens, order, -1), mx.take_along_axis(values, order, -1))


def build_tree(candidates: Candidates, root_token: int, budget: int) -> DraftTree:
    """Best-first search over prefixes scored by the sum of per-position log-probs (DDTree, Algorithm 1).

    The heap holds frontier candidates (score, parent node, depth, rank); popping one adds it to the tree and
    pushes its next sibling (same parent, next rank) and its first child (next depth, rank 0). Neither can score
    higher than the node that spawned it, so the pops are the budget-sized prefix-closed set of highest score,
    and every prefix of the pop order is the best tree of its own size (tree_size chooses among them).
    """
    tree = DraftTree.root_only(root_token)
    depth_limit, width = candidates.tokens.shape
    if budget <= 0 or depth_limit == 0:
        return tree
    top_k = min(budget, width)
    scores = candidates.log_probs
    heap = [(-scores[0, 0], 0, 0, 0)]  # (-score, parent, depth index, rank)
    while heap and len(tree) <= budget:
        neg_score, parent, depth, rank = heapq.heappop(heap)
        node = tree.add(parent, int(candidates.tokens[depth, rank]), rank, float(-neg_score))
        parent_score = -neg_score - scores[depth, rank]
        if rank + 1 < top_k:
            heapq.heappush(heap, (-(parent_score + scores[depth, rank + 1]), parent, depth, rank + 1))
        if depth + 1 < depth_limit:
            heapq.heappush(heap, (neg_score - scores[depth + 1, 0], node, depth + 1, 0))
    return tree


def chain_tree(candidates: Candidates, root_token: int) -> DraftTree:
    """The single DFlash path: the drafter's first choice at every depth."""
    tree = DraftTree.root_only(root_token)
    for depth, token in enumerate(candidates.tokens[:, 0]):
        tree.add(depth, int(token), 0, tree.scores[-1] + float(candidates.log_probs[depth, 0]))
    return tree
