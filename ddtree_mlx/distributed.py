"""A target sharded across processes with mx.distributed (tensor parallelism, `mlx.launch`).

mlx-lm shards a model in place with `model.shard(group)`: attention heads, GatedDeltaNet heads and MLP columns are
split across ranks, the projections that leave a block all-reduce, and Qwen 3.5's LM head is split over the
vocabulary. Verify runs the same layer objects, so it communicates where they do; what it adds is the reduce
after a GatedDeltaNet's output projection (mlx-lm's layer does it in its own call) and the gather of vocabulary
slices into whole logits.

Every rank then runs the same loop on the same tokens: the drafter is replicated (same weights, same hidden
states, which the all-reduces make identical), so every rank builds the same tree and walks the same path. The
one thing that could differ is what is measured in seconds: the automatic tree size reads rank 0's clock on every
rank (`broadcast`), so all ranks verify the same trees and their collectives stay paired.

MLX's collectives wait forever for a rank that died or hung; `watched` bounds that wait (DDTREE_RANK_TIMEOUT).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

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


def check_shardable(config: dict, ranks: int) -> None:
    """mlx-lm splits heads evenly across ranks (Qwen 3.5 repeats KV heads when there are fewer than ranks); a
    model whose heads do not divide would be split mid-head. `config`: the model's config.json (or its args)."""
    text = config.get("text_config", config)
    counts = {name: text.get(name) for name in ("num_attention_heads", "num_key_value_heads",
                                                "linear_num_key_heads", "linear_num_value_heads")}
    repeat = text.get("model_type", "").startswith("qwen3_5") and counts["num_key_value_heads"]
    bad = {name: count for name, count in counts.items() if count and count % ranks
           and not (name == "num_key_value_heads" and repeat and ranks % count == 0)}
    if bad:
        raise ValueError(f"tensor parallel over {ranks} processes needs head counts divisible by {ranks}, but "
                         f"{bad}; launch a number of processes that divides them (-n in mlx.launch)")


def shard(model: Any, group: Any = None) -> Any:
    """Tensor-parallel: mlx-lm's own model.shard over `group` (default: every process mlx.launch started)."""
    group = group or mx.distributed.init()
    if not hasattr(model, "shard"):
        raise ValueError(f"{type(model).__module__} has no tensor-parallel shard() in mlx-lm; run it on one machine")
    args = getattr(model, "args", None)
    check_shardable(dict(vars(args), text_config=getattr(args, "text_config", None) or vars(args)), group.size())
    model.shard(group)
    mx.eval(model.parameters())
    return model


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


def pipeline(model: Any, group: Any = None) -> Any:
    """Pipeline parallel over `group` (default: every process mlx.launch started): each rank keeps a contiguous run
    of layers, evenly split. mlx-lm's own model.pipeline where it has one (qwen3_5); for other families the same
    split, done here (our verify and forward run the layers themselves, so the model's own call is not needed)."""
    from .models import adapter_for

    group = group or mx.distributed.init()
    adapter = adapter_for(model)
    inner, count = adapter.inner, adapter.num_layers
    if count < group.size():
        raise ValueError(f"pipeline parallel over {group.size()} processes needs at least as many layers, not {count}")
    adapter.check_cache(adapter.make_cache())  # before splitting: e.g. sliding-window layers are refused here
    if hasattr(inner, "pipeline"):
        inner.pipeline(group)
    else:
        rank, size = group.rank(), group.size()
        base, extra = divmod(count, size)
        split = [base + (r < extra) for r in range(size)]
        start = sum(split[rank + 1 :])
        end = start + split[rank]
        inner.layers = [None] * start + inner.layers[start:end]
        inner.pipeline_rank, inner.pipeline_size, inner.start_idx, inner.end_idx = rank, size, start, end
    stage = adapter_for(model)
    if not any(stage.is_attention_cache(entry) for entry in stage.make_cache()):
        raise ValueError(f"pipeline stage {group.rank()} has no attention layer (only recurrent ones), so it cannot "
                         "tell the context's length; launch fewer processes")
    mx.eval(model.parameters())
    return model


def silence_other_ranks() -> None:
    """Every rank computes; only rank 0 prints (or serves)."""
    if mx.distributed.init().rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def broadcast(values: list[float], group: Any) -> list[float]:
    """Rank 0's values, on every rank."""
    mine = mx.array([float(v) for v in values], dtype=mx.float32) * (group.rank() == 0)
    return mx.distributed.all_sum(mine, group=group).tolist()


def gather_last_axis(x: mx.array, group: Any) -> mx.array:
    """Concatenate every rank's slice of the last axis (vocabulary-sharded logits), in rank order."""
    parts = mx.distributed.all_gather(x[None], group=group)  # [ranks, ..., slice]
    return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)


STOPPED = 75  # the exit status of a rank the watchdog stops (EX_TEMPFAIL: run it again once every rank is up)


class Watchdog:
    """A thread that ends this process when sharded work makes no progress for `timeout` seconds: the main thread,
    blocked inside a collective whose peer is gone, cannot be interrupted any other way. Armed only while work
    runs (a prefill, a cycle, a calibration), never while a rank waits for its next request."""

    def __init__(self, rank: int):
        self.rank, self.timeout, self.armed, self.last = rank, 0.0, 0, time.monotonic()
        threading.Thread(target=self.watch, daemon=True, name="ddtree-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def watch(self) -> None:
        while True:
            time.sleep(0.25)
            if self.armed and time.monotonic() - self.last > self.timeout:
                print(f"ddtree-mlx: rank {self.rank} made no progress for {self.timeout:g} s: a rank has died or hung "
                      "(this one or another), so it stops (restart every rank; DDTREE_RANK_TIMEOUT sets the limit)",
                      file=sys.__stderr__, flush=True)  # a rank that does not print still says why it stops
                os._exit(STOPPED)


_WATCHDOG: Watchdog | None = None


@contextmanager
def watched(group: Any, timeout: float) -> Iterator[None]:
    """Run the block under the watchdog (nothing unsharded): it must finish, or `beat()`, within `timeout` s."""
    global _WATCHDOG
    if group is None:
        yield
        return
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(group.rank())
    _WATCHDOG.timeout = timeout
    _WATCHDOG.beat()
    _WATCHDOG.armed += 1
    try:
        yield
    finally:
        _WATCHDOG.armed -= 1


def beat() -> None:
    """Progress inside a long watched block (a prefill chunk)."""
    if _WATCHDOG is not None:
        _WATCHDOG.beat()
