"""The generation API: `stream_generate` checks its arguments and configuration before any model work, sets up a
Session (session.py) and yields the tokens its cycles commit; `generate_ddtree_once` runs it to the end."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator, Mapping, Sequence

import mlx.core as mx
import numpy as np

from ..config import DDTreeConfig, is_int
from ..drafting.protocol import Drafter, as_drafter
from ..kernels import dispatch
from ..loading.load import stop_token_ids as stop_token_ids_of
from ..models.adapter import TargetAdapter
from ..models.kv_quantization import DEFAULT_QUANTIZED_KV_START, KVQuantization
from ..models.registry import adapter_for
from . import calibration
from .logprobs import check_logprobs
from .prompt_cache import PromptCache
from .ranks import watched
from .sampling import SamplingParams, TokenChooser
from .session import DecodeStep, GenerationStats, Session
from .sizing import TreeSizer

METHODS = ("ddtree", "dflash", "ar")


def _validate(target: TargetAdapter, prompt_tokens: Any, max_new_tokens: int, method: str) -> list[int]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    tokens = np.asarray(prompt_tokens.tolist() if isinstance(prompt_tokens, mx.array) else prompt_tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1:
        raise ValueError(f"prompt_tokens must be one sequence of token ids (batch size 1), got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError("prompt_tokens is empty; pass at least one token id (e.g. the BOS token)")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integer token ids, got dtype {tokens.dtype}")
    bad = tokens[(tokens < 0) | (tokens >= target.vocab_size)]
    if bad.size:
        raise ValueError(
            f"prompt token ids {bad[:5].tolist()} are outside the target vocabulary [0, {target.vocab_size}); "
            "encode the prompt with the target's own tokenizer"
        )
    return tokens.tolist()


def _stop_ids(tokenizer: Any, stop_token_ids: Sequence[int] | None, vocab_size: int | None = None) -> set[int]:
    if stop_token_ids is None:
        return set(stop_token_ids_of(tokenizer))
    if isinstance(stop_token_ids, (str, bytes, Mapping)) or not isinstance(stop_token_ids, Iterable):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
    ids = list(stop_token_ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0
           or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"stop_token_ids {bad[:5]!r} are not token ids of this model (integers in [0, {vocab_size}))")
    return {int(t) for t in ids}


def stream_generate(
    *,
    target_model: Any,
    draft_model: Any = None,
    tokenizer: Any = None,
    prompt_tokens: Any,
    max_new_tokens: int = 2048,
    tree_budget: int | str | None = None,
    stop_token_ids: Sequence[int] | None = None,
    method: str = "ddtree",
    config: DDTreeConfig | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    prompt_cache: PromptCache | None = None,
    prompt_checkpoints: Sequence[int] = (),
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    logprobs: int | None = None,
) -> Iterator[DecodeStep]:
    """Return an iterator that yields tokens as they are committed. `method` is "ddtree", "dflash" (single path)
    or "ar" (no drafter). temperature 0 is greedy; otherwise tokens are drawn (seeded by `seed`) from the
    target's distribution after top-p and top-k, exactly as plain sampling would. Arguments and configuration
    are checked now, before any model work: explicit arguments win over `config`, then DDTREE_* env vars.
    `prompt_cache` (a PromptCache, shared across calls) skips prefilling what an earlier call already did;
    `prompt_checkpoints` are prompt lengths it should also keep (e.g. where a chat's earlier messages end): a
    hybrid target's recurrent state cannot be rewound, so a later prompt sharing only that much hits there.
    `kv_bits`, `kv_group_size`, `quantized_kv_start`: a quantized KV cache, as mlx-lm's generate_step means them.
    `logprobs` k in 0..20: each step also carries, per token, its exact log-probability under the target (the
    log-softmax of the target's logits given the true prefix, before temperature, top-p and top-k, as mlx-lm's
    generate_step gives them) and the k most likely tokens with theirs; None (the default) computes nothing."""
    config = resolve_config(config, tree_budget)
    sampling = SamplingParams(temperature, top_p, top_k, seed)
    logprobs = check_logprobs(logprobs)
    target = adapter_for(target_model)
    drafter = as_drafter(draft_model) if draft_model is not None and method != "ar" else None
    generation = open_generation(target, drafter, tokenizer,
                                 prompt_tokens, max_new_tokens, config, method,
                                 stop_token_ids=stop_token_ids, sampling=sampling,
                                 prompt_cache=prompt_cache, prompt_checkpoints=prompt_checkpoints,
                                 kv=KVQuantization(kv_bits, kv_group_size, quantized_kv_start), logprobs=logprobs)
    return generation.run()


def resolve_config(config: DDTreeConfig | None, tree_budget: int | str | None) -> DDTreeConfig:
    """The run's configuration: explicit arguments win over `config`, then DDTREE_* env vars (at an entry point)."""
    if config is not None and not isinstance(config, DDTreeConfig):
        raise ValueError(f"config must be a DDTreeConfig (ddtree_mlx.DDTreeConfig(tree_budget=...)), got {type(config).__name__}")
    explicit = {"tree_budget": tree_budget} if tree_budget is not None else {}  # an int or "auto"
    return config.replace(**explicit) if config is not None else DDTreeConfig.from_env(**explicit)


@dataclass
class Generation:
    """A checked request with its session, ready to prefill: what stream_generate runs, and a batch's row."""

    session: Session
    prompt: list[int]
    max_new_tokens: int
    stops: set[int]
    checkpoints: Sequence[int]
    produced: int = 0  # tokens handed out so far

    def run(self) -> Iterator[DecodeStep]:
        # Sharded, a rank whose peer died would wait forever inside a collective: the watchdog bounds every step's
        # wait (not the caller's time between steps).
        session = self.session
        watch = partial(watched, session.target.group, session.config.rank_timeout)
        with watch():
            new = [session.prefill(self.prompt, self.checkpoints)]
        while True:
            step = self.step(new)
            yield step
            if step.finish_reason:
                return
            session.more_steps = self.remaining > 1
            with watch():
                new = session.cycle()

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.produced

    def step(self, new: list[int]) -> DecodeStep:
        """What the caller gets of tokens a prefill or cycle committed: cut at the first stop token (kept) or at
        the length limit, which end the generation."""
        new, finish = _clip(new, self.remaining, self.stops)
        self.produced += len(new)
        self.session.stats.committed = self.produced - 1  # kept tokens from cycles: prefill gave the first
        if finish:
            self.session.remember()
        scored = self.session.scored and self.session.scored[: len(new)]  # None when log-probs are off
        return DecodeStep(new, self.session.stats, finish, scored)


def open_generation(target: TargetAdapter, drafter: Drafter | None, tokenizer: Any, prompt_tokens: Any,
                    max_new_tokens: int, config: DDTreeConfig, method: str, *, stop_token_ids: Sequence[int] | None,
                    sampling: SamplingParams, prompt_cache: PromptCache | None, prompt_checkpoints: Sequence[int],
                    kv: KVQuantization, logprobs: int | None) -> Generation:
    """Check a request before any model work (ValueError naming the fix) and set up its session. `drafter` is
    reset for this prompt: it must be this generation's own (a batch forks one per row)."""
    logprobs = check_logprobs(logprobs)
    kv.check(target.head_dim)
    prompt = _validate(target, prompt_tokens, max_new_tokens, method)
    stops = _stop_ids(tokenizer, stop_token_ids, target.vocab_size)
    room = target.context_length - len(prompt) if target.context_length else max_new_tokens
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens and the model's context is {target.context_length}; "
                         "shorten the prompt")
    if method != "ar":
        if drafter is None:
            raise ValueError(f"method {method!r} needs a draft_model; pass one, or use method='ar'")
        if hasattr(drafter, "configure"):
            drafter.configure(config)
        drafter.reset(target, prompt)
    else:
        drafter = None
    cache = target.make_cache()
    target.check_cache(cache)
    max_new_tokens = min(max_new_tokens, room)  # generation ends with the context: "length"
    dispatch.prepare(target.kernel_shapes(), config)  # before anything is timed: kernels checked and built
    sizer = tree_sizer_for(target, config, method, drafter, len(prompt), max_new_tokens)
    session = Session(target=target, drafter=drafter, config=config, method=method, cache=cache,
                      choose=TokenChooser(sampling), stats=GenerationStats(prompt_tokens=len(prompt), sizer=sizer),
                      prompt_cache=prompt_cache, kv=kv, logprobs=logprobs)
    return Generation(session, prompt, max_new_tokens, stops, prompt_checkpoints)


def tree_sizer_for(target: TargetAdapter, config: DDTreeConfig, method: str, drafter: Drafter | None,
                   context: int, max_new_tokens: int) -> TreeSizer | None:
    """DDTREE_TREE_BUDGET=auto: trees sized per cycle from this machine's verify costs (measured once per model) and
    what this kind of drafter's proposals have been worth to this target and what its drafts cost, learned over
    earlier generations too (a generation of a few dozen tokens is too short to learn it alone)."""
    if method != "ddtree" or config.tree_budget != "auto":
        return None
    with watched(target.group, config.rank_timeout):
        costs = calibration.verify_costs(target, config)
    # The costs stand for the target on this machine (one measured curve per model, dtype and device).
    kind = (costs, type(drafter).__name__, drafter.block_size, tuple(drafter.target_layer_ids))
    sizer = TreeSizer(costs, config.max_tree_budget, group=target.group, context=context)
    if kind in LEARNED:
        sizer.carry(LEARNED[kind], max_new_tokens)
    LEARNED[kind] = sizer
    return sizer


LEARNED: dict[tuple, TreeSizer] = {}  # per target and kind of drafter: the last generation's sizer


def _clip(tokens: list[int], room: int, stops: set[int]) -> tuple[list[int], str | None]:
    """Cut a cycle's tokens at the first stop token (kept) or at the length limit."""
    for i, token in enumerate(tokens[:room]):
        if token in stops:
            return tokens[: i + 1], "stop"
    if len(tokens) >= room:
        return tokens[:room], "length"
    return tokens, None


def generate_ddtree_once(*, tokenizer: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Generate to completion; see `stream_generate` for the arguments and `GenerationStats.summary` for the
    numbers returned beside `generated_token_ids`, `finish_reason`, (with a tokenizer) `text` and (with
    `logprobs`) `logprobs`, a TokenLogprob per generated token."""
    tokens: list[int] = []
    logprobs = [] if kwargs.get("logprobs") is not None else None
    for step in stream_generate(tokenizer=tokenizer, **kwargs):
        tokens.extend(step.tokens)
        if logprobs is not None:
            logprobs.extend(step.logprobs)
    result = {"generated_token_ids": tokens, "finish_reason": step.finish_reason, **step.stats.summary(len(tokens))}
    if logprobs is not None:
        result["logprobs"] = logprobs  # TokenLogprob per generated token
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        stops = _stop_ids(tokenizer, kwargs.get("stop_token_ids"))
        result["text"] = tokenizer.decode([t for t in tokens if t not in stops])
    return result
