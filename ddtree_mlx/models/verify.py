"""What one tree verify carries through the layers: the per-verify tables (TreeInputs), several rows' trees packed
into one forward (Forest), what it returns (VerifyOutput, with a capture per layer that commits the accepted path),
and the clocks that time or overlap it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..config import DDTreeConfig
from ..kernels.metal import LevelPlan
from ..kernels.recurrence import RowLayout
from ..tree.draft_tree import DraftTree


class Capture(Protocol):
    def commit(self, cache_entry: Any, path: mx.array) -> None:
        """Install the state after the accepted path (node indices, root first) into the layer's cache."""


@dataclass
class TreeInputs:
    """Per-verify tables shared by all layers."""

    tree: DraftTree
    parents: mx.array  # [T] int32, -1 for the root
    positions: mx.array  # [T] int32: prefix length + depth
    ancestors: mx.array  # [T, T] bool, ancestor-or-self
    prefix_len: int
    config: DDTreeConfig
    clock: "PartClock"
    conv_windows: dict[int, mx.array]  # kernel width -> [T, width] rows of concat(cached, nodes)
    mask: mx.array | None = None
    plan: LevelPlan | None = None
    step: bool = False  # a plain step (lone_root, a batch's lone root): keys and values go straight into the cache
    kernels: set[str] = field(default_factory=set)  # what the recurrent layers ran as: "metal" and/or "twin"

    @classmethod
    def build(cls, tree: DraftTree, prefix_len: int, config: DDTreeConfig) -> "TreeInputs":
        return cls(
            tree=tree,
            parents=mx.array(np.asarray(tree.parents, dtype=np.int32)),
            positions=mx.array(np.asarray(tree.depths, dtype=np.int32) + prefix_len),
            ancestors=mx.array(tree.ancestor_mask()),
            prefix_len=prefix_len,
            config=config,
            clock=PartClock(config.profile_verify, config.profile_detail),
            conv_windows={},
        )

    @property
    def chain(self) -> bool:
        """Whether the nodes sit at consecutive positions (a lone root, DFlash's single path)."""
        return self.tree.depths[-1] == len(self.tree) - 1

    def attention_mask(self) -> mx.array | None:
        """[T, prefix + T] bool: the prefix fully visible, ancestors inside the tree. Built on the device, once
        per verify, and only if a layer asks (the split attention does not). A lone root sees everything: no
        mask, exactly mlx-lm's one-token step."""
        if len(self.tree) == 1:
            return None
        if self.mask is None:
            self.mask = mx.concatenate([mx.ones((len(self.tree), self.prefix_len), mx.bool_), self.ancestors], 1)
        return self.mask

    def level_plan(self) -> LevelPlan:
        """The Metal recurrence's level schedule, built once per verify (not once per layer)."""
        if self.plan is None:
            self.plan = LevelPlan.of(self.tree.parents)
        return self.plan

    def window_index(self, width: int) -> mx.array:
        if width not in self.conv_windows:
            self.conv_windows[width] = mx.array(self.tree.window_index(width))
        return self.conv_windows[width]


@dataclass
class Forest:
    """The trees of several rows (generations) verified in one forward: their nodes packed one after another along
    the token axis, so embedding, projections, MLPs and LM head run once for all of them, while each row's token
    mixer runs against its own cache with its own tables. One row is the plain tree verify, with no slicing."""

    rows: list[TreeInputs]
    _positions: mx.array | None = None
    padding: Any = None  # the rows' padded layout, for a batch's padded attention (batch_cache.Padding)
    _stepped: Any = None  # stepped()'s, once built (False: no lone root steps)
    _windows: dict[int, mx.array] = field(default_factory=dict)  # window_index's, per kernel width

    def stepped(self) -> "Stepped | None":
        """A batch's lone roots, run as one plain step beside its trees' rows (None: no lone root steps); built
        once per forward, not once per layer."""
        if self._stepped is None:
            steps = [row for row, inputs in enumerate(self.rows) if inputs.step]
            self._stepped = Stepped.of(self, steps) if steps else False
        return self._stepped or None

    @property
    def clock(self) -> "PartClock":
        return self.rows[0].clock

    @property
    def spans(self) -> list[slice]:
        ends = np.cumsum([len(inputs.tree) for inputs in self.rows])
        return [slice(int(end) - len(inputs.tree), int(end)) for inputs, end in zip(self.rows, ends)]

    def split(self, x: mx.array, axis: int) -> list[mx.array]:
        """Each row's part of packed `x` along `axis` (one operation, whatever the rows)."""
        if len(self.rows) == 1:
            return [x]
        return mx.split(x, [span.stop for span in self.spans[:-1]], axis=axis)

    @property
    def positions(self) -> mx.array:
        """[T] every packed node's RoPE position: its row's prefix length + its depth (one rotation for all rows)."""
        if self._positions is None:
            self._positions = mx.array(np.concatenate([np.asarray(inputs.tree.depths, dtype=np.int32) + inputs.prefix_len
                                                       for inputs in self.rows]))
        return self._positions

    def join(self, parts: list[mx.array], axis: int) -> mx.array:
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)

    @cached_property
    def layout(self) -> RowLayout:
        return RowLayout.of([inputs.tree for inputs in self.rows])

    def window_index(self, width: int) -> mx.array:
        """[T, width] rows of concat(every row's cached window [width-1] in row order, the packed nodes): each
        node's tree window (DraftTree.window_index) within its row's. Built once per forward and width."""
        if width not in self._windows:
            cached, rows, tables = width - 1, len(self.rows), []
            for row, (inputs, span) in enumerate(zip(self.rows, self.spans)):
                own = inputs.tree.window_index(width)
                tables.append(np.where(own < cached, row * cached + own, rows * cached + span.start + own - cached))
            self._windows[width] = mx.array(np.concatenate(tables).astype(np.int32))
        return self._windows[width]


@dataclass
class Stepped:
    """A batch forest split into its lone roots (`steps`, run as one plain step) and its trees' rows (`trees`, a
    forest of their own), with the packed positions of each part's nodes and the order that packs them back."""

    steps: list[int]
    trees: list[int]
    step_nodes: mx.array
    tree_nodes: mx.array
    back: mx.array  # [T]: the concatenation [step part, tree part] in the packed order
    tree_forest: Forest

    @classmethod
    def of(cls, forest: Forest, steps: list[int]) -> "Stepped":
        trees = [row for row in range(len(forest.rows)) if row not in steps]
        spans = forest.spans
        step_nodes, tree_nodes = (np.array([node for row in rows for node in range(spans[row].start, spans[row].stop)],
                                           np.int32) for rows in (steps, trees))
        back = np.argsort(np.concatenate([step_nodes, tree_nodes]))
        return cls(steps, trees, mx.array(step_nodes), mx.array(tree_nodes), mx.array(back.astype(np.int32)),
                   Forest([forest.rows[row] for row in trees]))


@dataclass
class VerifyOutput:
    logits: mx.array  # [T, V]
    hidden: mx.array | None  # [T, F]: concatenated hidden states of the requested layers (None if none)
    captures: list[Capture]
    profile: dict[str, float] = field(default_factory=dict)  # seconds per layer part, with profile_verify
    kernels: set[str] = field(default_factory=set)
    committed: bool = False  # the root was run straight into the cache (a lone root): nothing left to commit
    started: float | None = None  # when the device first got part of this graph (EarlyStart), if it did
    waited: float = 0.0  # seconds that first hand-over blocked (EarlyStart.waited): the device's time


@dataclass
class KVCapture:
    keys: mx.array  # [1, Hkv, T, D], already rotated at the node's position
    values: mx.array

    written: bool = False  # a step's: already in the cache (tree_attention's step), nothing to commit

    def commit(self, cache_entry: KVCache, path: mx.array) -> None:
        if not self.written:
            cache_entry.update_and_fetch(self.keys[:, :, path], self.values[:, :, path])


class PartClock:
    """With DDTREE_PROFILE_VERIFY, evaluate after each layer part so its time is its own (this serializes
    MLX's lazy graph, so profiled runs are slower than real ones). DDTREE_PROFILE_DETAIL also splits the token
    mixers into their steps ("linear.conv", "attention.sdpa", ...); the mixer's own entry keeps the rest."""

    def __init__(self, enabled: bool, detail: bool = False):
        self.enabled = enabled
        self.detailed = enabled and detail
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def detail(self, part: str, value: Any) -> Any:
        return self._lap(part, value) if self.detailed else value

    def lap(self, part: str, value: mx.array) -> mx.array:
        return self._lap(part, value) if self.enabled else value

    def _lap(self, part: str, value: Any) -> Any:
        mx.eval(value)
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self.last
        self.last = now
        return value


def join_rows(a: mx.array | None, b: mx.array | None) -> mx.array | None:
    """Captured hidden states of consecutive tokens, either part possibly absent."""
    return b if a is None else a if b is None else mx.concatenate([a, b])


EARLY_EVERY = 4  # layers


class EarlyStart:
    """After the first layer and every EARLY_EVERY layers after it, start computing what is built so far: the device
    runs the first layers while Python builds the rest of the graph, instead of waiting for all of it (the same
    ops, so the same values). The first hand-over comes after one layer, so the device waits for the building of
    one layer only (after four, that was most of the host time left in a small model's tree cycle).
    `first` is when the device first got work: graph building after it is hidden behind the device. `waited` is
    how long that first hand-over blocked: MLX returns from async_eval only once few enough operations are left in
    flight (on the CPU backend a few dozen), so with a big graph the caller waits there for the device."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.waited = 0.0

    def __call__(self, index: int, h: mx.array, target: Any) -> mx.array:
        """`h` after layer `index`; never the last layer's output, which the caller may not need (a prefill
        chunk evaluates only the cache)."""
        if (index - target.first_layer) % EARLY_EVERY == 0 and index < target.first_layer + len(target.layers) - 1:
            start = time.perf_counter()
            mx.async_eval(h)
            if self.first is None:
                self.first = time.perf_counter()
                self.waited = self.first - start
        return h
