"""A target split across processes with mx.distributed, as the layers see it.

Tensor parallel (mlx-lm's `model.shard(group)`): attention heads, GatedDeltaNet heads and MLP columns are split
across ranks, the projections that leave a block all-reduce, and Qwen 3.5's LM head is split over the vocabulary.
Verify runs the same layer objects, so it communicates where they do; what it adds is the reduce after a
GatedDeltaNet's output projection (mlx-lm's layer does it in its own call) and the gather of vocabulary slices
into whole logits. Pipeline parallel: each rank runs a stage of whole layers and hands hidden states on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

SHARDED = (nn.AllToShardedLinear, nn.ShardedToAllLinear, nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear)


def sharding_group(model: Any) -> Any:
    """The group a model was sharded over with model.shard(group), or None for a whole model."""
    for _, module in model.named_modules():
        group = getattr(module, "sharding_group", None) or (module.group if isinstance(module, SHARDED) else None)
        if group is not None and group.size() > 1:
            return group
    return None


@dataclass(frozen=True)
class Stage:
    """Pipeline parallel: this rank runs layers [start, end). As in mlx-lm, the last rank runs the first layers
    and rank 0 the last, so hidden states travel from rank size - 1 down to rank 0."""

    rank: int
    size: int
    start: int
    end: int
    group: Any


def pipeline_stage(inner: Any) -> Stage | None:
    """The stage of a model split with `pipeline` (mlx-lm's convention: start_idx/end_idx on the layers' owner)."""
    size = getattr(inner, "pipeline_size", 1)
    if size <= 1:
        return None
    return Stage(inner.pipeline_rank, size, inner.start_idx, inner.end_idx, mx.distributed.init())


def gather_last_axis(x: mx.array, group: Any) -> mx.array:
    """Concatenate every rank's slice of the last axis (vocabulary-sharded logits), in rank order."""
    parts = mx.distributed.all_gather(x[None], group=group)  # [ranks, ..., slice]
    return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)


def receive(stage: Stage | None, h: mx.array) -> mx.array:
    """Pipeline parallel: a stage after the first takes its input from the rank that runs the layers before."""
    if stage is None or stage.rank == stage.size - 1:
        return h
    return mx.distributed.recv_like(h, stage.rank + 1, group=stage.group)


def pass_on(stage: Stage | None, h: mx.array, captured: dict[int, mx.array], capture_layers: list[int],
            last_entry: Any = None) -> tuple[mx.array, mx.array | None]:
    """The last layer's output [1, n, hidden] and the captured layers' outputs concatenated in layer order [n, F]
    (None if none). Pipeline parallel, on every rank: a stage hands its output to the next one (rank - 1; rank 0
    runs the last layers), then one all_gather gives every rank rank 0's output and every captured layer (each
    rank sends the ones it ran, zeros for the others: their sum is exact)."""
    if stage is None:
        return h, mx.concatenate([captured[i] for i in sorted(captured)], axis=-1)[0] if captured else None
    if stage.rank != 0:
        h = mx.distributed.send(h, stage.rank - 1, group=stage.group)
        if last_entry is not None:  # writing the cache runs the send too (a prefill chunk evaluates only the cache)
            tie(last_entry, h)
    mine = [captured.get(i, mx.zeros_like(h)) for i in sorted(set(capture_layers))]
    everything = mx.distributed.all_gather(mx.concatenate([h, *mine], axis=-1), group=stage.group)
    width = h.shape[-1]
    return everything[:1, :, :width], everything[:, :, width:].sum(axis=0) if mine else None


def tie(entry: Any, h: mx.array) -> None:
    """Make evaluating a cache entry evaluate `h` too (as mlx-lm's pipelined models do)."""
    if hasattr(entry, "keys"):
        entry.keys = mx.depends(entry.keys, h)
    else:
        entry[0] = mx.depends(entry[0], h)
