"""Dispatch for the tree conv and tree recurrence: Metal kernels on Apple GPUs, the pure-MLX twin elsewhere."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import recurrence


def tree_conv(x: mx.array, cached: mx.array, weight: mx.array, window_index: mx.array, inputs: Any):
    return recurrence.tree_conv(x, cached, weight, window_index)


def tree_gated_delta(q, k, v, a, beta, A_log, dt_bias, state0, inputs: Any):
    log_g = recurrence.log_decay(a, A_log, dt_bias)
    if not inputs.config.tree_aware_linear:
        return recurrence.chain_gated_delta(q, k, v, log_g, beta, state0, inputs.tree.parents)
    return recurrence.tree_gated_delta(q, k, v, log_g, beta, state0, inputs.ancestors, inputs.max_depth)
