"""The main comparison: every variant on every prompt, interleaved per prompt after a warm-up so the machine's drift
hits them alike; each run's tokens checked against mlx-lm's own from the same prompt and repeat, and each speedup
taken against the baselines of that same repeat."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

from ddtree_mlx.blas import blas_name
from ddtree_mlx.engine.session import PHASES
from ddtree_mlx.training.progress import show

from .presets import AR, DRAFTED, MLX_LM, PEER, Setup, Variant, variants
from .runners import run_once


@dataclass
class Runs:
    """All runs of one (set, variant), grouped by repeat."""

    per_repeat: dict[int, list[dict]] = field(default_factory=dict)
    lossless: bool | None = True  # None: sampled, so there is no single right output to compare with

    def add(self, repeat: int, result: dict, ok: bool | None) -> None:
        self.per_repeat.setdefault(repeat, []).append(result)
        self.lossless = None if ok is None else self.lossless and ok


def compare(setup: Setup, args: argparse.Namespace) -> list[dict]:
    """One row per set and variant."""
    return summarize(measure(setup, args), setup, args)


def measure(setup: Setup, args: argparse.Namespace) -> dict[tuple[str, Variant], Runs]:
    plan = variants(args.methods, args.tree_budgets, setup.drafts, args.logprobs)
    total = sum(len(p) for p in setup.prompts.values()) * args.repeats * len(plan)
    first = next(iter(setup.prompts.values()))[0]
    warm_truth = run_once(setup, first, None, MLX_LM, args.max_tokens)["generated_token_ids"]
    for variant in plan:  # warm-up: compile paths and caches, not recorded
        run_once(setup, first, warm_truth, variant, args.max_tokens)
    runs: dict[tuple[str, Variant], Runs] = {}
    done = 0
    for set_name, prompts in setup.prompts.items():
        for repeat in range(args.repeats):
            for prompt in prompts:
                truth = None
                for variant in plan:  # mlx-lm first: its tokens are this prompt's truth
                    result = run_once(setup, prompt, truth, variant, args.max_tokens, args.temp,
                                      seed=args.seed + repeat)
                    if variant == MLX_LM:
                        truth = result["generated_token_ids"]
                    # Sampled runs draw different random numbers per method: only greedy runs must match mlx-lm.
                    ok = result["generated_token_ids"] == truth if args.temp == 0 else None
                    runs.setdefault((set_name, variant), Runs()).add(repeat, result, ok)
                    done += 1
                    show(done, total, f"{set_name} {variant.label:<28}")
    return runs


def summarize(runs: dict[tuple[str, Variant], Runs], setup: Setup, args: argparse.Namespace) -> list[dict]:
    rows = []
    for (set_name, variant), group in runs.items():
        repeats = sorted(group.per_repeat)
        mine = [pooled(group.per_repeat[r]) for r in repeats]
        base = {name: [pooled(runs[(set_name, baseline)].per_repeat[r]) for r in repeats]
                for name, baseline in (("ar", AR), ("mlx_lm", MLX_LM))}
        results = [r for rs in group.per_repeat.values() for r in rs]
        rows.append({
            "preset": setup.name, "set": set_name, "method": variant.method, "label": variant.label,
            "draft": drafter_of(variant, setup, args),
            "tree_budget": variant.tree_budget,
            "tree_sizes": tree_sizes(results),
            "calibration": next((r["calibration"] for r in results if r.get("calibration")), None),
            "context": args.context or 0,
            "prompts": len(setup.prompts[set_name]), "repeats": len(repeats), "max_tokens": args.max_tokens,
            "temperature": args.temp,
            "lossless": group.lossless,
            "tokens_per_second": spread([m["tokens_per_second"] for m in mine]),
            # Each repeat against the baselines of the same repeat: the same prompts, minutes apart at most.
            **{f"speedup_vs_{name}": spread([m["tokens_per_second"] / b["tokens_per_second"]
                                             for m, b in zip(mine, of)]) for name, of in base.items()},
            "tokens_per_cycle": statistics.median(m["tokens_per_cycle"] for m in mine),
            "fast_path_ratio": statistics.median(m["fast_path_ratio"] for m in mine),
            "host_overhead_share": statistics.median(m["host_overhead_share"] for m in mine),
            "cycle_ms": statistics.median(m["cycle_ms"] for m in mine),
            "phase_shares": {p: statistics.median(m["phase_shares"][p] for m in mine) for p in PHASES},
            "peak_memory_mb": max(m["peak_memory_mb"] for m in mine),
            "blas": blas_name(),
        })
    return rows


def drafter_of(variant: Variant, setup: Setup, args: argparse.Namespace) -> str | None:
    """What drafted a row's tokens: None for plain decoding (mlx-lm, ar)."""
    if variant.method == PEER:
        return args.peer_draft
    return variant.draft or setup.draft if variant.method in DRAFTED else None


def pooled(results: list[dict]) -> dict[str, Any]:
    """One repeat over a set's prompts: totals, so long generations weigh as much as they cost."""
    decode = sum(r["decode_seconds"] for r in results)
    tokens = sum(len(r["generated_token_ids"]) - 1 for r in results)
    cycles = sum(r["cycles"] for r in results)
    phases = {p: sum(r["phase_timings"][p] for r in results) for p in PHASES}
    return {
        "tokens_per_second": tokens / decode if decode else 0.0,
        "tokens_per_cycle": sum(r["avg_acceptance"] * r["cycles"] for r in results) / cycles if cycles else 0.0,
        "fast_path_ratio": sum(r["fast_path_ratio"] * r["cycles"] for r in results) / cycles if cycles else 1.0,
        "host_overhead_share": sum(r["host_overhead_share"] * r["decode_seconds"] for r in results) / decode,
        "phase_shares": {p: s / decode for p, s in phases.items()},
        "cycle_ms": 1000 * decode / cycles if cycles else 0.0,
        "peak_memory_mb": max(r["peak_memory_bytes"] for r in results) / 2**20,
    }


def tree_sizes(results: Iterable[dict]) -> dict[int, int]:
    """Cycles per number of draft nodes verified (0: a plain step), over all of a row's runs."""
    total: dict[int, int] = {}
    for result in results:
        for size, count in result.get("tree_sizes", {}).items():
            total[size] = total.get(size, 0) + count
    return dict(sorted(total.items()))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
