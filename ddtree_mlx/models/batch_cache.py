"""A batch's caches held together: attention in one padded buffer per layer, so a forest verify runs one attention
per layer for all its rows (as mlx-lm's BatchKVCache lets its batch step do) instead of one per row; a hybrid's
recurrent layers (conv window, gated-delta state) stacked [rows, ...] per layer, as mlx-lm's batch holds them, so
a plain batched step runs mlx-lm's own layer over them in place.

Rows accept paths of different lengths, so their ends drift apart: row r's tokens are the first offsets[r]
columns of its buffer row. A verify writes every row's tree keys after the longest row (columns start.. start +
nodes) and masks each row's queries to its own columns and its tree's ancestors; a commit copies each row's
accepted path to its own end. The copies of all rows are gathered and scattered in one operation per layer, done
lazily before the buffer is next read. Measured on this CPU (8 rows, SmolLM2's 30 layers of 3 KV heads): per-row
attention and commits cost ~14 us an operation, a row's share of the padded one a fraction of that.

A session's cache holds a RowKV per attention layer: its row of the layer's RowsKV, with KVCache's offset, trim and
state; a copy of it (the prompt cache's) is a plain KVCache of that row. Likewise a RowArrays per recurrent layer,
whose copy is an ArraysCache of arrays of its own (a slice would keep every row's stacked arrays alive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache

from .verify import Forest

STEP = 256  # columns the buffers grow by, as mlx-lm's KVCache
# Padded query rows one attention may waste per row before each row attends apart: on this CPU (SmolLM2, 8 rows,
# ~300 tokens of context) a padded query row costs ~1 ms over a forward, a row attending apart ~2.5 ms of
# per-operation overhead; trees of 1 to 8 nodes (23 in all, 64 padded) measured 245 ms padded, 193 ms apart;
# trees of 3 nodes each 179 ms padded, 191 apart.
PADDING_PER_ROW = 2


@dataclass(eq=False)  # a slot is one row's: a stale one never equals a live one
class Slot:
    index: int  # the row's place in every layer's buffer (rows leaving renumber the ones after them)


@dataclass(eq=False)
class CommitIndices:
    """The gather (tree node) and scatter (buffer column) indices of the rows' pending commits. Every attention
    layer of a batch holds the same rows' ends and paths (the very path objects), so one CommitIndices serves
    them all: built once a cycle, not once a layer (30 times on SmolLM2, reading each path to the host each time).
    Every row writes as many columns: a path shorter than the longest repeats its last node past its end, a row
    without a commit writes past its offset (never read)."""

    key: tuple = ()
    paths: list[mx.array] = field(default_factory=list)  # the key's paths, held so that their ids stay theirs
    arrays: tuple[mx.array, mx.array] | None = None

    def of(self, pending: dict[int, tuple[int, mx.array]], offsets: list[int]) -> tuple[mx.array, mx.array]:
        key = (tuple(offsets), tuple((row, end, id(path)) for row, (end, path) in sorted(pending.items())))
        if key != self.key or self.arrays is None:
            self.key, self.paths = key, [path for _, path in pending.values()]
            self.arrays = self.build(pending, offsets)
        return self.arrays

    @staticmethod
    def build(pending: dict[int, tuple[int, mx.array]], offsets: list[int]) -> tuple[mx.array, mx.array]:
        width = max(path.shape[0] for _, path in pending.values())
        source = np.zeros((len(offsets), 1, width, 1), np.int32)
        target = np.array(offsets, np.int32)[:, None, None, None] + np.arange(width, dtype=np.int32)[:, None]
        for row, (end, path) in pending.items():
            nodes = np.array(path)
            source[row, 0, :, 0] = np.append(nodes, np.full(width - len(nodes), nodes[-1]))
            target[row, 0, :, 0] = end + np.arange(width)
        return mx.array(source), mx.array(target)


@dataclass
class RowsKV:
    """One attention layer's keys and values of every row: [rows, Hkv, capacity, D]."""

    keys: mx.array | None = None
    values: mx.array | None = None
    offsets: list[int] = field(default_factory=list)
    tree: tuple[mx.array, mx.array] | None = None  # the last verify's tree keys and values [rows, Hkv, nodes, D]
    pending: dict[int, tuple[int, mx.array]] = field(default_factory=dict)  # row -> (its end, its path)
    indices: CommitIndices = field(default_factory=CommitIndices)  # a batch's: shared by its layers

    @property
    def rows(self) -> int:
        return len(self.offsets)

    def add(self, entries: list[KVCache]) -> None:
        """Rows joining: their keys and values after the buffer's rows, written into one new block per layer (one
        row after another measured 0.2-0.35 s for 8 rows' 30 layers here, each row copying the rows before it)."""
        self.flush()
        columns = max(entry.offset for entry in entries)
        if self.keys is not None:
            self.reserve(columns)
        width = self.keys.shape[2] if self.keys is not None else -(-columns // STEP) * STEP
        keys, values = (self.block(entries, width, part) for part in ("keys", "values"))
        self.keys, self.values = (keys, values) if self.keys is None else (
            mx.concatenate([self.keys, keys]), mx.concatenate([self.values, values]))
        self.offsets += [entry.offset for entry in entries]

    @staticmethod
    def block(entries: list[KVCache], width: int, part: str) -> mx.array:
        """[rows, Hkv, width, D]: each entry's keys or values up to its offset, then zeros."""
        first = getattr(entries[0], part)
        block = mx.zeros((len(entries), first.shape[1], width, first.shape[3]), first.dtype)
        for row, entry in enumerate(entries):
            block[row : row + 1, :, : entry.offset] = getattr(entry, part)[..., : entry.offset, :]
        return block

    def remove(self, rows: list[int]) -> None:
        """Rows leaving, in one gather per buffer."""
        self.flush()
        keep = mx.array([index for index in range(self.rows) if index not in rows])
        self.offsets = [offset for index, offset in enumerate(self.offsets) if index not in rows]
        self.keys, self.values = (None, None) if not self.offsets else (self.keys[keep], self.values[keep])
        if self.tree is not None:  # a queued step's tree: the other rows commit from it later
            self.tree = (None, None) if not self.offsets else (self.tree[0][keep], self.tree[1][keep])

    def entry(self, row: int) -> KVCache:
        """A plain KVCache of the row's tokens, in arrays of its own (a view would keep every row's buffer)."""
        entry = KVCache()
        entry.state = (*map(mx.contiguous, self.columns(row)), self.offsets[row])
        return entry

    def columns(self, row: int) -> tuple[mx.array, mx.array]:
        """The row's keys and values [1, Hkv, offset, D]."""
        self.flush()
        offset = self.offsets[row]
        return self.keys[row : row + 1, :, :offset], self.values[row : row + 1, :, :offset]

    def reserve(self, columns: int) -> None:
        short = columns - self.keys.shape[2]
        if short > 0:
            grow = [(0, 0), (0, 0), (0, -(-short // STEP) * STEP), (0, 0)]
            self.keys, self.values = mx.pad(self.keys, grow), mx.pad(self.values, grow)

    def with_tree(self, keys: mx.array, values: mx.array, write: bool = True) -> tuple[mx.array, mx.array] | None:
        """A verify's tree keys and values [rows, Hkv, nodes, D], kept for the rows' commits; with `write`, also
        put after the longest row's columns: every row's keys and values to attend to."""
        self.flush()
        self.tree = keys, values
        start, nodes = max(self.offsets), keys.shape[2]
        self.reserve(start + nodes)  # where the commits will copy to, written or not
        if not write:
            return None
        self.keys[:, :, start : start + nodes, :] = keys  # in place, as KVCache's update
        self.values[:, :, start : start + nodes, :] = values
        return self.keys[:, :, : start + nodes, :], self.values[:, :, : start + nodes, :]

    def commit(self, row: int, path: mx.array) -> None:
        """The row's accepted path (its tree's node indices, root first), copied to its end at the next flush."""
        end = self.offsets[row]
        self.pending[row] = (end, path)
        self.offsets[row] = end + path.shape[0]

    def flush(self) -> None:
        """The pending commits, all rows' in one gather from the tree's keys and values and one scatter into the
        buffers: gathered from the tree, not the buffer, so the scatter updates the buffer in place (measured: 19
        -> 2 ms a cycle for 8 rows' 30 layers)."""
        if not self.pending:
            return
        source, target = self.indices.of(self.pending, self.offsets)
        self.pending = {}
        keys, values = self.tree
        self.keys = mx.put_along_axis(self.keys, target, mx.take_along_axis(keys, source, 2), 2)
        self.values = mx.put_along_axis(self.values, target, mx.take_along_axis(values, source, 2), 2)


class RowKV:
    """A row's entry in one attention layer of a session's cache: what the session reads of a KVCache."""

    def __init__(self, layer: RowsKV, slot: Slot):
        self.layer, self.slot = layer, slot

    @property
    def offset(self) -> int:
        return self.layer.offsets[self.slot.index]

    @property
    def state(self) -> tuple:
        return self.layer.keys, self.layer.values, self.offset

    @property
    def nbytes(self) -> int:
        return (self.layer.keys.nbytes + self.layer.values.nbytes) // self.layer.rows

    def trim(self, count: int) -> int:
        count = min(self.offset, count)
        self.layer.offsets[self.slot.index] -= count
        return count

    def __deepcopy__(self, memo: dict) -> KVCache:
        return self.layer.entry(self.slot.index)


@dataclass
class RowsCapture:
    """A row's part of a padded verify: its commit copies the accepted path from its tree's keys and values."""

    layer: RowsKV
    slot: Slot

    def commit(self, cache_entry: RowKV, path: mx.array) -> None:
        self.layer.commit(self.slot.index, path)


class RowsArrays(ArraysCache):
    """One recurrent layer's arrays of every row, [rows, ...] each (mlx-lm's batch ArraysCache): a plain batched
    step of all rows hands it to mlx-lm's layer as it is. Rows join after their prefill, so every part is set."""

    def __init__(self, size: int):
        super().__init__(size)
        self.rows = 0

    def add(self, entries: list[ArraysCache]) -> None:
        joining = ArraysCache.merge(entries).cache  # mlx-lm's stacking of rows' caches
        self.cache = joining if not self.rows else [mx.concatenate(parts) for parts in zip(self.cache, joining)]
        self.rows += len(entries)

    def remove(self, rows: list[int]) -> None:
        keep = [index for index in range(self.rows) if index not in rows]
        self.rows = len(keep)
        self.cache = [None] * len(self.cache) if not keep else [part[mx.array(keep)] for part in self.cache]

    def entry(self, row: int) -> ArraysCache:
        """An ArraysCache of the row, in arrays of its own."""
        entry = ArraysCache(len(self.cache))
        entry.cache = [mx.contiguous(part[row : row + 1]) for part in self.cache]
        mx.eval(entry.cache)  # until then the copy's graph holds the stacked arrays
        return entry


class RowArrays:
    """A row's entry in one recurrent layer of a session's cache: what the session, the tree verify and mlx-lm's
    layer read and write of an ArraysCache, kept in its row of the layer's RowsArrays (a write updates that row
    in place)."""

    lengths = left_padding = None  # mlx-lm's padding of a batch's rows: a row has none

    def __init__(self, layer: RowsArrays, slot: Slot):
        self.layer, self.slot = layer, slot

    def __getitem__(self, part: int) -> mx.array:
        return self.layer[part][self.slot.index : self.slot.index + 1]

    def __setitem__(self, part: int, value: mx.array) -> None:
        self.layer[part][self.slot.index : self.slot.index + 1] = value

    @property
    def state(self) -> list[mx.array]:
        return self.layer.cache

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.layer.cache) // self.layer.rows

    def __deepcopy__(self, memo: dict) -> ArraysCache:
        return self.layer.entry(self.slot.index)


class BatchCaches:
    """The caches of a batch's rows held together: one RowsKV per attention layer (unless `attention` is off: a
    quantized KV cache stays each row's own), one RowsArrays per recurrent layer. A row joins with its session's
    cache (those entries move into the layers' arrays) and leaves with a plain one again."""

    def __init__(self, attention: bool = True) -> None:
        self.attention = attention
        self.layers: dict[int, RowsKV | RowsArrays] = {}
        self.slots: list[Slot] = []
        self.indices = CommitIndices()

    @staticmethod
    def joined(cache: list[Any]) -> bool:
        return any(isinstance(entry, (RowKV, RowArrays)) for entry in cache)

    def join(self, caches: list[list[Any]]) -> list[list[Any]]:
        """Rows joining together: each session's cache with its entries moved into the layers' arrays."""
        slots = [Slot(len(self.slots) + row) for row in range(len(caches))]
        self.slots += slots
        joined = [list(cache) for cache in caches]
        for index, entry in enumerate(caches[0]):
            layer = self.layer(index, entry)
            if layer is None:
                continue
            layer.add([cache[index] for cache in caches])
            row_entry = RowKV if isinstance(layer, RowsKV) else RowArrays
            for cache, slot in zip(joined, slots):
                cache[index] = row_entry(layer, slot)
        return joined

    def layer(self, index: int, entry: Any) -> RowsKV | RowsArrays | None:
        """The batch's layer that holds entries like `entry` at `index` (None: rows keep their own)."""
        if type(entry) is KVCache and self.attention:
            return self.layers.setdefault(index, RowsKV(indices=self.indices))
        if type(entry) is ArraysCache:
            return self.layers.setdefault(index, RowsArrays(len(entry.cache)))
        return None

    def leave(self, cache: list[Any]) -> list[Any]:
        """The row's cache as plain entries; its row leaves the layers."""
        plain = [entry.layer.entry(entry.slot.index) if isinstance(entry, (RowKV, RowArrays)) else entry
                 for entry in cache]
        self.drop([cache])
        return plain

    def drop(self, caches: list[list[Any]]) -> None:
        """Rows leave the layers (finished or cancelled generations: nothing is copied out); the rows after them
        move up."""
        slots = [next((entry.slot for entry in cache if isinstance(entry, (RowKV, RowArrays))), None)
                 for cache in caches]
        gone = sorted(slot.index for slot in slots if slot is not None and slot in self.slots)
        if not gone:
            return
        for layer in self.layers.values():
            layer.remove(gone)
        self.slots = [slot for slot in self.slots if slot.index not in gone]
        for index, slot in enumerate(self.slots):
            slot.index = index


@dataclass
class Padding:
    """A forest's nodes (packed one row after another) laid out as [rows, nodes, ...] for padded attention: each row
    its tree's nodes then padding; a buffer row not in the forest, padding only."""

    pad: mx.array  # [rows * nodes]: the packed node at each padded place (padding repeats a real one)
    unpad: mx.array  # [packed]: each packed node's padded place
    nodes: int
    trees: list[np.ndarray]  # per buffer row: the ancestor mask of its tree, padding seeing only itself
    dense: bool  # padding wastes little: one attention for all rows (else one per row)
    identity: bool = False  # every buffer row's lone root, in order (a plain batched step): nothing to move
    cached_mask: mx.array | None = None
    cached_trees: mx.array | None = None
    cached_columns: mx.array | None = None

    @classmethod
    def of(cls, forest: Forest, slots: list[int], rows: int) -> "Padding":
        nodes = max(len(inputs.tree) for inputs in forest.rows)
        pad, unpad = np.zeros((rows, nodes), np.int32), []
        trees = [np.eye(nodes, dtype=bool) for _ in range(rows)]
        for slot, inputs, span in zip(slots, forest.rows, forest.spans):
            count = span.stop - span.start
            pad[slot, :count] = np.arange(span.start, span.stop)
            unpad.append(slot * nodes + np.arange(count))
            trees[slot][:count, :count] = inputs.tree.ancestor_mask()
        waste = rows * nodes - sum(map(len, unpad))
        identity = nodes == 1 and list(slots) == list(range(rows))
        return cls(mx.array(pad.reshape(-1)), mx.array(np.concatenate(unpad).astype(np.int32)), nodes, trees,
                   dense=waste <= PADDING_PER_ROW * rows, identity=identity)

    def rows(self, x: mx.array) -> mx.array:
        """Packed [1, H, T, D] -> padded [rows, H, nodes, D]."""
        if self.identity:  # no take per tensor and layer (measured 1-2% of a plain step at 8 rows here)
            return x.transpose(2, 1, 0, 3)
        heads, dim = x.shape[1], x.shape[3]
        return mx.take(x, self.pad, axis=2).reshape(heads, -1, self.nodes, dim).transpose(1, 0, 2, 3)

    def packed(self, out: mx.array) -> mx.array:
        """Padded attention output [rows, H, nodes, D] -> packed [1, T, H * D]."""
        rows, heads, nodes, dim = out.shape
        flat = out.transpose(0, 2, 1, 3).reshape(rows * nodes, heads * dim)
        return (flat if self.identity else mx.take(flat, self.unpad, axis=0))[None]

    def mask(self, offsets: list[int]) -> mx.array:
        """[rows, 1, nodes, start + nodes]: each row's own cached columns, then (from start, after the longest row)
        its tree's ancestors. Built once: every layer of the forest has the same rows' offsets."""
        if self.cached_mask is None:
            start = max(offsets)
            mask = np.zeros((len(offsets), 1, self.nodes, start + self.nodes), bool)
            for row, (offset, tree) in enumerate(zip(offsets, self.trees)):
                mask[row, 0, :, :offset] = True
                mask[row, 0, :, start:] = tree
            self.cached_mask = mx.array(mask)
        return self.cached_mask

    def tree_masks(self) -> mx.array:
        """[rows, 1, 1, nodes, nodes]: each buffer row's tree's ancestor mask (split attention's tree part)."""
        if self.cached_trees is None:
            self.cached_trees = mx.array(np.stack(self.trees)[:, None, None])
        return self.cached_trees

    def columns(self, offsets: list[int]) -> mx.array:
        """[rows, 1, 1, start]: each row's own cached columns (split attention's prefix part)."""
        if self.cached_columns is None:
            self.cached_columns = mx.array(np.arange(max(offsets)) < np.array(offsets)[:, None])[:, None, None]
        return self.cached_columns
