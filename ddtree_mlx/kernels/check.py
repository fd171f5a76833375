"""The Metal kernels check themselves before a process uses them.

They were written and tested through a CPU harness, never on every Mac: on first use in a process each kernel runs
against its pure-MLX twin on a small random tree, in float32 and bfloat16, with as many value heads as key heads
and with more. A kernel that fails to build, raises, or disagrees is not used: the twin runs instead (exact, a
little slower), and one warning says what failed, which env var turns the kernel off, and how to report it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from ..tree.draft_tree import DraftTree
from . import metal as kernels
from . import recurrence

# Branches at the root and at node 1, a chain below node 2, two levels of width 3: every launch path runs.
PARENTS = [-1, 0, 0, 1, 1, 2, 5, 6, 3]
SHAPES = {
    "ddtree_tree_gated_delta": [dict(Hk=1, Hv=2, Dk=32, Dv=8, dtype=mx.float32),
                                dict(Hk=2, Hv=2, Dk=64, Dv=16, dtype=mx.bfloat16),
                                dict(Hk=2, Hv=6, Dk=32, Dv=8, dtype=mx.bfloat16)],
    "ddtree_tree_conv1d": [dict(C=24, K=4, dtype=mx.float32), dict(C=40, K=4, dtype=mx.bfloat16)],
}
TOLERANCE = {mx.float32: 1e-4, mx.bfloat16: 2e-2}  # relative to the twin's largest magnitude


@dataclass(frozen=True)
class KernelCheck:
    kernel: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "ok": self.ok, "detail": self.detail}


@functools.lru_cache(maxsize=None)
def check(maker: kernels.KernelMaker, kernel: str) -> KernelCheck:
    """Run `kernel` built by `maker` against the twin on every shape in SHAPES; warn once if it fails."""
    try:
        worst = max((compare(maker, kernel, shape) for shape in SHAPES[kernel]), key=lambda r: r[0])
    except Exception as error:  # noqa: BLE001 - whatever a kernel that cannot build or run raises, the twin runs
        result = KernelCheck(kernel, False, f"could not build or run: {type(error).__name__}: {error}")
    else:
        ratio, shape = worst
        result = KernelCheck(kernel, ratio <= 1.0, f"largest error {ratio:.3g}x the tolerance, at {shape}")
    if not result.ok:
        warnings.warn(f"ddtree-mlx: the Metal kernel {kernel} failed its self-check ({result.detail}); the pure-MLX "
                      f"twin runs instead, with the same output. DDTREE_{kernels.SWITCHES[kernel].upper()}=0 skips the kernel; please report "
                      "this with the output of `ddtree-mlx doctor --json`.", RuntimeWarning, stacklevel=2)
    return result


def compare(maker: kernels.KernelMaker, kernel: str, shape: dict) -> tuple[float, str]:
    """The kernel's and the twin's outputs on one random tree: (largest error / tolerance, the shape named)."""
    tree = DraftTree(tokens=[0] * len(PARENTS), parents=list(PARENTS), depths=depths(PARENTS), ranks=[0] * len(PARENTS))
    pairs = (delta_pairs if kernel == "ddtree_tree_gated_delta" else conv_pairs)(maker, tree, **shape)
    tolerance = TOLERANCE[shape["dtype"]]
    ratio = max(float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))
                / (tolerance * max(float(mx.max(mx.abs(b.astype(mx.float32)))), 1.0)) for a, b in pairs)
    if not np.isfinite(ratio):
        ratio = float("inf")
    name = ", ".join(f"{key}={value}" for key, value in shape.items())
    return ratio, name


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def delta_pairs(maker, tree: DraftTree, *, Hk: int, Hv: int, Dk: int, Dv: int, dtype) -> list[tuple[mx.array, mx.array]]:
    """(kernel, twin) pairs: the outputs y and every node's state."""
    T = len(tree)
    keys = mx.random.split(mx.random.key(T * Hv + Dk), 6)
    unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731 - as the layer normalises q, k
    q = unit(mx.random.normal((T, Hk, Dk), key=keys[0])).astype(dtype)
    k = unit(mx.random.normal((T, Hk, Dk), key=keys[1])).astype(dtype)
    v = mx.random.normal((T, Hv, Dv), key=keys[2]).astype(dtype)
    log_g = -mx.random.uniform(0.01, 1.0, (T, Hv), key=keys[3])
    beta = mx.random.uniform(0.1, 0.9, (T, Hv), key=keys[4]).astype(dtype)
    state0 = 0.1 * mx.random.normal((Hv, Dv, Dk), key=keys[5])
    parents, ancestors = mx.array(np.asarray(tree.parents, np.int32)), mx.array(tree.ancestor_mask())
    y, record = kernels.delta_by_kernel(maker, q, k, v, log_g, beta, state0, parents,
                                        kernels.LevelPlan.of(tree.parents), ancestors)
    y_twin, twin = recurrence.tree_gated_delta(q, k, v, log_g, beta, state0, ancestors)
    nodes = mx.arange(T)
    return [(y, y_twin), (record.state_at(nodes), twin.state_at(nodes))]


def conv_pairs(maker, tree: DraftTree, *, C: int, K: int, dtype) -> list[tuple[mx.array, mx.array]]:
    """(kernel, twin) pairs: the outputs and every node's conv window."""
    T = len(tree)
    keys = mx.random.split(mx.random.key(T * C + K), 3)
    x = mx.random.normal((T, C), key=keys[0]).astype(dtype)
    cached = mx.random.normal((K - 1, C), key=keys[1]).astype(dtype)
    weight = (0.5 * mx.random.normal((C, K, 1), key=keys[2])).astype(dtype)
    out, windows = kernels.conv_by_kernel(maker, x, cached, weight, mx.array(np.asarray(tree.parents, np.int32)))
    index = mx.array(tree.window_index(K))
    out_twin, rows = recurrence.tree_conv(x, cached, weight, index)
    twin_windows = kernels.ConvWindows(rows, index[:, 1:])
    return [(out, out_twin)] + [(windows.window_at(node), twin_windows.window_at(node)) for node in range(T)]
