"""The Metal kernels check themselves against the pure-MLX twin before a process uses them.

They were written and tested through a CPU harness, never on every Mac, and MLX compiles a library per template
(input dtype and sizes), so a kernel is checked at the shapes and dtype of the target that will run it: every
launch layout generation can build (1, 2 and 4 node slots), on a chain and on trees under and over 8 nodes, each
compared with the twin on the same random inputs. A variant that fails to build, raises or disagrees is reported
(guard.py then runs the twin in its place). Results are kept on disk per machine, MLX version and shape set
(`Verdicts`), as the verify-cost calibration is.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import numpy as np

from ..tree.draft_tree import DraftTree
from . import recurrence
from .metal import ConvWindows, KernelMaker, LevelPlan, Variant, conv_by_kernel, conv_spec, delta_by_kernel, delta_spec

# Trees that build every launch layout (node slots follow the widest level: 1, 2, 4) under and over 8 nodes.
TREES = {
    "chain": [-1, 0, 1, 2, 3, 4, 5, 6, 7],
    "pairs": [-1, 0, 0, 1, 2],
    "bushy": [-1, 0, 0, 0, 1, 2, 3],
    "branching": [-1, 0, 0, 1, 1, 2, 5, 6, 3],
}
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-3}  # relative to the twin's largest magnitude


@dataclass(frozen=True)
class DeltaShape:
    """A GatedDeltaNet layer's recurrence as the kernel sees it (mlx-lm's num_k_heads, head_k_dim, ...)."""

    Hk: int
    Hv: int
    Dk: int
    Dv: int
    dtype: str
    kernel: str = "ddtree_tree_gated_delta"

    def supported(self) -> bool:
        """The kernel's layout: a simdgroup's 32 lanes split Dk, value heads group over key heads."""
        return self.Dk % 32 == 0 and self.Hv % self.Hk == 0


@dataclass(frozen=True)
class ConvShape:
    """A GatedDeltaNet layer's causal conv: channels and kernel width."""

    C: int
    K: int
    dtype: str
    kernel: str = "ddtree_tree_conv1d"

    def supported(self) -> bool:
        return True


Shape = DeltaShape | ConvShape
# Without a target (the doctor on a machine alone): small shapes of both head layouts, in each dtype.
DEFAULT_SHAPES = (DeltaShape(1, 2, 32, 8, "float32"), DeltaShape(2, 2, 64, 16, "bfloat16"),
                  DeltaShape(2, 6, 32, 8, "float16"), ConvShape(24, 4, "float32"), ConvShape(40, 4, "bfloat16"),
                  ConvShape(40, 4, "float16"))


@dataclass(frozen=True)
class VariantCheck:
    variant: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tree_of(parents: list[int]) -> DraftTree:
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent < 0 else depths[parent] + 1)
    return DraftTree(tokens=[0] * len(parents), parents=list(parents), depths=depths, ranks=[0] * len(parents))


def disagreement(pairs: list[tuple[mx.array, mx.array]], dtype: str) -> float:
    """The largest kernel-vs-twin difference over the pairs, as a multiple of the tolerance (<= 1 agrees)."""
    worst = 0.0
    for ours, twin in pairs:
        ours, twin = ours.astype(mx.float32), twin.astype(mx.float32)
        error = float(mx.max(mx.abs(ours - twin))) / (TOLERANCE[dtype] * max(float(mx.max(mx.abs(twin))), 1.0))
        worst = max(worst, error if np.isfinite(error) else float("inf"))
    return worst


def delta_inputs(shape: DeltaShape, tree: DraftTree) -> tuple[mx.array, ...]:
    """Random q, k (unit rows, as the layer normalises them), v, log decay, beta and a starting state."""
    T, dtype = len(tree), getattr(mx, shape.dtype)
    keys = mx.random.split(mx.random.key(T * shape.Hv + shape.Dk), 6)
    unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(mx.random.normal((T, shape.Hk, shape.Dk), key=keys[0])).astype(dtype)
    k = unit(mx.random.normal((T, shape.Hk, shape.Dk), key=keys[1])).astype(dtype)
    v = mx.random.normal((T, shape.Hv, shape.Dv), key=keys[2]).astype(dtype)
    log_g = -mx.random.uniform(0.01, 1.0, (T, shape.Hv), key=keys[3])
    beta = mx.random.uniform(0.1, 0.9, (T, shape.Hv), key=keys[4]).astype(dtype)
    state0 = 0.1 * mx.random.normal((shape.Hv, shape.Dv, shape.Dk), key=keys[5])
    return q, k, v, log_g, beta, state0


def delta_pairs(ours: tuple[mx.array, Any], twin: tuple[mx.array, Any], nodes: int) -> list[tuple[mx.array, mx.array]]:
    """(kernel, twin) pairs of a tree recurrence: the outputs y and every node's state."""
    every = mx.arange(nodes)
    return [(ours[0], twin[0]), (ours[1].state_at(every), twin[1].state_at(every))]


def conv_pairs(ours: tuple[mx.array, ConvWindows], twin: tuple[mx.array, ConvWindows],
               nodes: int) -> list[tuple[mx.array, mx.array]]:
    """(kernel, twin) pairs of a tree conv: the outputs and every node's window."""
    return [(ours[0], twin[0])] + [(ours[1].window_at(node), twin[1].window_at(node)) for node in range(nodes)]


def twin_conv(x: mx.array, cached: mx.array, weight: mx.array, index: mx.array) -> tuple[mx.array, ConvWindows]:
    out, rows = recurrence.tree_conv(x, cached, weight, index)
    return out, ConvWindows(rows, index[:, 1:])


def run_delta(maker: KernelMaker, shape: DeltaShape, tree: DraftTree) -> Launch:
    q, k, v, log_g, beta, state0 = delta_inputs(shape, tree)
    plan, ancestors = LevelPlan.of(tree.parents), mx.array(tree.ancestor_mask())
    return Launch(Variant.of(delta_spec(k, v, plan)),
                  lambda: delta_by_kernel(maker, q, k, v, log_g, beta, state0, plan, ancestors),
                  lambda: recurrence.tree_gated_delta(q, k, v, log_g, beta, state0, ancestors),
                  lambda ours, twin: delta_pairs(ours, twin, len(tree)))


def run_conv(maker: KernelMaker, shape: ConvShape, tree: DraftTree) -> Launch:
    T, dtype = len(tree), getattr(mx, shape.dtype)
    keys = mx.random.split(mx.random.key(T * shape.C + shape.K), 3)
    x = mx.random.normal((T, shape.C), key=keys[0]).astype(dtype)
    cached = mx.random.normal((shape.K - 1, shape.C), key=keys[1]).astype(dtype)
    weight = (0.5 * mx.random.normal((shape.C, shape.K, 1), key=keys[2])).astype(dtype)
    plan, index = LevelPlan.of(tree.parents), mx.array(tree.window_index(shape.K))
    return Launch(Variant.of(conv_spec(x, weight)), lambda: conv_by_kernel(maker, x, cached, weight, plan),
                  lambda: twin_conv(x, cached, weight, index), lambda ours, twin: conv_pairs(ours, twin, T))


@dataclass
class Launch:
    """One launch of a kernel variant on one tree, the same computed by the twin, and how to compare the two."""

    variant: Variant
    kernel: Callable[[], Any]
    twin: Callable[[], Any]
    pairs: Callable[[Any, Any], list[tuple[mx.array, mx.array]]]


def launches(maker: KernelMaker, shape: Shape) -> Iterator[tuple[str, Launch]]:
    run = run_delta if isinstance(shape, DeltaShape) else run_conv
    for name, parents in TREES.items():
        yield name, run(maker, shape, tree_of(parents))


def check_shape(maker: KernelMaker, shape: Shape, compare: bool = True) -> list[VariantCheck]:
    """Every variant of `shape`'s kernel that generation can build, launched on every tree in TREES and, with
    `compare`, checked against the twin (without: built and run only, to warm them). A variant that cannot build
    or run ends the check of its shape: its kernel will not run here."""
    worst: dict[str, tuple[float, str]] = {}
    for name, launch in launches(maker, shape):
        try:
            ours = launch.kernel()
            mx.eval(ours[0])  # the launch's first output: evaluating it runs the kernel
            ratio = disagreement(launch.pairs(ours, launch.twin()), shape.dtype) if compare else 0.0
        except Exception as error:  # noqa: BLE001 - whatever a kernel that cannot build or run raises, the twin runs
            failed = VariantCheck(str(launch.variant), False, f"could not build or run on the {name} tree: "
                                  f"{type(error).__name__}: {error}")
            return verdicts(worst, compare) + [failed]
        if ratio > worst.get(str(launch.variant), (-1.0, ""))[0]:
            worst[str(launch.variant)] = ratio, name
    return verdicts(worst, compare)


def verdicts(worst: dict[str, tuple[float, str]], compared: bool) -> list[VariantCheck]:
    return [VariantCheck(variant, ratio <= 1.0, f"largest error {ratio:.3g}x the tolerance, on the {tree} tree"
                         if compared else "built") for variant, (ratio, tree) in worst.items()]


def check(maker: KernelMaker, shapes: tuple[Shape, ...], compare: bool = True) -> list[VariantCheck]:
    return [result for shape in shapes if shape.supported() for result in check_shape(maker, shape, compare)]


class Verdicts:
    """Self-check results on disk, per machine, MLX version, ddtree-mlx version and shape set."""

    def __init__(self, folder: Path, shapes: tuple[Shape, ...]):
        device = mx.metal.device_info().get("device_name", "metal") if mx.metal.is_available() else "cpu"
        self.key = {"machine": platform.machine(), "device": str(device), "mlx": mx.__version__,
                    "ddtree_mlx": version("ddtree-mlx"), "shapes": [asdict(shape) for shape in shapes]}
        name = "-".join(str(self.key[part]) for part in ("device", "mlx", "ddtree_mlx")).replace(" ", "_")
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        self.path = folder / f"{name}-{digest}.json"

    def read(self) -> list[VariantCheck] | None:
        try:
            data = json.loads(self.path.read_text())
            return [VariantCheck(**row) for row in data["checks"]] if data["key"] == self.key else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, checks: list[VariantCheck]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"key": self.key, "checks": [c.as_dict() for c in checks]}, indent=1))
        partial.replace(self.path)
