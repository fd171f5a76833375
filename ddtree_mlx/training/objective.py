"""One training forward and its objective: each block sees its own context under a block-sparse mask, and
position k of a block is weighted exp(-(k-1)/gamma) in the cross-entropy (early positions decide whether later
ones are reached at all)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from dflash_mlx.model import (
    DFlashDraftModel,
)

from ..models.adapter import TargetAdapter
from ..models.attention import rope_at
from .data import Example
from .drafter import TrainVocab


def block_mask(anchors: mx.array, block_size: int, context: int) -> mx.array:
    """[A*B, context + A*B] bool: block j's queries see the context before its anchor and their own block."""
    blocks = mx.repeat(mx.arange(anchors.shape[0]), block_size)  # block of each query
    sees_context = mx.arange(context)[None, :] < anchors[blocks][:, None]
    same_block = blocks[:, None] == blocks[None, :]
    return mx.concatenate([sees_context, same_block], axis=1)


def _attend(attn: Any, x: mx.array, context: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
    """dflash-mlx's DFlashAttention, with every block at its own positions and the block-sparse mask."""
    def heads(proj, source, count):
        return proj(source).reshape(1, source.shape[1], count, -1).transpose(0, 2, 1, 3)

    queries = rope_at(attn.rope, attn.q_norm(heads(attn.q_proj, x, attn.n_heads)), positions)
    keys = mx.concatenate([attn.rope(attn.k_norm(heads(attn.k_proj, context, attn.n_kv_heads))),
                           rope_at(attn.rope, attn.k_norm(heads(attn.k_proj, x, attn.n_kv_heads)), positions)], 2)
    values = mx.concatenate([heads(attn.v_proj, context, attn.n_kv_heads), heads(attn.v_proj, x, attn.n_kv_heads)], 2)
    out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(1, x.shape[1], -1))


def draft_hidden(drafter: DFlashDraftModel, target: TargetAdapter, tokens: mx.array, hidden: mx.array,
                 anchors: mx.array) -> mx.array:
    """The drafter's final hidden states [A, B, D] for blocks at `anchors` of one sequence (tokens [n], tapped
    target hidden states [n, F]): what DFlashDraftModel computes for each block alone, all blocks at once."""
    size = drafter.block_size
    offsets = mx.arange(size)
    block = mx.where(offsets[None] == 0, tokens[anchors][:, None], drafter.mask_token_id).reshape(1, -1)
    x = target.embed(block).astype(mx.float32) * drafter.embed_scale
    context = drafter.project_target_hidden(hidden.astype(mx.float32)[None])
    positions = (anchors[:, None] + offsets[None]).reshape(-1)
    mask = block_mask(anchors, size, tokens.shape[0])
    for layer in drafter.layers:
        x = x + _attend(layer.self_attn, layer.input_layernorm(x), context, positions, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).reshape(anchors.shape[0], size, -1)


def block_predictions(drafter: DFlashDraftModel, target: TargetAdapter, tokens: mx.array, hidden: mx.array,
                      anchors: mx.array, vocab: TrainVocab | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Logits [A, B-1, V] for block positions 1..B-1 (over `vocab` only, with labels as indices into it, when
    given), their labels, and which labels count: inside the sequence (and inside `vocab`)."""
    size = drafter.block_size
    h = draft_hidden(drafter, target, tokens, hidden, anchors)[:, 1:]
    label_at = anchors[:, None] + mx.arange(1, size)[None]
    valid = label_at < tokens.shape[0]
    labels = tokens[mx.minimum(label_at, tokens.shape[0] - 1)]
    if vocab is not None:
        index = vocab.index[labels]  # -1: a token the drafter will never propose, so nothing to learn there
        return h @ vocab.rows.T, mx.maximum(index, 0), valid & (index >= 0)
    return target.lm_head(h).astype(mx.float32), labels, valid


def block_loss(drafter: DFlashDraftModel, target: TargetAdapter, tokens: mx.array, hidden: mx.array,
               anchors: mx.array, gamma: float, vocab: TrainVocab | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """Weighted cross-entropy over block positions 1..B-1 whose label lies inside the sequence, and the correct /
    counted predictions per position (for per-position accuracy)."""
    logits, labels, valid = block_predictions(drafter, target, tokens, hidden, anchors, vocab)
    weights = mx.exp(-mx.arange(drafter.block_size - 1) / gamma)[None] * valid
    loss = (nn.losses.cross_entropy(logits, labels) * weights).sum() / weights.sum()
    correct = ((mx.argmax(logits, axis=-1) == labels) & valid).sum(axis=0)
    return loss, correct, valid.sum(axis=0)


def sample_anchors(rng: np.random.Generator, prompt_len: int, length: int, count: int) -> mx.array:
    """Anchors whose next token is an answer token: from the last prompt token to the second-to-last token."""
    choices = np.arange(max(prompt_len - 1, 0), length - 1)
    picked = rng.choice(choices, size=min(count, len(choices)), replace=False)
    return mx.array(np.sort(picked).astype(np.int32))


def usable(examples: list[Example], max_len: int, vocab_size: int) -> list[Example]:
    """The examples with an answer inside max_len; token ids must fit the target (data made for another model
    would otherwise train on garbage)."""
    bad = next((e.id for e in examples if any(not 0 <= t < vocab_size for t in e.prompt + e.answer)), None)
    if bad is not None:
        raise ValueError(f"example {bad!r} has token ids outside the target vocabulary [0, {vocab_size}); "
                         "regenerate the data with this target")
    kept = [e for e in examples if e.answer and len(e.prompt) + 1 < max_len]
    if not kept:
        raise ValueError("no example has an answer within max_len tokens; regenerate the data or raise max_len")
    return kept
