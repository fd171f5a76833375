"""Several generations' DFlash drafts in one forward (a batch's rows): every row's block goes through the drafter's
projections, MLPs and head together, each attending to its own context cache.

On this CPU a draft is bound by reading the weights (the shipped drafter's two layers and its head rows: ~12 ms a
row), so rows drafting together read them once. The forward is dflash-mlx's DFlashAttention / DFlashDecoderLayer
for a whole-block query over [cached context, block], built from those layers' own modules: the rows' blocks have
one length (the batch drafts one depth), so they stack along a batch axis; their new context rows (different
counts) are packed along the token axis and rotated each at its own position. Only the context caches' appends and
the attention run per row.
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np

from ..models.attention import rope_at


def can_draft_together(drafters: Sequence[Any]) -> bool:
    """Whether DFlashDrafters can draft together: they share one model's weights, whose layers attend fully (a
    sliding-window layer's mask would be per row)."""
    model = drafters[0].model
    return all(d.model is model for d in drafters) and not any(
        layer.self_attn.sliding_window for layer in model.layers)


def log_probs_together(drafters: Sequence[Any], roots: Sequence[int], hiddens: Sequence[mx.array],
                       depth: int | None) -> mx.array:
    """[rows, positions(depth), V or len(vocab)]: row b is what drafters[b].log_probs(roots[b], hiddens[b], depth)
    gives (up to rounding), each row's context cache advanced alike."""
    first = drafters[0]
    model, target = first.model, first.target
    rows, length = len(drafters), first.positions(depth) + 1
    blocks = mx.array([[root] + [model.mask_token_id] * (length - 1) for root in roots])
    h = target.embed(blocks) * model.embed_scale  # [rows, length, hidden]
    news = [drafter.within_window(hidden) for drafter, hidden in zip(drafters, hiddens)]  # may advance offsets
    counts = [int(new.shape[0]) for new in news]
    starts = [drafter.cache[0].offset for drafter in drafters]
    context = model.project_target_hidden(mx.concatenate(news)[None])  # [1, sum(counts), hidden]
    context_at = mx.array(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)]).astype(np.int32))
    block_at = mx.array([s + n for s, n in zip(starts, counts)], dtype=mx.int32)  # each block after its context
    cuts = np.cumsum(counts)[:-1].tolist()
    for index, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        queries = attn.rope(heads(attn.q_norm, attn.q_proj(x), attn.n_heads), offset=block_at)
        keys = attn.rope(heads(attn.k_norm, attn.k_proj(x), attn.n_kv_heads), offset=block_at)
        values = heads(None, attn.v_proj(x), attn.n_kv_heads)
        context_keys = rope_at(attn.rope, heads(attn.k_norm, attn.k_proj(context), attn.n_kv_heads), context_at)
        context_values = heads(None, attn.v_proj(context), attn.n_kv_heads)
        outs = []
        for row, (drafter, new_keys, new_values, count) in enumerate(zip(
                drafters, mx.split(context_keys, cuts, axis=2), mx.split(context_values, cuts, axis=2), counts)):
            cache = drafter.cache[index]
            cache.append_context(new_keys, new_values, count)  # at positions offset.., as the drafter's own forward
            cached_keys, cached_values = cache.fetch()
            outs.append(mx.fast.scaled_dot_product_attention(
                queries[row : row + 1], mx.concatenate([cached_keys, keys[row : row + 1]], axis=2),
                mx.concatenate([cached_values, values[row : row + 1]], axis=2), scale=attn.scale))
        out = mx.concatenate(outs).transpose(0, 2, 1, 3).reshape(rows, length, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return first.head(model.norm(h))


def heads(norm, projected: mx.array, count: int) -> mx.array:
    """[rows, tokens, count * dim] -> [rows, count, tokens, dim], normed per head if `norm`."""
    split = projected.reshape(*projected.shape[:2], count, -1)
    return (norm(split) if norm is not None else split).transpose(0, 2, 1, 3)
