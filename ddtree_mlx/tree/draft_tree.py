"""The draft tree: the index tables verify needs, and the walk down it.

Node 0 is the root: the last committed token, whose target output has not been computed yet. Nodes 1.. are draft
tokens numbered in pop order, so every parent precedes its children.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]
    depths: list[int]
    ranks: list[int]
    """Rank of each node's token among its depth's draft candidates (0 = the drafter's first choice)."""
    children: list[dict[int, int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    """Each node's path log-probability under the candidates the tree was built from (root: 0)."""

    @classmethod
    def root_only(cls, token: int) -> "DraftTree":
        return cls(tokens=[token], parents=[-1], depths=[0], ranks=[0], children=[{}], scores=[0.0])

    def add(self, parent: int, token: int, rank: int, score: float = 0.0) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.ranks.append(rank)
        self.children.append({})
        self.scores.append(score)
        self.children[parent][token] = node
        return node

    def prefix(self, size: int, depth: int | None = None) -> "DraftTree":
        """The first `size` nodes no deeper than `depth` (any depth: None): parents precede children and are no
        deeper, so they form a tree (of best-first pops, the best tree of that size and depth)."""
        kept = [node for node, deep in enumerate(self.depths) if depth is None or deep <= depth][:size]
        new = {old: node for node, old in enumerate(kept)}
        children = [{token: new[child] for token, child in self.children[old].items() if child in new} for old in kept]
        return DraftTree([self.tokens[old] for old in kept], [new.get(self.parents[old], -1) for old in kept],
                         [self.depths[old] for old in kept], [self.ranks[old] for old in kept], children,
                         [self.scores[old] for old in kept])

    def padded(self, rows: int) -> "DraftTree":
        """The tree and leaves under the root up to `rows` nodes, which verify computes and nothing reads: no
        walk reaches them (they are in no `children`). Some machines verify some sizes faster than smaller ones
        (calibration.VerifyCosts.rows)."""
        extra = rows - len(self)
        if extra <= 0:
            return self
        return DraftTree(self.tokens + [self.tokens[0]] * extra, self.parents + [0] * extra,
                         self.depths + [1] * extra, self.ranks + [0] * extra,
                         self.children + [{} for _ in range(extra)], self.scores + [-np.inf] * extra)

    def __len__(self) -> int:
        return len(self.tokens)

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> np.ndarray:
        """[T, T] bool: mask[t, s] is True when s is t itself or one of its ancestors."""
        size = len(self)
        mask = np.zeros((size, size), dtype=bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                mask[node] = mask[parent]
            mask[node, node] = True
        return mask

    def window_index(self, width: int) -> np.ndarray:
        """[T, width] rows of concat(cached_window[width-1], nodes[T]): each node's width-1 nearest ancestors
        (oldest first) then itself. Above the root the window continues into the cached rows."""
        cached = width - 1
        table = np.zeros((len(self), width), dtype=np.int32)
        for node, parent in enumerate(self.parents):
            if parent < 0:
                table[node, :-1] = np.arange(cached)
            else:
                table[node, :-1] = table[parent, 1:]
            table[node, -1] = cached + node
        return table


@dataclass
class Walk:
    """The longest root path whose every draft token is the target's own choice at its parent, still on the device:
    its nodes, root first, padded by repeating the last one to the tree's depth + 1 entries (a shape known before
    the target's tokens are), and how many of them are the path. A commit can be built on it while the device
    computes the verify, and the host reads it once, after."""

    nodes: mx.array  # [depth + 1] int32
    length: mx.array  # [] int32

    @classmethod
    def of(cls, tree: DraftTree, target_tokens: mx.array) -> "Walk":
        if len(tree) == 1:  # constants, not ops: evaluating them must not wait behind a queued step
            return cls(mx.array([0], mx.int32), mx.array(1, mx.int32))
        tables = np.array([tree.tokens, np.maximum(tree.parents, 0), tree.depths], dtype=np.int32)
        levels = mx.arange(max(tree.depths) + 1, dtype=mx.int32)
        return cls(*_walk(mx.array(tables), mx.array(tree.ancestor_mask()), levels, target_tokens))

    def path(self) -> list[int]:
        """The path's nodes (after the walk was evaluated)."""
        return self.nodes.tolist()[: self.length.item()]


@mx.compile
def _walk(tables: mx.array, ancestors: mx.array, levels: mx.array, target_tokens: mx.array):
    tokens, parents, depths = tables
    matches = (tokens == target_tokens[parents].astype(mx.int32)) | (depths == 0)  # the root is always accepted
    accepted = ~mx.any(ancestors & ~matches, axis=1)  # every node from the root to it matches; these form one path
    last = mx.argmax(mx.where(accepted, depths, -1))
    on_path = ancestors[last] & (depths == mx.minimum(levels, depths[last])[:, None])  # [depth + 1, T]
    return mx.argmax(on_path.astype(mx.int32), axis=1).astype(mx.int32), depths[last] + 1
