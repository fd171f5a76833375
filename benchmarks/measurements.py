"""The engine's micro-measurements (--measure): a tree's verify cost beside a chain's, one GatedDeltaNet layer's
tree recurrence and commit, the Metal path's recurrent-state bytes, a long prefill's peak memory beside mlx-lm's,
and what the serving features (prompt cache, quantized KV cache) buy."""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import time
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from ddtree_mlx import PromptLookupDrafter, generate_ddtree_once
from ddtree_mlx.engine.calibration import lengthen
from ddtree_mlx.engine.prompt_cache import PromptCache
from ddtree_mlx.models.kv_quantization import KVQuantization
from ddtree_mlx.models.registry import adapter_for
from ddtree_mlx.training.drafter import DrafterShape, new_drafter
from ddtree_mlx.tree.draft_tree import DraftTree

from .presets import Setup
from .prompts import long_prompt

TWIN_SHAPES = {"150m": dict(Hk=6, Hv=12, Dk=128, Dv=128), "27b": dict(Hk=16, Hv=48, Dk=128, Dv=128)}
QWEN35_27B = dict(recurrent_layers=48, Hk=16, Hv=48, Dk=128, Dv=128)  # Qwen3.5-27B's GatedDeltaNet layers


def median_ms(run: Callable[[], Any], repeats: int) -> float:
    mx.eval(run())  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def shaped_tree(shape: str, size: int, seed: int = 0) -> DraftTree:
    """chain: one path; wide: a bushy random tree (each node's parent drawn among the earlier nodes)."""
    rng = random.Random(seed)
    tree = DraftTree.root_only(1)
    for node in range(1, size):
        tree.add(node - 1 if shape == "chain" else rng.randrange(node), 2 + node, 0)
    return tree


def measure_verify(setup: Setup, args: argparse.Namespace) -> list[dict]:
    """Verify cost of an N-node tree vs an N-token chain on the preset's target, after a real prompt (and with
    --context, after that many tokens: random keys and values, as calibration.lengthen grows them)."""
    target = adapter_for(setup.target)
    cache = target.make_cache()
    target.forward(mx.array(next(iter(setup.prompts.values()))[0]), cache, [])
    if args.context:
        lengthen(target, cache, np.random.default_rng(0), args.context)

    def verify(shape: str, size: int) -> mx.array:
        logits = target.verify(shaped_tree(shape, size), cache, [], setup.config).logits
        if size == 1:  # a lone root is a step, written into the cache: keep the context's length
            target.trim_attention(cache, 1)
        return logits

    rows = []
    for size in (1, 4, 16, 32):
        times = {shape: median_ms(lambda: verify(shape, size), args.repeats * 3) for shape in ("chain", "wide")}
        rows.append({"nodes": size, "chain_ms": times["chain"], "tree_ms": times["wide"],
                     "tree_over_chain": times["wide"] / times["chain"]})
        print(f"N={size:3d}  chain {times['chain']:8.2f} ms  tree {times['wide']:8.2f} ms  "
              f"tree/chain {times['wide'] / times['chain']:.3f}", flush=True)
    return rows


def measure_twin(args: argparse.Namespace) -> list[dict]:
    """One GatedDeltaNet layer's tree conv + tree recurrence (the pure-MLX twin) per verify, and what a commit
    of the deepest node costs three ways: closed form (no per-node state kept), every node's state written
    (what the first Metal kernel design kept), or replaying the accepted path with mlx-lm's chain recurrence."""
    from ddtree_mlx.kernels.recurrence import ReplayRecurrence, tree_conv, tree_gated_delta

    shape = TWIN_SHAPES[args.twin_shape]
    Hk, Hv, Dk, Dv = shape["Hk"], shape["Hv"], shape["Dk"], shape["Dv"]
    channels = 2 * Hk * Dk + Hv * Dv
    rows = []
    for size in (1, 4, 16, 64):
        for kind in ("chain", "wide"):
            tree = shaped_tree(kind, size)
            normal = lambda *dims: mx.random.normal(dims) * 0.1  # noqa: E731
            q, k, v = normal(size, Hk, Dk), normal(size, Hk, Dk), normal(size, Hv, Dv)
            log_g, beta = -mx.random.uniform(shape=(size, Hv)), mx.random.uniform(shape=(size, Hv))
            state0 = normal(Hv, Dv, Dk)
            x, cached, weight = normal(size, channels), normal(3, channels), normal(channels, 4, 1)
            ancestors, windows = mx.array(tree.ancestor_mask()), mx.array(tree.window_index(4))
            deepest = mx.array([size - 1])
            mx.eval(q, k, v, log_g, beta, state0, x, cached, weight)
            verify = median_ms(lambda: [tree_conv(x, cached, weight, windows)[0],
                                        tree_gated_delta(q, k, v, log_g, beta, state0, ancestors)[0]], args.repeats * 3)
            record = tree_gated_delta(q, k, v, log_g, beta, state0, ancestors)[1]
            mx.eval(record.u)
            replay = ReplayRecurrence(q, k, v, mx.exp(log_g), beta, state0, tree)
            row = {"shape": args.twin_shape, "tree": kind, "nodes": size, "verify_ms": verify,
                   "commit_closed_form_ms": median_ms(lambda: record.state_at(deepest), args.repeats * 3),
                   "all_node_states_ms": median_ms(lambda: record.state_at(mx.arange(size)), args.repeats * 3),
                   "commit_replay_ms": median_ms(lambda: replay.state_at(deepest), args.repeats * 3),
                   "node_state_mb": size * Hv * Dv * Dk * 4 / 2**20}
            rows.append(row)
            print_row(row, "{:.3f}")
    return rows


def measure_scratch(args: argparse.Namespace) -> list[dict]:
    """Recurrent-state bytes per verify on the Metal path at Qwen3.5-27B shapes, by arithmetic from the launch
    spec (no model, no GPU): the first design kept every node's state of every recurrent layer until the
    commit; the current kernel keeps each node's delta (Dv floats per head, for the closed-form commit) and
    writes states to a scratch of at most two levels that is dead once the layer's launch ends."""
    from ddtree_mlx.kernels.metal import LevelPlan, tree_gated_delta_launch

    shape, rows = QWEN35_27B, []
    layers = shape["recurrent_layers"]
    node_state = shape["Hv"] * shape["Dv"] * shape["Dk"] * 4
    for budget in (4, 8, 16, 32, 64):
        for kind in ("chain", "wide"):
            tree = shaped_tree(kind, budget + 1, seed=args.seed)
            plan = LevelPlan.of(tree.parents)
            spec = tree_gated_delta_launch(T=len(tree), Hk=shape["Hk"], Hv=shape["Hv"], Dk=shape["Dk"],
                                           Dv=shape["Dv"], in_dtype=mx.bfloat16, f32=mx.float32,
                                           max_level_width=plan.width, scratch_rows=plan.scratch_rows)
            sizes = [math.prod(dims) * dtype.size for dims, dtype in zip(spec["output_shapes"], spec["output_dtypes"])]
            delta, scratch = sizes[1], sizes[2]
            row = {"budget": budget, "tree": kind, "widest_level": plan.width, "scratch_rows": plan.scratch_rows,
                   "before_kept_mib": layers * len(tree) * node_state / 2**20,
                   "now_kept_mib": layers * delta / 2**20, "now_scratch_mib": scratch / 2**20}
            rows.append(row)
            print_row(row, "{:.1f}")
    return rows


def print_row(row: dict, number: str) -> None:
    print(" ".join(f"{key}={number.format(value) if isinstance(value, float) else value}"
                   for key, value in row.items()), flush=True)


def peak_above_now(run: Callable[[], Any]) -> tuple[float, float]:
    """(peak MiB above what was allocated before, seconds) of one run."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    run()
    return (mx.get_peak_memory() - before) / 2**20, time.perf_counter() - start


def measure_prefill_memory(setup: Setup, args: argparse.Namespace) -> list[dict]:
    """Prefill of --context tokens: peak memory above the weights and time, mlx-lm's own prefill (generate_step
    to its first token) beside ours (generate_ddtree_once to the first token) with prompt lookup (no hidden
    states) and with a DFlash-shaped drafter (its tapped layers' hidden states captured for every token)."""
    prompt = long_prompt(setup.prompts, args.context)
    # Random weights of a real drafter's shape (one layer, 5 taps, block 16): it costs what a trained one costs.
    target = adapter_for(setup.target)
    drafter = new_drafter(target, DrafterShape(block_size=16, layers=1, taps=min(5, len(target.layers))))

    def ours(draft_model: Any) -> Callable[[], Any]:
        return lambda: generate_ddtree_once(target_model=setup.target, draft_model=draft_model, prompt_tokens=prompt,
                                            max_new_tokens=1, config=setup.config)

    runs = {
        "mlx-lm generate_step": lambda: mx.eval(next(generate_step(mx.array(prompt), setup.target, max_tokens=1))[0]),
        "ddtree, prompt lookup": ours(PromptLookupDrafter()),
        f"ddtree, DFlash ({len(drafter.target_layer_ids)} taps)": ours(drafter),
    }
    rows = []
    for name, run in runs.items():
        peak, seconds = peak_above_now(run)
        rows.append({"run": name, "context": len(prompt), "peak_above_weights_mib": peak, "seconds": seconds})
    for row in rows:
        row["vs_mlx_lm"] = row["peak_above_weights_mib"] / rows[0]["peak_above_weights_mib"]
        print(f"{row['run']:<28} {row['context']} tokens: peak above weights {row['peak_above_weights_mib']:8.1f} MiB"
              f" ({row['vs_mlx_lm']:.2f}x mlx-lm), {row['seconds']:.1f} s", flush=True)
    return rows


def measure_serving(setup: Setup, args: argparse.Namespace) -> list[dict]:
    """What serving features buy at --context tokens: time to first token of a conversation's second turn with the
    prompt cache vs its first turn (and vs the second turn without the cache), and the KV cache's bytes with
    --kv-bits 8 and 4 (quantized from the start) vs the plain cache, after the same prefill."""
    first = long_prompt(setup.prompts, args.context)
    rows = turns(setup, first, args.context)
    target = adapter_for(setup.target)
    for dtype in (None, mx.bfloat16):  # the model as loaded, then cast to bf16 (the KV cache takes its dtype)
        if dtype is not None:
            setup.target.set_dtype(dtype)
        rows += kv_cache_sizes(target, first, setup.config.prefill_step_size)
    return rows


def turns(setup: Setup, first: list[int], context: int) -> list[dict]:
    """Time to first token of a conversation's first turn, and of its second with and without the prompt cache."""
    cache = PromptCache(2**32)

    def turn(prompt: list[int], prompt_cache: PromptCache | None) -> dict:
        return generate_ddtree_once(target_model=setup.target, draft_model=PromptLookupDrafter(), prompt_tokens=prompt,
                                    max_new_tokens=32, stop_token_ids=[], prompt_cache=prompt_cache,
                                    config=setup.config)

    one = turn(first, cache)
    second = first + one["generated_token_ids"] + long_prompt(setup.prompts, context + 24)[-24:]  # a short message
    rows = [{"run": "turn 1 (empty cache)", "ttft_s": one["prefill_seconds"], "reused": one["reused_prompt_tokens"]}]
    for name, prompt_cache in (("turn 2, prompt cache", cache), ("turn 2, no cache", None)):
        result = turn(second, prompt_cache)
        rows.append({"run": name, "ttft_s": result["prefill_seconds"], "reused": result["reused_prompt_tokens"]})
    for row in rows:
        row["vs_turn_1"] = row["ttft_s"] / rows[0]["ttft_s"]
        print(f"{row['run']:<24} {len(first)}-token conversation: time to first token {row['ttft_s']:6.3f} s "
              f"({row['vs_turn_1']:.1%} of turn 1), {row['reused']} prompt tokens reused", flush=True)
    return rows


def kv_cache_sizes(target: Any, prompt: list[int], step: int) -> list[dict]:
    """The attention KV cache's bytes after `prompt`: plain, then quantized to 8 and 4 bits from the start."""
    name = str(target.embed(mx.array([0])).dtype).split(".")[-1]
    rows, plain = [], None
    for bits in (None, 8, 4):
        kv = target.make_cache()
        target.prefill(prompt, kv, [], step, after_chunk=KVQuantization(bits, 64, 0).convert if bits else None)
        nbytes = sum(entry.nbytes for entry in kv if target.is_attention_cache(entry))
        plain = plain or nbytes
        rows.append({"run": f"KV cache, {name}, {f'{bits}-bit' if bits else 'plain'}", "kv_mib": nbytes / 2**20,
                     "vs_plain": nbytes / plain})
        print(f"{rows[-1]['run']:<28} after {len(prompt)} tokens: {nbytes / 2**20:8.1f} MiB "
              f"({nbytes / plain:.1%} of the plain {name} cache)", flush=True)
    return rows
