"""What a benchmark runs on: each preset's target, its drafter and its prompts as token ids (Setup), and the
variants compared on them (Variant)."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from ddtree_mlx import DDTreeConfig
from ddtree_mlx.drafting.oracle import ScriptedDrafter
from ddtree_mlx.loading.load import encode_prompt, load, load_drafter, stop_token_ids

from .prefills import Prefills
from .prompts import load_prompts, with_context

MAC_MODEL = "mlx-community/Qwen3.5-27B-4bit"
SELF = "self"  # --draft-model self: the target drafts for itself
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


@dataclass
class Setup:
    """A target, a way to make its drafter for a prompt, the prompts per set (token ids), and the run's one
    configuration."""

    name: str
    target: Any
    make_drafter: Callable[[list[int], list[int], str | None], Any]  # (prompt, mlx-lm's output, draft name)
    prompts: dict[str, list[list[int]]]
    stop_token_ids: list[int]
    config: DDTreeConfig
    draft: str | None = None  # what drafts, as the rows name it: a --draft-model value, "self" or the oracle
    drafts: tuple[str | None, ...] = (None,)  # several --draft-model names: each, run side by side
    peer_draft: Any = None  # a small mlx-lm model for the mlx-lm speculative decoding peer
    prefills: Prefills | None = None  # --context: long prompts prefilled once, reused by every method


@dataclass(frozen=True)
class Variant:
    method: str
    tree_budget: int | str | None = None  # ddtree: a fixed number of draft nodes per cycle, or "auto"
    draft: str | None = None  # with several --draft-model names: which drafter (None: the only one)
    logprobs: int | None = None  # --logprobs K: the same run with the committed tokens' log-probs (top K) on

    @property
    def tree(self) -> bool:
        return self.method == "ddtree"

    @property
    def label(self) -> str:
        label = f"{self.method}@{self.tree_budget}" if self.tree else self.method
        label = f"{label}+logprobs{self.logprobs}" if self.logprobs is not None else label
        return f"{label} {self.draft}" if self.draft else label


MLX_LM = Variant("mlx-lm")  # what users run instead: the reference for tokens and for speedups
AR = Variant("ar")  # our own plain decoding, through the same loop as DDTree
PEER = "mlx-lm-spec"  # mlx-lm's own speculative decoding, with --peer-draft
DRAFTED = ("dflash", "ddtree")  # our methods that use the preset's drafter
METHODS = ("ar", *DRAFTED, PEER)


def variants(methods: list[str], tree_budgets: list[int | str], drafts: Sequence[str | None] = (None,),
             logprobs: int | None = None) -> list[Variant]:
    """Both baselines first (mlx-lm's tokens are the reference), then each method, per drafter and tree budget;
    with `logprobs`, each of our methods again with log-probs on, beside the same run without."""
    plan = [MLX_LM, AR]
    for method in methods:
        for draft in drafts if method in DRAFTED else [None]:
            plan += [Variant(method, budget, draft) for budget in (tree_budgets if method == "ddtree" else [None])]
    if logprobs is not None:
        plan += [replace(v, logprobs=logprobs) for v in plan if v.method in ("ar", *DRAFTED)]
    return list(dict.fromkeys(plan))  # ar asked for again runs once


def make_setup(args: argparse.Namespace, config: DDTreeConfig) -> Setup:
    if args.preset == "synthetic":
        setup = synthetic_setup(args, config)
    else:
        setup = real_setup(args, config, args.model or (MAC_MODEL if args.preset == "mac" else None))
    if args.peer_draft:
        import mlx_lm

        setup.peer_draft = setup.target if args.peer_draft == SELF else mlx_lm.load(args.peer_draft)[0]
    if args.context and args.measure == "generation":
        setup.prefills = Prefills()
    return setup


def real_setup(args: argparse.Namespace, config: DDTreeConfig, model: str | None) -> Setup:
    """A model (None: the embedded SmolLM2) with the drafters named by --draft-model (several, comma-separated:
    each drafted variant runs with each, side by side)."""
    names = args.draft_model.split(",") if args.draft_model else [None]
    # Drafters first, so a wrong name fails before a large target loads; load's own is prompt lookup (loads nothing).
    drafters = {name: load_drafter(model, name) for name in names if name != SELF}
    target, tokenizer, _ = load(model, "prompt-lookup", config=config)
    if SELF in names:
        drafters[SELF] = SelfDrafter(target)
    texts = load_prompts(args.sets, args.limit, args.seed, args.prompts)
    if args.context:
        texts = with_context(texts, tokenizer, args.context)
    prompts = {s: [encode_prompt(tokenizer, t, not args.no_chat_template) for t in rows] for s, rows in texts.items()}
    return Setup(args.preset, target, lambda prompt, truth, draft: drafters[draft or names[0]], prompts,
                 stop_token_ids(tokenizer), config, draft=args.draft_model or "default",
                 drafts=tuple(names) if len(names) > 1 else (None,))


def synthetic_setup(args: argparse.Namespace, config: DDTreeConfig) -> Setup:
    """A random Qwen 3.5 hybrid (float32) with an oracle drafter of controlled accuracy: engine costs only."""
    from mlx_lm.models import qwen3_5

    shape = dict(SYNTHETIC_SIZES[args.synthetic_size], model_type="qwen3_5", rms_norm_eps=1e-6,
                 max_position_embeddings=8192, linear_conv_kernel_dim=4, full_attention_interval=4,
                 tie_word_embeddings=False,
                 rope_parameters={"type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    mx.random.seed(args.seed)
    target = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(shape))
    mx.eval(target.parameters())
    rng = random.Random(args.seed)
    length = 128 + (args.context or 0)
    prompts = {"synthetic": [[rng.randrange(shape["vocab_size"]) for _ in range(length)] for _ in range(args.limit)]}
    miss = 1 - args.accuracy
    weights = (args.accuracy, miss / 2, miss / 4, miss / 4)  # ranked first, second, third, absent
    return Setup("synthetic", target,
                 lambda prompt, truth, draft: ScriptedDrafter(prompt + truth, 16, weights, args.seed), prompts, [],
                 config, draft=f"oracle (accuracy {args.accuracy:g})")


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
