"""The Metal kernels for the tree conv and the tree recurrence: their launch specs, the level plan a tree
recurrence launch follows, and building and launching them with a kernel maker (`mx.fast.metal_kernel` on an Apple
GPU). The kernel bodies are the .metal files beside this module; dispatch.py chooses whether they run.

Launch layouts are explained at the top of each .metal file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from . import recurrence

KernelMaker = Callable[..., Any]  # mx.fast.metal_kernel's signature


SWITCHES = {"ddtree_tree_gated_delta": "tree_kernel", "ddtree_tree_conv1d": "tree_conv_kernel"}  # config fields

# MLX passes an input array of fewer than this many elements in `constant` memory, and compiles a library of its
# own for that signature. The kernels' per-tree tables are padded to it, so one library per template serves every
# tree size and none compiles mid-generation when a small tree first comes.
DEVICE_MIN = 8


def padded(table: np.ndarray, fill: int) -> np.ndarray:
    """`table` [n] int32 with `fill` appended up to DEVICE_MIN entries (the kernels read only the first n)."""
    extra = max(DEVICE_MIN - len(table), 0)
    return np.concatenate([table, np.full(extra, fill, np.int32)]).astype(np.int32)


@dataclass(frozen=True)
class Variant:
    """What MLX compiles once and launches the same way: a kernel at one template (input dtype and sizes) with
    one number of node slots (simdgroups sharing a value row, 1, 2 or 4; the conv has one layout)."""

    kernel: str
    template: tuple[tuple[str, Any], ...]
    slots: int = 1

    @classmethod
    def of(cls, spec: dict) -> "Variant":
        template = tuple((name, str(value).rsplit(".", 1)[-1] if isinstance(value, mx.Dtype) else value)
                         for name, value in spec["template"])
        return cls(spec["name"], template, spec["threadgroup"][1] if spec["name"].endswith("gated_delta") else 1)

    def __str__(self) -> str:
        sizes = ", ".join(f"{name}={value}" for name, value in self.template)
        return f"{self.kernel}({sizes}, slots={self.slots})"


def kernel_source(name: str) -> str:
    """A kernel body, shipped beside this module."""
    path = Path(__file__).with_name(name)
    if not path.exists():
        raise FileNotFoundError(f"Metal kernel source {name} is missing; reinstall ddtree-mlx")
    return path.read_text()


@functools.lru_cache(maxsize=None)
def _built(maker: KernelMaker, name: str, source: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Any:
    return maker(name=name, input_names=list(inputs), output_names=list(outputs), source=kernel_source(source))


def launch(maker: KernelMaker, spec: dict, inputs: list[Any]) -> list[mx.array]:
    kernel = _built(maker, spec["name"], spec["source"], tuple(spec["input_names"]), tuple(spec["output_names"]))
    return kernel(inputs=inputs, template=spec["template"], grid=spec["grid"], threadgroup=spec["threadgroup"],
                  output_shapes=spec["output_shapes"], output_dtypes=spec["output_dtypes"])


# --- launch specs: the single description of how each kernel is called ----------------------------------------


def tree_levels(parent) -> tuple[np.ndarray, np.ndarray]:
    """Depth-level schedule for tree_gated_delta: (order [T], level_start [levels + 1]), int32.
    Depth d is order[level_start[d]:level_start[d + 1]] (ties by node id)."""
    parent = np.asarray(parent, dtype=np.int64)
    depth = np.zeros(len(parent), dtype=np.int64)
    for t, p in enumerate(parent):
        if p >= t:
            raise ValueError(f"parent[{t}] = {p}: parents must precede their children")
        depth[t] = 0 if p < 0 else depth[p] + 1
    order = np.argsort(depth, kind="stable").astype(np.int32)
    counts = np.bincount(depth, minlength=int(depth.max()) + 1) if len(parent) else np.zeros(0, np.int64)
    return order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def scratch_slots(order: np.ndarray, level_start: np.ndarray) -> tuple[np.ndarray, int]:
    """The scratch row of each node's state in tree_gated_delta, and the row count R. A level only reads the
    level above it, so level d takes rows (d % 2) * W + its rank (W the widest level); R = 2W, or T rows (one
    per node) when that is fewer."""
    widths = np.diff(level_start)
    width, count = int(widths.max()), len(order)
    if count <= 2 * width:
        return np.arange(count, dtype=np.int32), count
    depth = np.repeat(np.arange(len(widths)), widths)
    slot = np.empty(count, dtype=np.int32)
    slot[order] = (depth % 2) * width + np.arange(count) - level_start[depth]
    return slot, 2 * width


@dataclass(frozen=True)
class LevelPlan:
    """What the kernels' launches need from the tree, built once per verify and shared by every layer; every
    table padded to DEVICE_MIN entries."""

    parents: mx.array
    order: mx.array
    level_start: mx.array
    slot: mx.array
    levels: int
    width: int  # nodes in the widest level
    scratch_rows: int

    @classmethod
    def of(cls, parents) -> "LevelPlan":
        order, level_start = tree_levels(parents)
        slot, rows = scratch_slots(order, level_start)
        tables = (padded(np.asarray(parents, np.int32), -1), padded(order, 0), padded(level_start, len(order)),
                  padded(slot, 0))
        return cls(*map(mx.array, tables), len(level_start) - 1, int(np.diff(level_start).max()), rows)


def node_slots(max_level_width: int) -> int:
    """Simdgroups per value row: enough for the widest level, at most 4 (1, 2 or 4)."""
    return 1 if max_level_width <= 1 else 2 if max_level_width <= 2 else 4


def tree_gated_delta_launch(*, T, Hk, Hv, Dk, Dv, in_dtype, f32, max_level_width, scratch_rows, slots=None) -> dict:
    """Inputs, in order: q, k [T,Hk,Dk], v [T,Hv,Dv], g, beta [T,Hv], state_in [Hv,Dv,Dk] float32, parent [T],
    order [T], level_start [levels+1], state_row [T] (int32, see tree_levels and scratch_slots), n_levels (int).
    Outputs: y, delta_out (kept for the commit) and the scratch (dead after the launch)."""
    if Dk % 32 or Hv % Hk:
        raise ValueError("tree_gated_delta needs Dk % 32 == 0 and Hv % Hk == 0")
    slots = slots or node_slots(max_level_width)
    return dict(
        name="ddtree_tree_gated_delta",
        source="tree_gated_delta.metal",
        input_names=["q", "k", "v", "g", "beta", "state_in", "parent", "order", "level_start", "state_row", "n_levels"],
        output_names=["y", "delta_out", "scratch"],
        template=[("InT", in_dtype), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv)],
        grid=(32, slots, Hv * Dv),
        threadgroup=(32, slots, 4 // slots),  # 128 threads, as mlx-lm's gated_delta kernel uses
        output_shapes=[(T, Hv, Dv), (T, Hv, Dv), (scratch_rows, Hv, Dv, Dk)],
        output_dtypes=[in_dtype, f32, f32],
    )


def tree_conv1d_launch(*, T, C, K, in_dtype) -> dict:
    """Inputs, in order: x [T,C], conv_state [K-1,C], weight [C,K], parent [T] int32."""
    return dict(
        name="ddtree_tree_conv1d",
        source="tree_conv1d.metal",
        input_names=["x", "conv_state", "weight", "parent"],
        output_names=["out", "windows"],
        template=[("InT", in_dtype), ("C", C), ("K", K)],
        grid=(C, T, 1),
        threadgroup=(min(C, 256), 1, 1),
        output_shapes=[(T, C), (T, K - 1, C)],
        output_dtypes=[in_dtype, in_dtype],
    )


# --- launches --------------------------------------------------------------------------------------------------


@dataclass
class ConvWindows:
    """Each node's conv window (its K-1 newest inputs) as rows of `source`: the window of node a is
    source[index[a]]. The twin gathers lazily from its input rows; the kernel writes windows outright."""

    source: mx.array  # [N, C]
    index: mx.array  # [T, K-1]

    def window_at(self, node: int) -> mx.array:
        return self.source[self.index[node]]


def conv_spec(x: mx.array, weight: mx.array) -> dict:
    return tree_conv1d_launch(T=x.shape[0], C=x.shape[1], K=weight.shape[1], in_dtype=x.dtype)


def conv_by_kernel(maker: KernelMaker, x: mx.array, cached: mx.array, weight: mx.array,
                   plan: LevelPlan) -> tuple[mx.array, ConvWindows]:
    T, C = x.shape
    K = weight.shape[1]
    out, windows = launch(maker, conv_spec(x, weight), [x, cached.astype(x.dtype), weight.reshape(C, K), plan.parents])
    return out, ConvWindows(windows.reshape(T * (K - 1), C), mx.arange(T * (K - 1)).reshape(T, K - 1))


def delta_spec(k: mx.array, v: mx.array, plan: LevelPlan) -> dict:
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1:]
    return tree_gated_delta_launch(T=T, Hk=Hk, Hv=Hv, Dk=Dk, Dv=Dv, in_dtype=v.dtype, f32=mx.float32,
                                   max_level_width=plan.width, scratch_rows=plan.scratch_rows)


def delta_by_kernel(maker: KernelMaker, q, k, v, log_g, beta, state0, plan: LevelPlan,
                    ancestors: mx.array) -> tuple[mx.array, recurrence.TreeRecurrence]:
    y, delta, _ = launch(maker, delta_spec(k, v, plan), [q, k, v, mx.exp(log_g), beta, state0.astype(mx.float32),
                                                         plan.parents, plan.order, plan.level_start, plan.slot,
                                                         plan.levels])
    return y, recurrence.delta_record(delta, k, log_g, state0, ancestors)


