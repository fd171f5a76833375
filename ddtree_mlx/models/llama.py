"""Llama-family targets (mlx-lm `llama`): plain multi-head attention with RoPE, every layer."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .adapter import TargetAdapter
from .attention import forest_attention
from .verify import Capture, Forest


class LlamaAdapter(TargetAdapter):
    def __init__(self, model: Any):
        super().__init__(model)
        if any(kind != "full_attention" for kind in getattr(self.args, "layer_types", None) or []):
            raise ValueError("sliding-window llama layers are not supported: DDTree needs full-attention KV caches")

    def project(self, attn: Any, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries [1, H, T, D] and keys/values [1, Hkv, T, D] before RoPE."""
        length = x.shape[1]
        queries = attn.q_proj(x).reshape(1, length, attn.n_heads, -1)
        keys = attn.k_proj(x).reshape(1, length, attn.n_kv_heads, -1)
        values = attn.v_proj(x).reshape(1, length, attn.n_kv_heads, -1)
        return queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)

    def mixer_tree(self, layer: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        attn = layer.self_attn
        out, captures = forest_attention(attn, *self.project(attn, x), entries, forest)
        return attn.o_proj(out), captures
