"""Qwen 3 dense targets (mlx-lm `qwen3`): Llama attention plus per-head RMSNorm on queries and keys."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    def project(self, attn: Any, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        queries, keys, values = super().project(attn, x)
        # The norms act on the head dim, which is last in both layouts.
        return attn.q_norm(queries), attn.k_norm(keys), values
