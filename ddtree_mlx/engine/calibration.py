"""What a verify of a tree of each size costs on this machine, measured once and remembered.

The tree size worth verifying (tree_size.TreeSizer) depends on how verify time grows with the tree, and that
depends on the machine more than on anything else: a node costs ~4% of a one-token verify on these CPUs with
OpenBLAS, close to 100% on MLX's bundled reference BLAS (every node is one more row through every matmul), ~0 on a
GPU at small trees. Nor does it always grow: OpenBLAS multiplies 4, 8 or 16 rows faster than 3, 5 or 9 (its kernels
work in blocks of rows; measured here, a tree of 4 nodes verifies in a plain step's time, one of 3 in 1.25 of it).
So the curve is measured at first use: verify of bushy random trees of 1, 2, 3, 4, 5, 8, 9, ... 33 nodes on the
real target after a short prompt (a slow machine stops the grid after TIME_BUDGET seconds; the curve extends
linearly past its last point); a tree is verified as the size, at least its own, that costs least at the current
context: padded to a bigger one where that is cheaper (`VerifyCosts.choose`). Then a plain step and two trees again
after a long context, which says what every context token adds: to a plain step, to a tree, and to a tree per node
(each node attends over the whole context; on this CPU, at 6K tokens, one more node costs ~20 ms where it cost
~3 ms after 32; ~40 ms without the split attention of models/attention.py). It is cached on disk per (model, dtype and
quantization, device, MLX version, BLAS, ddtree-mlx version); a cache file that is unreadable or of another format
is measured again, never an error. What it cannot know (other work on the machine, the drafter) the cycles measure
online.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from ..blas import blas_name
from ..config import DDTreeConfig
from ..models.adapter import TargetAdapter
from ..tree.draft_tree import DraftTree
from .ranks import broadcast

log = logging.getLogger(__name__)

# Nodes, root included (DDTREE_MAX_TREE_BUDGET's default of 32 draft nodes and the root): dense where trees are
# small, and either side of the row blocks BLAS kernels work in.
SIZES = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33)
PROMPT_TOKENS = 32  # the grid's context
LONG_SIZES = (1, 2, 9)  # measured again after LONG_CONTEXT tokens (or the nearest sizes trees are verified as)
LONG_CONTEXT = 4096  # or half the model's context window, if smaller
REPEATS = 4
TIME_BUDGET = 5.5  # seconds of measuring the grid, about: a slow machine measures fewer sizes (always two)
LONG_BUDGET = 1.0  # seconds of rounds after the long context, about (always one)
FORMAT = 7  # 5: verify attention split on the CPU by default; 6: and a plain step's (other per-token costs);
# 7: a lone tree size's per-token cost counted per node (`per_token`)
# A tree verify does all of a plain step's work and more: a curve with a tree this much cheaper than the plain step
# was measured on a busy machine (seen here: 3 nodes at 100 ms, 1 at 125 ms, with two other jobs on two cores).
STEADY = 0.9


@dataclass(frozen=True)
class VerifyCosts:
    sizes: tuple[int, ...]
    seconds: tuple[float, ...]  # the fastest verify of a tree of each size (root included) after PROMPT_TOKENS
    # Seconds each context token past PROMPT_TOKENS adds: to a plain step, to a tree whatever its size, and to a
    # tree per node. Every tree node attends over the whole context; a tree also copies it next to its own keys
    # (unless its attention is split).
    per_token: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @cached_property
    def frontier(self) -> tuple[np.ndarray, np.ndarray]:
        """The sizes no bigger size undercuts after PROMPT_TOKENS (a plain step always), and their seconds."""
        cheapest, _ = self.cheapest(PROMPT_TOKENS)
        sizes = np.array(self.sizes)
        kept = (cheapest == np.arange(len(sizes))) | (sizes == 1)
        return sizes[kept], np.array(self.seconds)[kept]

    @cached_property
    def slope(self) -> float:
        """Seconds per node past the last size: the least-squares slope of the frontier's upper half (where a
        GPU's curve bends up), or of all of it if that is steeper. Never below zero: a flat end would make every
        bigger tree look free."""
        sizes, seconds = self.frontier
        if len(sizes) < 2:
            return 0.0
        half = len(sizes) // 2 if len(sizes) >= 4 else 0
        return max(max(float(np.polyfit(sizes[first:], seconds[first:], 1)[0]) for first in (0, half)), 0.0)

    def added(self, rows: np.ndarray, context: int) -> np.ndarray:
        """Seconds a context longer than PROMPT_TOKENS adds to verifying `rows` rows (one row: a plain step)."""
        step, tree, node = self.per_token
        return max(context - PROMPT_TOKENS, 0) * np.where(rows == 1, step, tree + node * rows)

    def cheapest(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        """Per measured size, the index of the cheapest size at least as big after `context` tokens; and every
        size's seconds there."""
        costs = np.array(self.seconds) + self.added(np.array(self.sizes), context)
        return np.array([i + int(np.argmin(costs[i:])) for i in range(len(costs))]), costs

    def choose(self, nodes: np.ndarray | int, context: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, seconds) for trees of `nodes` nodes after `context` tokens: a tree is verified as the measured
        size, at least its own, that costs least there (bigger when that is cheaper: the rows past the tree are
        padding; at a long context, where every row attends over it, padding costs more and pays less). Past the
        grid a tree is verified as it is, its cost straight on from the last size. A plain step stays one, and no
        tree costs less than it."""
        nodes, sizes = np.asarray(nodes), np.array(self.sizes)
        cheapest, costs = self.cheapest(context)
        pick = cheapest[np.minimum(np.searchsorted(sizes, nodes), len(sizes) - 1)]
        past = nodes > sizes[-1]
        beyond = self.seconds[-1] + self.slope * (nodes - sizes[-1]) + self.added(nodes, context)
        rows = np.where(nodes == 1, 1, np.where(past, nodes, sizes[pick]))
        seconds = np.where(nodes == 1, costs[0], np.maximum(np.where(past, beyond, costs[pick]), costs[0]))
        return rows, seconds

    def rows(self, nodes: np.ndarray | int, context: int = PROMPT_TOKENS) -> np.ndarray:
        """How many nodes a tree of `nodes` is verified as (`choose`)."""
        return self.choose(nodes, context)[0]

    def at(self, nodes: np.ndarray | int, context: int = PROMPT_TOKENS) -> np.ndarray:
        """Verify seconds of trees of `nodes` nodes after `context` tokens (`choose`)."""
        return self.choose(nodes, context)[1]


def random_tree(size: int, rng: np.random.Generator, vocab: int) -> DraftTree:
    tree = DraftTree.root_only(int(rng.integers(vocab)))
    for _ in range(size - 1):
        parent = int(rng.integers(len(tree)))
        tree.add(parent, int(rng.integers(vocab)), 0)
    return tree


def measure(target: TargetAdapter, config: DDTreeConfig = DDTreeConfig(), sizes: tuple[int, ...] = SIZES) -> VerifyCosts:
    """Verify time per tree size after a PROMPT_TOKENS prompt, then of LONG_SIZES after a long context, with the
    generation's own settings (kernels on or off). Sharded, every rank keeps rank 0's numbers and decisions."""
    rng = np.random.default_rng(0)
    cache = target.make_cache()
    target.forward(mx.array(rng.integers(target.vocab_size, size=PROMPT_TOKENS)), cache, [])
    mx.eval([entry.state for entry in cache])
    run = timer(target, config, rng)
    run(1, cache)  # the process's first verify pays for one-time set-up (kernel checks, allocations): not counted
    # A first round builds each size's kernels and says what a round costs: the grid ends where REPEATS more
    # rounds would not fit in TIME_BUDGET (the curve continues straight from there).
    first, start = [], time.perf_counter()
    for size in sizes:
        if len(first) >= 2:
            guess = VerifyCosts(tuple(sizes[: len(first)]), tuple(first)).at(size)
            if agreed([(time.perf_counter() - start + guess) * (REPEATS + 1) > TIME_BUDGET], target)[0]:
                break
        first.append(run(size, cache))
    grid = sizes[: len(first)]
    costs = VerifyCosts(tuple(grid), tuple(agreed(fastest(run, grid, cache), target)))
    length = lengthen(target, cache, rng)
    kept = [int(size) for size in costs.frontier[0]]  # the sizes trees are verified as (at short contexts)
    small = next((size for size in kept if size >= LONG_SIZES[1]), kept[-1])
    long_sizes = (1, small, max(size for size in kept if size <= max(LONG_SIZES[2], small)))
    # A first round at the long context, not counted: one run there once took 4.3 s where the next took 0.095 s
    # (a plain step's cost per context token 100x too high, every later generation's plain steps priced by it).
    fastest(run, long_sizes, cache, 0.0, target)
    extra = np.array(agreed(fastest(run, long_sizes, cache, LONG_BUDGET, target), target)) - costs.at(np.array(long_sizes))
    return VerifyCosts(costs.sizes, costs.seconds, per_token(long_sizes, extra / (length - PROMPT_TOKENS)))


def per_token(sizes: tuple[int, int, int], extra: np.ndarray) -> tuple[float, float, float]:
    """(plain step, tree, tree node) seconds per context token from the extra seconds per token of `sizes` (1 and
    two trees): the plain step's directly, the tree's two parts from the line through its two sizes (none below
    zero: noise). Where only one tree size was measured (a slow machine's grid stops at 2 rows), all of it is per
    node, as each node attends over the whole context: counted per tree, a 33-node tree after 4K tokens cost
    what a 2-node one's context adds, and next to a plain step (which pays its own) looked cheaper at every
    context token, as if drafting could pay there on the reference BLAS."""
    (_, small, big), (step, low, high) = sizes, extra
    if big == small:
        return max(float(step), 0.0), 0.0, max(float(low) / small, 0.0)
    node = max((high - low) / (big - small), 0.0)
    return max(float(step), 0.0), max(float(low - node * small), 0.0), float(node)


def lengthen(target: TargetAdapter, cache: list[Any], rng: np.random.Generator, length: int | None = None) -> int:
    """Grow the attention caches to `length` (LONG_CONTEXT) tokens of random keys and values, and return that
    length. What a verify costs depends on how many keys it attends over, not on what they are, so no prefill is
    needed (a slow machine would spend minutes on one). Shapes come from the caches themselves."""
    length = length or min(LONG_CONTEXT, (target.context_length or 2 * LONG_CONTEXT) // 2)
    for entry in cache:
        if target.is_attention_cache(entry) and entry.offset < length:
            keys, values = entry.keys, entry.values
            more = length - entry.offset
            entry.update_and_fetch(mx.array(rng.normal(size=(*keys.shape[:2], more, keys.shape[3])), keys.dtype),
                                   mx.array(rng.normal(size=(*values.shape[:2], more, values.shape[3])), values.dtype))
    mx.eval([entry.state for entry in cache])
    return target.prefix_length(cache)


def timer(target: TargetAdapter, config: DDTreeConfig, rng: np.random.Generator) -> Callable[[int, list[Any]], float]:
    """Seconds to verify a random bushy tree of `size` nodes after what `cache` holds. A one-node verify is a
    plain step, which writes into the cache: it is trimmed back, so every run sees the same context (a recurrent
    state moves on, which changes what it computes, not what that costs)."""
    def run(size: int, cache: list[Any]) -> float:
        tree = random_tree(size, rng, target.vocab_size)
        start = time.perf_counter()
        mx.eval(target.verify(tree, cache, [], config).logits)
        seconds = time.perf_counter() - start
        if size == 1:
            for entry in cache:
                if target.is_attention_cache(entry):
                    entry.trim(1)
        return seconds

    return run


def fastest(run: Callable[[int, list[Any]], float], sizes: tuple[int, ...], cache: list[Any],
            budget: float = np.inf, target: TargetAdapter | None = None) -> list[float]:
    """Rounds over all sizes, not one size after another: drift (another job, the clock) hits every size alike
    instead of bending the curve. The fastest run of each size, as timing noise only adds. REPEATS rounds, or
    fewer (at least one) once `budget` seconds have passed."""
    rounds, start = [], time.perf_counter()
    while len(rounds) < REPEATS and not (rounds and agreed([time.perf_counter() - start > budget], target)[0]):
        rounds.append([run(size, cache) for size in sizes])
    return [min(times) for times in zip(*rounds)]


def agreed(values: list[float], target: TargetAdapter | None) -> list[float]:
    """Sharded: rank 0's values on every rank, so all ranks decide alike and size trees from the same curve."""
    return broadcast(values, target.group) if target is not None and target.group is not None else values


def machine_key(target: TargetAdapter, config: DDTreeConfig = DDTreeConfig()) -> str:
    """What the verify cost depends on besides the tree: the model's shape, dtype and quantization, the device,
    the software it runs on, and how verify attention is computed (split or not, from what context)."""
    from importlib.metadata import version

    weights = sorted((name, str(value.dtype), tuple(value.shape)) for name, value in _leaves(target.model))
    parts = [repr(sorted(vars(target.args).items(), key=str)), repr(weights), str(mx.default_device()),
             mx.__version__, blas_name(), version("ddtree-mlx"), str(FORMAT),
             repr((config.exact_tree_attention, config.exact_tree_attention_min_prefix))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _leaves(model: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def curve_path(target: TargetAdapter, config: DDTreeConfig) -> Path:
    """Where this machine's curve for `target` is kept (under DDTREE_CACHE_DIR)."""
    return config.cache_path / "calibration" / f"{machine_key(target, config)}.json"


_MEMORY: dict[str, VerifyCosts] = {}


def verify_costs(target: TargetAdapter, config: DDTreeConfig = DDTreeConfig()) -> VerifyCosts:
    """This machine's costs for this target: from memory, from disk, or measured now (a few seconds) and saved."""
    key = machine_key(target, config)
    if key in _MEMORY:
        return _MEMORY[key]
    path = curve_path(target, config)
    if target.group is not None:
        # Sharded: measured on every start, no file (one rank reading a file while another measured would leave
        # the measuring rank's collectives unanswered).
        costs = _MEMORY[key] = measure(target, config)
        return costs
    costs = read(path)
    if costs is None:
        log.info("measuring verify cost per tree size on this machine (once per model; cached)")
        costs = measure(target, config)
        if not steady(costs):
            log.warning("the machine was busy while measuring (a tree verified faster than a plain step); using the "
                        "curve for this process only: it is measured again next time")
            _MEMORY[key] = costs
            return costs
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")  # processes starting together write apart
        partial.write_text(json.dumps({"format": FORMAT, **asdict(costs)}))
        partial.replace(path)
    _MEMORY[key] = costs
    return costs


def steady(costs: VerifyCosts) -> bool:
    """Whether the curve can stand for this machine: no tree far cheaper than the plain step, after the grid's
    prompt or after the long context."""
    return all(min(seconds[1:]) >= STEADY * seconds[0]
               for _, seconds in (costs.cheapest(PROMPT_TOKENS), costs.cheapest(LONG_CONTEXT)))


def read(path: Path) -> VerifyCosts | None:
    try:
        data = json.loads(path.read_text())
        costs = VerifyCosts(tuple(int(s) for s in data["sizes"]), tuple(float(s) for s in data["seconds"]),
                            tuple(float(s) for s in data["per_token"]))
        if (data["format"] != FORMAT or len(costs.sizes) != len(costs.seconds) or len(costs.sizes) < 2
                or min(costs.seconds) <= 0 or list(costs.sizes) != sorted(set(costs.sizes)) or costs.sizes[0] != 1
                or len(costs.per_token) != 3 or not all(0 <= s < 1 for s in costs.per_token) or not steady(costs)):
            return None
        return costs
    except (OSError, ValueError, KeyError, TypeError):
        return None
