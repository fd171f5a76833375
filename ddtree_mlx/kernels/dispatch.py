"""Where the engine chooses how a hybrid target's tree conv and tree recurrence run: the Metal kernels on an Apple
GPU, or the pure-MLX twin (recurrence.py), which is exact everywhere. A kernel runs only where `kernel_maker` can
build it, its switch in the configuration is on, and it has not failed here (guard.py): its variants for the
target are self-checked before the first generation (`prepare`), and each variant's first launch in a process is
compared with the twin. `kernel_maker` is the one place that says whether kernels can be built: the tests put a
fake or the CPU harness (which executes the same bodies with g++) there."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from . import recurrence
from .check import DeltaShape, Shape, Verdicts, check, conv_pairs, delta_pairs, twin_conv
from .guard import GUARD
from .metal import SWITCHES, ConvWindows, KernelMaker, Variant, conv_by_kernel, conv_spec, delta_by_kernel, delta_spec

_PREPARED: set[tuple[Shape, ...]] = set()


def kernel_maker() -> KernelMaker | None:
    """What builds kernels here: mx.fast.metal_kernel on an Apple GPU, else nothing (use the twin)."""
    if mx.metal.is_available() and mx.default_device() == mx.gpu:
        return mx.fast.metal_kernel
    return None


def checked_maker(kernel: str, config: Any) -> KernelMaker | None:
    """The maker, if `kernel` is switched on in `config`, can be built here and has not failed in this process;
    otherwise None: the twin runs."""
    maker = kernel_maker()
    if maker is None or not getattr(config, SWITCHES[kernel]) or not GUARD.runs(kernel):
        return None
    return maker


def prepare(shapes: tuple[Shape, ...], config: Any) -> None:
    """Before a target's first generation: check every kernel variant it can use against the twin at its own
    shapes and dtype (once per machine, MLX version and shape set: kept under DDTREE_CACHE_DIR), or, with those
    verdicts on disk, build and run each variant once, so no kernel compiles after the first cycle."""
    maker = kernel_maker()
    wanted = tuple(shape for shape in shapes if shape.supported() and checked_maker(shape.kernel, config))
    if maker is None or not wanted or wanted in _PREPARED:
        return
    _PREPARED.add(wanted)
    verdicts = Verdicts(config.cache_path / "kernels", wanted)
    known = verdicts.read()
    if known is None:
        known = check(maker, wanted)
        verdicts.write(known)
    elif all(result.ok for result in known):
        known = check(maker, wanted, compare=False)  # warm: the first real launches still compare (guard.py)
    GUARD.record(known)


def kernel_path(config: Any) -> str:
    """What the tree conv and recurrence of a hybrid target run as here: "metal", "twin" or "metal+twin"."""
    used = {checked_maker(kernel, config) is not None for kernel in SWITCHES}
    return "metal" if used == {True} else "twin" if used == {False} else "metal+twin"


def dtype_name(x: mx.array) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


def tree_conv(x: mx.array, cached: mx.array, weight: mx.array, inputs: Any) -> tuple[mx.array, ConvWindows]:
    """x [T, C] node inputs, cached [K-1, C], weight [C, K, 1]: SiLU(depthwise conv over each node's ancestors)."""
    maker = checked_maker("ddtree_tree_conv1d", inputs.config)
    twin = lambda: twin_conv(x, cached, weight, inputs.window_index(weight.shape[1]))  # noqa: E731
    if maker is None:
        inputs.kernels.add("twin")
        return twin()
    plan = inputs.level_plan()
    out, used = GUARD.first_launch(Variant.of(conv_spec(x, weight)),
                                   lambda: conv_by_kernel(maker, x, cached, weight, plan), twin,
                                   lambda ours, theirs: conv_pairs(ours, theirs, len(inputs.tree)), dtype_name(x))
    inputs.kernels.add("metal" if used else "twin")
    return out


def tree_gated_delta(q, k, v, a, beta, A_log, dt_bias, state0, inputs: Any):
    """q, k [T,Hk,Dk] normalized, v [T,Hv,Dv], a and beta [T,Hv], state0 [Hv,Dv,Dk]: y [T,Hv,Dv] and a record
    with state_at(nodes) for the commit."""
    log_g = recurrence.log_decay(a, A_log, dt_bias)
    if not inputs.config.tree_aware_linear:
        inputs.kernels.add("twin")
        return recurrence.chain_gated_delta(q, k, v, log_g, beta, state0, inputs.tree)
    maker = checked_maker("ddtree_tree_gated_delta", inputs.config)
    twin = lambda: recurrence.tree_gated_delta(q, k, v, log_g, beta, state0, inputs.ancestors)  # noqa: E731
    if maker is None or not DeltaShape(k.shape[1], v.shape[1], k.shape[2], v.shape[2], dtype_name(v)).supported():
        inputs.kernels.add("twin")
        return twin()
    plan = inputs.level_plan()
    out, used = GUARD.first_launch(Variant.of(delta_spec(k, v, plan)),
                                   lambda: delta_by_kernel(maker, q, k, v, log_g, beta, state0, plan, inputs.ancestors),
                                   twin, lambda ours, theirs: delta_pairs(ours, theirs, len(inputs.tree)),
                                   dtype_name(v))
    inputs.kernels.add("metal" if used else "twin")
    return out


def forest_conv(x: mx.array, cached: list[mx.array], weight: mx.array,
                forest: Any) -> tuple[mx.array, list[ConvWindows]]:
    """Every row's tree conv (x [T, C] the forest's packed nodes, cached[r] row r's window [K-1, C]): per row where
    a kernel runs, else the twin's for all rows at once, as one conv over every node's window."""
    if len(forest.rows) == 1 or checked_maker("ddtree_tree_conv1d", forest.rows[0].config) is not None:
        convs = [tree_conv(part, window, weight, inputs)
                 for part, window, inputs in zip(forest.split(x, 0), cached, forest.rows)]
        return forest.join([out for out, _ in convs], 0), [windows for _, windows in convs]
    for inputs in forest.rows:
        inputs.kernels.add("twin")
    index = forest.window_index(weight.shape[1])
    out, rows = recurrence.tree_conv(x, mx.concatenate(cached), weight, index)
    return out, [ConvWindows(rows, index[span, 1:]) for span in forest.spans]


def forest_gated_delta(q, k, v, a, beta, A_log, dt_bias, states0: list[mx.array], forest: Any):
    """Every row's tree recurrence, each from its own state (tree_gated_delta's inputs for the forest's packed
    nodes): per row where a kernel runs or the recurrence is not tree-aware, else the twin's for all rows in one
    solve. y [T, Hv, Dv] and each row's commit record."""
    config = forest.rows[0].config
    kernel = checked_maker("ddtree_tree_gated_delta", config) is not None
    if len(forest.rows) == 1 or not config.tree_aware_linear or kernel:
        rows = zip(*(forest.split(part, 0) for part in (q, k, v, a, beta)), states0, forest.rows)
        ys, records = zip(*(tree_gated_delta(*parts, A_log, dt_bias, state0, inputs)
                            for *parts, state0, inputs in rows))
        return forest.join(list(ys), 0), list(records)
    for inputs in forest.rows:
        inputs.kernels.add("twin")
    log_g = recurrence.log_decay(a, A_log, dt_bias)
    return recurrence.forest_gated_delta(q, k, v, log_g, beta, mx.stack(states0), forest.layout)
