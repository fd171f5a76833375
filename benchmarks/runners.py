"""One timed generation of one variant on one prompt: our methods through the engine, mlx-lm's own decoding
(generate_step, the loop under its stream_generate) and its speculative decoding, the peer."""

from __future__ import annotations

import time
from typing import Iterable

import mlx.core as mx
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.sample_utils import make_sampler

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.engine.session import PHASES

from .presets import MLX_LM, PEER, Setup, Variant


def run_once(setup: Setup, prompt: list[int], truth: list[int] | None, variant: Variant, max_tokens: int,
             temp: float = 0.0, seed: int = 0) -> dict:
    """One generation of `variant`, with its peak memory; `truth` (mlx-lm's output) is what an oracle drafter
    knows."""
    mx.reset_peak_memory()
    if variant.method == PEER:
        result = run_mlx_lm_speculative(setup, prompt, max_tokens)
    elif variant == MLX_LM:
        result = run_mlx_lm(setup, prompt, max_tokens, temp, seed)
    else:
        result = run_ours(setup, prompt, truth, variant, max_tokens, temp, seed)
    result["peak_memory_bytes"] = mx.get_peak_memory()
    return result


def run_ours(setup: Setup, prompt: list[int], truth: list[int] | None, variant: Variant, max_tokens: int,
             temp: float, seed: int) -> dict:
    drafter = None if variant.method == "ar" else setup.make_drafter(prompt, truth or [], variant.draft)
    # A row is what its label says: ddtree@N a tree of N nodes every cycle, ddtree@auto sized per cycle.
    config = setup.config.replace(tree_budget=variant.tree_budget) if variant.tree else setup.config
    return generate_ddtree_once(target_model=setup.target, draft_model=drafter, prompt_tokens=prompt,
                                max_new_tokens=max_tokens, stop_token_ids=setup.stop_token_ids,
                                method=variant.method, config=config, temperature=temp, seed=seed,
                                logprobs=variant.logprobs,
                                prompt_cache=setup.prefills.ours if setup.prefills else None)


def run_mlx_lm(setup: Setup, prompt: list[int], max_tokens: int, temp: float = 0.0, seed: int = 0) -> dict:
    """mlx-lm's own decoding: generate_step, the loop under its stream_generate (without the detokenizer, which
    our timing leaves out too), with mlx-lm's sampler; timed decode only, from the first token on."""
    mx.random.seed(seed)
    cache = setup.prefills.mlx_lm_cache(setup.target, prompt) if setup.prefills else None
    steps = generate_step(mx.array(prompt[-1:] if cache else prompt), setup.target, max_tokens=max_tokens,
                          sampler=make_sampler(temp=temp), prompt_cache=cache)
    taken, seconds = timed(setup, ((token,) for token, _ in steps))
    return peer_result([token for token, in taken], seconds, cycles=max(len(taken) - 1, 1))


def run_mlx_lm_speculative(setup: Setup, prompt: list[int], max_tokens: int, draft_tokens: int = 4) -> dict:
    """The peer: mlx-lm's own speculative decoding (a draft model, greedy), timed like our runs: decode only,
    from the first token on."""
    steps = speculative_generate_step(mx.array(prompt), setup.target, setup.peer_draft, max_tokens=max_tokens,
                                      num_draft_tokens=draft_tokens, sampler=lambda x: mx.argmax(x, axis=-1))
    taken, seconds = timed(setup, ((token, from_draft) for token, _, from_draft in steps))
    drafted = sum(bool(from_draft) for _, from_draft in taken)
    cycles = max(len(taken) - 1 - drafted, 1)  # each verify ends with one token of the target's own
    return peer_result([token for token, _ in taken], seconds, cycles)


def timed(setup: Setup, steps: Iterable[tuple]) -> tuple[list[tuple], float]:
    """mlx-lm's steps up to a stop token, token first (as an int) and without their logprobs (kept, they would count
    in its peak memory), and the seconds from the first one on: prefill left out, as in our decode time."""
    taken, first = [], None
    for token, *rest in steps:
        first = first or time.perf_counter()
        taken.append((int(token), *rest))
        if taken[-1][0] in setup.stop_token_ids:
            break
    return taken, time.perf_counter() - first


def peer_result(tokens: list[int], decode: float, cycles: int) -> dict:
    """A result row for a loop we only time: fields we cannot see inside mlx-lm (phases, host share) are NaN."""
    nan = float("nan")
    return {"generated_token_ids": tokens, "decode_seconds": decode, "cycles": cycles,
            "avg_acceptance": (len(tokens) - 1) / cycles, "fast_path_ratio": 1.0, "host_overhead_share": nan,
            "phase_timings": dict.fromkeys(PHASES, nan)}
