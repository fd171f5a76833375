"""Where the engine chooses how a hybrid target's tree conv and tree recurrence run: the Metal kernels on an Apple
GPU, once they passed their self-check in this process (check.py), else the pure-MLX twin (recurrence.py), which
is exact everywhere. `kernel_maker` is the one place that says whether kernels can be built here; the tests put
the CPU harness (which executes the same bodies with g++) there to prove the kernels plug in."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import recurrence
from .check import check
from .metal import SWITCHES, ConvWindows, KernelMaker, conv_by_kernel, delta_by_kernel


def kernel_maker() -> KernelMaker | None:
    """What builds kernels here: mx.fast.metal_kernel on an Apple GPU, else nothing (use the twin)."""
    if mx.metal.is_available() and mx.default_device() == mx.gpu:
        return mx.fast.metal_kernel
    return None


def checked_maker(kernel: str, config: Any) -> KernelMaker | None:
    """The maker, if `kernel` is switched on in `config`, can be built here and passed its self-check in this
    process (check.py); otherwise None: the twin runs."""
    maker = kernel_maker()
    if maker is None or not getattr(config, SWITCHES[kernel]):
        return None
    return maker if check(maker, kernel).ok else None


def kernel_path(config: Any) -> str:
    """What the tree conv and recurrence of a hybrid target run as here: "metal", "twin" or "metal+twin"."""
    used = {checked_maker(kernel, config) is not None for kernel in SWITCHES}
    return "metal" if used == {True} else "twin" if used == {False} else "metal+twin"


def tree_conv(x: mx.array, cached: mx.array, weight: mx.array, inputs: Any) -> tuple[mx.array, ConvWindows]:
    """x [T, C] node inputs, cached [K-1, C], weight [C, K, 1]: SiLU(depthwise conv over each node's ancestors)."""
    maker = checked_maker("ddtree_tree_conv1d", inputs.config)
    inputs.kernels.add("twin" if maker is None else "metal")
    if maker is not None:
        return conv_by_kernel(maker, x, cached, weight, inputs.parents)
    window_index = inputs.window_index(weight.shape[1])
    out, rows = recurrence.tree_conv(x, cached, weight, window_index)
    return out, ConvWindows(rows, window_index[:, 1:])


def tree_gated_delta(q, k, v, a, beta, A_log, dt_bias, state0, inputs: Any):
    """q, k [T,Hk,Dk] normalized, v [T,Hv,Dv], a and beta [T,Hv], state0 [Hv,Dv,Dk]: y [T,Hv,Dv] and a record
    with state_at(nodes) for the commit."""
    log_g = recurrence.log_decay(a, A_log, dt_bias)
    if not inputs.config.tree_aware_linear:
        inputs.kernels.add("twin")
        return recurrence.chain_gated_delta(q, k, v, log_g, beta, state0, inputs.tree)
    maker = checked_maker("ddtree_tree_gated_delta", inputs.config)
    Hk, Dk = k.shape[1:]
    if maker is not None and Dk % 32 == 0 and v.shape[1] % Hk == 0:
        inputs.kernels.add("metal")
        return delta_by_kernel(maker, q, k, v, log_g, beta, state0, inputs.parents, inputs.level_plan(),
                               inputs.ancestors)
    inputs.kernels.add("twin")
    return recurrence.tree_gated_delta(q, k, v, log_g, beta, state0, inputs.ancestors)
