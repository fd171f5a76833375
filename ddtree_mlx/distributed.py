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
"""

from __future__ import annotations

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


def broadcast(values: list[float], group: Any) -> list[float]:
    """Rank 0's values, on every rank."""
    mine = mx.array([float(v) for v in values], dtype=mx.float32) * (group.rank() == 0)
    return mx.distributed.all_sum(mine, group=group).tolist()


def gather_last_axis(x: mx.array, group: Any) -> mx.array:
    """Concatenate every rank's slice of the last axis (vocabulary-sharded logits), in rank order."""
    parts = mx.distributed.all_gather(x[None], group=group)  # [ranks, ..., slice]
    return mx.moveaxis(parts, 0, -2).reshape(*x.shape[:-1], -1)
