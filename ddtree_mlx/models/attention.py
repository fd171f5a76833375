"""Attention over [cached prefix, tree] with ancestor-only visibility inside the tree, each node rotated at its
own position (prefix + depth). Three forms: one masked attention over a copy of the prefix and the tree's keys,
the same split into a prefix part and a tree part merged exactly by log-sum-exp (the CPU's choice from ~1K tokens),
and mlx-lm's quantized attention for a quantized KV cache.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import rope_utils
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from ..config import DDTreeConfig
from . import cpu_exp
from .batch_cache import Padding, RowKV, RowsCapture
from .verify import Forest, KVCapture, TreeInputs

# RoPE modules whose rotation depends only on each token's position, so rotating tree nodes at their own
# positions is what mlx-lm's step does. Others (dynamic NTK rescales its base by the sequence length) are refused.
POSITIONAL_ROPES = (nn.RoPE, rope_utils.Llama3RoPE, rope_utils.YarnRoPE, rope_utils.SuScaledRoPE,
                    rope_utils.ProportionalRoPE)


def check_rope(layers: list[Any]) -> None:
    for layer in layers:
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is not None and not isinstance(rope, POSITIONAL_ROPES):
            raise ValueError(
                f"unsupported RoPE {type(rope).__name__}: tree verify rotates each node at its own position, which "
                "is only exact for position-only RoPE (default, linear, llama3, yarn, longrope); use a model config "
                "without this rope scaling"
            )


def rope_at(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """Rotate each token at its own position: tokens go to the batch axis, where rope accepts an offset array."""
    return rope(x.transpose(2, 1, 0, 3), offset=positions).transpose(2, 1, 0, 3)


def rotate(rope: Any, queries: mx.array, keys: mx.array, inputs: TreeInputs) -> tuple[mx.array, mx.array]:
    """Queries and keys rotated at their nodes' positions: a chain's (a lone root, DFlash's single path) are
    consecutive, one rotation from an offset as mlx-lm's forward does; a tree's, each at its own."""
    if inputs.chain:
        return rope(queries, offset=inputs.prefix_len), rope(keys, offset=inputs.prefix_len)
    return rope_at(rope, queries, inputs.positions), rope_at(rope, keys, inputs.positions)


def forest_attention(attn: Any, queries: mx.array, keys: mx.array, values: mx.array, entries: list[KVCache],
                     forest: Forest) -> tuple[mx.array, list[KVCapture]]:
    """tree_attention for each row of a forest (packed along axis 2), each against its own cache: [1, T, H*D].
    Several rows are rotated together first, each node at its own position: per-row operations are what a batch
    pays for on a CPU (~14 us each), the rotation's work is the same."""
    rotated = len(forest.rows) > 1
    if rotated:
        queries, keys = rope_at(attn.rope, queries, forest.positions), rope_at(attn.rope, keys, forest.positions)
    if isinstance(entries[0], RowKV):
        return padded_attention(attn, queries, keys, values, entries, forest)
    captures = []

    def attend(*row: Any) -> mx.array:
        out, capture = tree_attention(attn, *row, rotated=rotated)
        captures.append(capture)
        return out

    return each_row(attend, queries, keys, values, entries, forest), captures


def each_row(attend: Any, queries: mx.array, keys: mx.array, values: mx.array, entries: list[Any],
             forest: Forest) -> mx.array:
    """`attend(queries, keys, values, entry, inputs)` for each row of the forest apart: packed [1, T, H*D]."""
    rows = zip(forest.split(queries, 2), forest.split(keys, 2), forest.split(values, 2), entries, forest.rows)
    out = forest.join([attend(*row) for row in rows], 2)
    return out.transpose(0, 2, 1, 3).reshape(1, out.shape[2], -1)


def padded_attention(attn: Any, queries: mx.array, keys: mx.array, values: mx.array, entries: list[RowKV],
                     forest: Forest) -> tuple[mx.array, list[RowsCapture]]:
    """The forest's rows (already rotated) against a batch's padded buffers (batch_cache): one attention for all of
    them; or, where padding every row's tree to the biggest would waste more than it saves (Padding.dense), one per
    row against its own columns of the buffers."""
    layer = entries[0].layer
    if forest.padding is None:
        forest.padding = Padding.of(forest, [entry.slot.index for entry in entries], layer.rows)
    padding = forest.padding
    captures = [RowsCapture(layer, entry.slot) for entry in entries]
    start = max(layer.offsets)
    if not padding.dense:
        layer.with_tree(padding.rows(keys), padding.rows(values), write=False)
        return each_row(lambda *row: row_attention(attn, *row), queries, keys, values, entries, forest), captures
    if splits(forest.rows[0].config, start):  # the buffers' columns in place, the trees apart (split_attention)
        tree = padding.rows(keys), padding.rows(values)
        layer.with_tree(*tree, write=False)
        prefix = layer.keys[..., :start, :], layer.values[..., :start, :]
        out = split_attention(padding.rows(queries), prefix, tree, attn.scale, padding.tree_masks(),
                              padding.columns(layer.offsets))
        return padding.packed(out), captures
    mask = padding.mask(layer.offsets)
    all_keys, all_values = layer.with_tree(padding.rows(keys), padding.rows(values))
    out = mx.fast.scaled_dot_product_attention(padding.rows(queries), all_keys, all_values, scale=attn.scale,
                                               mask=mask)
    return padding.packed(out), captures


def row_attention(attn: Any, queries: mx.array, keys: mx.array, values: mx.array, entry: RowKV,
                  inputs: TreeInputs) -> mx.array:
    """One row of a batch's buffers: its tree [1, H, T, D] (rotated) over its own columns, then its tree."""
    cached_keys, cached_values = entry.layer.columns(entry.slot.index)
    if splits(inputs.config, entry.offset):
        return split_attention(queries, (cached_keys, cached_values), (keys, values), attn.scale, inputs.ancestors)
    return mx.fast.scaled_dot_product_attention(queries, mx.concatenate([cached_keys, keys], axis=2),
                                                mx.concatenate([cached_values, values], axis=2), scale=attn.scale,
                                                mask=inputs.attention_mask())


def tree_attention(attn: Any, queries: mx.array, keys: mx.array, values: mx.array, cache: KVCache,
                   inputs: TreeInputs, rotated: bool = False) -> tuple[mx.array, KVCapture]:
    """queries [1, H, T, D], keys/values [1, Hkv, T, D] before RoPE (unless `rotated` already, at inputs'
    positions). Returns the attention output [1, H, T, D] and what commits the keys and values."""
    if not rotated:
        queries, keys = rotate(attn.rope, queries, keys, inputs)
    if inputs.step and type(cache) is KVCache:  # stored as mlx-lm's step does, then attended to in place
        cached = cache.update_and_fetch(keys, values)
        if splits(inputs.config, cache.offset):
            out = step_attention(queries, cached, attn.scale)
        else:
            out = mx.fast.scaled_dot_product_attention(queries, *cached, scale=attn.scale, mask=None)
        return out, KVCapture(keys, values, written=True)
    keys = inputs.clock.detail("attention.proj_rope", keys)
    config = inputs.config
    if hasattr(cache, "bits"):  # a quantized KV cache: the nodes attend to keys and values as it stores them
        out = quantized_tree_attention(queries, keys, values, cache, attn.scale, inputs.attention_mask())
    elif splits(config, cache.offset):
        prefix = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        out = split_attention(queries, prefix, (keys, values), attn.scale, inputs.ancestors)
    else:
        all_keys, all_values = keys, values
        if cache.offset > 0:
            all_keys = mx.concatenate([cache.keys[..., : cache.offset, :], keys], axis=2)
            all_values = mx.concatenate([cache.values[..., : cache.offset, :], values], axis=2)
        out = mx.fast.scaled_dot_product_attention(
            queries, all_keys, all_values, scale=attn.scale, mask=inputs.attention_mask()
        )
    out = inputs.clock.detail("attention.sdpa", out)
    return out, KVCapture(keys, values)


def splits(config: DDTreeConfig, prefix: int) -> bool:
    """Whether verify attention after `prefix` cached tokens is split (split_attention). "auto" splits on the CPU:
    there it is faster from ~1K tokens of context (BENCHMARKS.md); on Metal it has not been measured against MLX's
    fused attention."""
    wanted = cpu_exp.on_cpu() if config.exact_tree_attention == "auto" else config.exact_tree_attention
    return wanted and prefix >= config.exact_tree_attention_min_prefix


def quantized_tree_attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
                             mask: mx.array | None) -> mx.array:
    """mlx-lm's quantized attention over [the cached prefix, the tree's keys and values quantized per token]."""
    def with_tree(stored, new):
        quantized = mx.quantize(new, group_size=cache.group_size, bits=cache.bits)
        return tuple(mx.concatenate([part[..., : cache.offset, :], q], axis=2) for part, q in zip(stored, quantized))

    return quantized_scaled_dot_product_attention(queries, with_tree(cache.keys, keys), with_tree(cache.values, values),
                                                  scale=scale, mask=mask, group_size=cache.group_size, bits=cache.bits)


def split_attention(queries: mx.array, prefix: tuple[mx.array, mx.array], tree: tuple[mx.array, mx.array],
                    scale: float, ancestors: mx.array, columns: mx.array | None = None) -> mx.array:
    """Attention over [prefix, tree] as two parts merged exactly by their log-sum-exp (DDTREE_EXACT_TREE_ATTENTION).

    The prefix part reads the cache in place, so a long context is not copied next to the tree's keys; the tree
    part is a small T x T ancestor-masked block. queries [B, H, T, D]; prefix and tree (keys, values) [B, Hkv, *, D];
    ancestors [T, T] (or each row's, [B, 1, 1, T, T]); `columns` [B, 1, 1, P]: the prefix columns each row sees
    (a batch's buffer rows end apart), all of them if None. Softmax in float32, as MLX's own."""
    rows, heads, length, dim = queries.shape
    q = grouped(queries, prefix[0].shape[1], scale)
    prefix_scores = q @ prefix[0].astype(mx.float32).swapaxes(-1, -2)  # [B, Hkv, rep*T, P]
    if columns is not None:
        prefix_scores = mx.where(columns, prefix_scores, -mx.inf)
    tree_scores = (q @ tree[0].astype(mx.float32).swapaxes(-1, -2)).reshape(*q.shape[:2], -1, length, length)
    tree_scores = mx.where(ancestors, tree_scores, -mx.inf).reshape(*q.shape[:2], -1, length)
    peak = mx.maximum(prefix_scores.max(-1, keepdims=True), tree_scores.max(-1, keepdims=True))
    exp = cpu_exp.exp if cpu_exp.on_cpu() else lambda x, shift: mx.exp(x - shift)  # MLX's CPU exp is slow
    prefix_weights, tree_weights = exp(prefix_scores, peak), exp(tree_scores, peak)
    total = prefix_weights.sum(-1, keepdims=True) + tree_weights.sum(-1, keepdims=True)
    out = (prefix_weights @ prefix[1].astype(mx.float32) + tree_weights @ tree[1].astype(mx.float32)) / total
    return out.reshape(rows, heads, length, -1).astype(queries.dtype)


def step_attention(queries: mx.array, cached: tuple[mx.array, mx.array], scale: float) -> mx.array:
    """One token's attention over the whole cache (its own key and value already in), read in place: the prefix
    part of split_attention alone, with as few operations as that takes (at ~14 us an operation on the CPU, a
    second part to merge would cost a step more than the exp saves at ~1K tokens). queries [1, H, 1, D]."""
    keys, values = cached
    q = grouped(queries, keys.shape[1], scale)
    scores = q @ keys.astype(mx.float32).swapaxes(-1, -2)
    weights = cpu_exp.exp(scores, scores.max(-1, keepdims=True))
    out = (weights @ values.astype(mx.float32)) / weights.sum(-1, keepdims=True)
    return out.reshape(queries.shape).astype(queries.dtype)


def grouped(queries: mx.array, kv_heads: int, scale: float) -> mx.array:
    """Scaled float32 queries [B, H, T, D] as [B, Hkv, H / Hkv * T, D]: each key/value head's queries in one
    product with its keys."""
    rows, heads, length, dim = queries.shape
    return (queries.astype(mx.float32) * scale).reshape(rows, kv_heads, heads // kv_heads * length, dim)
