"""Splitting a loaded target across processes (`mlx.launch`): tensor parallel with mlx-lm's own `model.shard`,
pipeline parallel with mlx-lm's `model.pipeline` where it has one, else the same even split of layers done here.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from ..models.registry import adapter_for


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


def pipeline(model: Any, group: Any = None) -> Any:
    """Pipeline parallel over `group` (default: every process mlx.launch started): each rank keeps a contiguous run
    of layers, evenly split. mlx-lm's own model.pipeline where it has one (qwen3_5); for other families the same
    split, done here (our verify and forward run the layers themselves, so the model's own call is not needed)."""
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
