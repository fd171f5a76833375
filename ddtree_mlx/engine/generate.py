"""The generation loop. Each cycle is five named steps:

    draft -> build tree -> verify -> walk -> commit

The root of every tree is the last committed token, which the target has not processed yet. Verify runs the
target once over the whole tree without touching the cache; walk follows the target's own tokens down the tree;
commit installs the accepted path's cache state from what verify captured, so the target never runs twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache

from ..config import DDTreeConfig, is_int
from ..drafting.protocol import Drafter, as_drafter
from ..loading.load import stop_token_ids as stop_token_ids_of
from ..models.adapter import TargetAdapter
from ..models.kv_quantization import DEFAULT_QUANTIZED_KV_START, KVQuantization
from ..models.registry import adapter_for
from ..models.verify import VerifyOutput, join_rows
from ..tree.build import Candidates, build_tree, chain_tree, top_candidates
from ..tree.draft_tree import DraftTree, Walk
from .prompt_cache import PromptCache
from .ranks import beat, watched
from .sampling import SamplingParams, TokenChooser
from .sizing import TreeSizer

METHODS = ("ddtree", "dflash", "ar")
PHASES = ("draft", "build", "verify", "walk", "commit")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    sync_seconds: float = 0.0  # decode time spent waiting for MLX to compute; the rest is host work
    overlap_seconds: float = 0.0  # host work done while the device had queued work (free: it waited for nothing)
    cycles: int = 0
    committed: int = 0  # tokens cycles produced and the caller kept (cut at a stop token or the length limit)
    fast_path_cycles: int = 0
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    verify_parts: dict[str, float] = field(default_factory=dict)  # with DDTREE_PROFILE_VERIFY
    method_cycles: dict[str, int] = field(default_factory=dict)  # cycles run as ddtree / dflash / ar
    kernels: set[str] = field(default_factory=set)  # what hybrid targets' tree conv and recurrence ran as
    reused_prompt_tokens: int = 0  # prompt tokens a prompt-cache hit saved from prefill
    tree_sizes: dict[int, int] = field(default_factory=dict)  # cycles per number of draft nodes verified
    sizer: TreeSizer | None = None  # DDTREE_TREE_BUDGET=auto: the costs the sizes were chosen from

    def summary(self, generated: int) -> dict[str, Any]:
        """Per-generation numbers. tokens_per_second counts decode only: tokens after the first (which prefill
        produces) over the time spent in cycles; prefill is reported separately."""
        decode = self.decode_seconds
        return {
            "tokens_per_second": (generated - 1) / decode if decode > 0 else 0.0,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": decode,
            # Host time the device waited for: decode time neither waiting on MLX nor overlapped with its work.
            "host_overhead_share": 1 - (self.sync_seconds + self.overlap_seconds) / decode if decode > 0 else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "cycles": self.cycles,
            "avg_acceptance": self.committed / self.cycles if self.cycles else 0.0,
            "fast_path_ratio": self.fast_path_cycles / self.cycles if self.cycles else 1.0,
            "phase_timings": dict(self.phase_seconds),
            "verify_profile": dict(self.verify_parts),
            "method_cycles": dict(self.method_cycles),
            "kernels": "+".join(sorted(self.kernels)) or "none",  # "metal", "twin", "metal+twin" or "none"
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "tree_sizes": dict(sorted(self.tree_sizes.items())),
            "calibration": self.sizer.report() if self.sizer else None,
        }

    def lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phase_seconds[phase] += now - since
        return now


@dataclass
class DecodeStep:
    """What the stream yields: newly committed tokens; `finish_reason` is set on the last step."""

    tokens: list[int]
    stats: GenerationStats
    finish_reason: str | None = None


@dataclass
class Session:
    """The state of one generation: target, caches, drafter and what the drafter has not seen yet."""

    target: TargetAdapter
    drafter: Drafter | None
    config: DDTreeConfig
    method: str
    cache: list[Any]
    choose: TokenChooser
    stats: GenerationStats
    kv: KVQuantization = KVQuantization()
    root: int = 0
    pending_tokens: list[int] = field(default_factory=list)
    pending_hidden: mx.array | None = None
    prompt_cache: PromptCache | None = None
    next_step: VerifyOutput | None = None  # plain decoding: the next step, issued before this one was read
    more_steps: bool = False  # whether another cycle will surely follow this one (set by the loop)
    handed_over: float = 0.0  # seconds this cycle waited handing the queued next step over: that step's time
    started: float | None = None  # when the verify's last part was handed to the device (Session.start)
    held: list[int] = field(default_factory=list)  # with a prompt cache: the tokens the cache holds,
    held_hidden: list[mx.array] = field(default_factory=list)  # and their captured hidden states

    @property
    def sizer(self) -> TreeSizer | None:
        """DDTREE_TREE_BUDGET=auto: tree size (and whether to draft) per cycle; the stats report what it used."""
        return self.stats.sizer

    @property
    def capture_layers(self) -> list[int]:
        return list(self.drafter.target_layer_ids) if self.drafter is not None else []

    def sync(self, *arrays: Any) -> None:
        """Evaluate now; MLX is lazy, so this is where the device work of a step is paid and measured."""
        start = time.perf_counter()
        mx.eval(*arrays)
        self.stats.sync_seconds += time.perf_counter() - start

    # --- the five steps -------------------------------------------------------------------------------------

    def draft(self, method: str) -> Candidates | None:
        """The drafter's top candidates per depth for the block after the root (None for plain decoding)."""
        if method == "ar":
            return None
        width = 1 if method == "dflash" else self.config.tree_cap
        context = self.root, self.pending_tokens, self.pending_hidden
        self.pending_tokens, self.pending_hidden = [], None  # the drafter will have seen them
        if hasattr(self.drafter, "candidates"):  # it picks its own top tokens (sparse, or a part of the vocabulary)
            candidates = self.drafter.candidates(*context, width)
        else:
            candidates = top_candidates(self.drafter.draft(*context), width)
        if isinstance(candidates.tokens, mx.array):
            self.sync(candidates.tokens, candidates.log_probs)
        return candidates.to_numpy()

    def build_tree(self, candidates: Candidates | None, method: str, context: int) -> DraftTree:
        """The tree to verify after the `context` tokens in the cache."""
        room = self.kv.depth_room(self.cache, context) if self.kv.bits else None
        if candidates is None or room == 0:
            return DraftTree.root_only(self.root)
        if room is not None:
            candidates = candidates.first(room)
        if method == "dflash":
            return chain_tree(candidates, self.root)
        if self.sizer is None:
            return build_tree(candidates, self.root, self.config.tree_budget)
        return self.sizer.choose(candidates, self.root, context)

    def verify(self, tree: DraftTree, context: int) -> tuple[VerifyOutput, mx.array]:
        """The target over the tree, and its own token at every node: still lazy, with the device started on
        them, so the walk and the commit are built while it computes (the commit reads them)."""
        out, self.next_step = self.next_step, None
        if out is None:
            rows = int(self.sizer.costs.rows(len(tree), context)) if self.sizer is not None else len(tree)
            out = self.target.verify(tree.padded(rows), self.cache, self.capture_layers, self.config)
            if out.started is not None:  # the rest of the graph was built while the device ran its first layers
                self.stats.overlap_seconds += time.perf_counter() - out.started
                self.stats.sync_seconds += out.waited
        padded = out.logits.shape[0] > len(tree)
        tokens = self.choose(out.logits[: len(tree)] if padded else out.logits)  # nothing is drawn for padding
        self.queue_next_step(out, tokens)
        if not out.committed:
            self.start(tokens)
        for part, seconds in out.profile.items():
            self.stats.verify_parts[part] = self.stats.verify_parts.get(part, 0.0) + seconds
        self.stats.kernels |= out.kernels
        return out, tokens

    def start(self, tokens: mx.array) -> None:
        """Hand the rest of the verify to the device. MLX returns once only a few dozen operations are left in
        flight (the device's time); the walk and commit graphs are then built while it finishes (overlapped)."""
        start = time.perf_counter()
        mx.async_eval(tokens)
        self.started = time.perf_counter()
        self.stats.sync_seconds += self.started - start

    def queue_next_step(self, out: VerifyOutput, tokens: mx.array) -> None:
        """Plain decoding, as mlx-lm: queue this step, then build the next one on its still-lazy token while the
        device works (the next root is this token whatever it is). Not with a quantized KV cache (it may convert
        after this step)."""
        plain_next = self.method == "ar" or (self.sizer is not None and not self.sizer.will_draft())
        if not (out.committed and plain_next and self.more_steps) or self.kv.bits is not None:
            return
        mx.async_eval(tokens)
        start = time.perf_counter()
        self.next_step = self.target.step(tokens, self.cache, self.capture_layers, self.config)
        mx.async_eval(self.next_step.logits)  # returns once little of that step is left to run (see EarlyStart)
        self.handed_over = time.perf_counter() - start
        self.stats.overlap_seconds += self.handed_over

    @staticmethod
    def walk(tree: DraftTree, target_tokens: mx.array) -> Walk:
        """The longest root path whose every draft token is the target's own choice (or draw) at its parent,
        followed on the device (tree.Walk)."""
        return Walk.of(tree, target_tokens)

    def commit(self, tree: DraftTree, out: VerifyOutput, walk: Walk, target_tokens: mx.array) -> tuple[list[int], int]:
        """Install the accepted path's cache state from what verify captured, built on the device's walk before it
        is read; then read the path and the target's token after it (the bonus) and return both."""
        if self.config.exact_commit and not out.committed:
            path, bonus = self.read(walk, target_tokens)
            _, hidden = self.target.forward(mx.array([tree.tokens[node] for node in path]), self.cache,
                                            self.capture_layers)
            self.sync(hidden, [entry.state for entry in self.cache])
        elif out.committed:  # a step wrote the cache itself: the next one will wait for it, as in mlx-lm
            (path, bonus), hidden = self.read(walk, target_tokens), out.hidden
        else:
            for capture, entry in zip(out.captures, self.cache):
                capture.commit(entry, walk.nodes)
            hidden = None if out.hidden is None else out.hidden[walk.nodes]
            path, bonus = self.read(walk, target_tokens, hidden, [entry.state for entry in self.cache])  # skips None
            self.target.trim_attention(self.cache, len(walk.nodes) - len(path))  # the padding's keys and values
            hidden = None if hidden is None else hidden[: len(path)]
        accepted = [tree.tokens[node] for node in path]
        if self.drafter is not None:  # what the drafter has not seen yet (plain steps in between included)
            self.pending_tokens = self.pending_tokens + accepted
            self.pending_hidden = join_rows(self.pending_hidden, hidden)
        self.root = bonus
        self.kv.convert(self.cache)
        self.hold(accepted, hidden)
        return path, bonus

    def read(self, walk: Walk, target_tokens: mx.array, *more: Any) -> tuple[list[int], int]:
        """Wait for the verify (and `more`) on the device; the path and the bonus token. The wait is the verify's
        time."""
        if self.started is not None:
            self.stats.overlap_seconds += time.perf_counter() - self.started
            self.started = None
        start = time.perf_counter()
        mx.eval(walk.nodes, walk.length, target_tokens, *more)
        waited = time.perf_counter() - start
        self.stats.sync_seconds += waited
        self.stats.phase_seconds["verify"] += waited
        self.stats.phase_seconds["commit"] -= waited  # this cycle's commit lap counts it too
        path = walk.path()
        return path, int(np.array(target_tokens)[path[-1]])  # no new op: it would queue behind a queued step

    # --- the cycle ------------------------------------------------------------------------------------------

    def cycle(self) -> list[int]:
        stats = self.stats
        method = self.next_method()
        prepaid, self.handed_over = self.handed_over, 0.0  # the last cycle waited that long for this one's step
        start, context = time.perf_counter(), self.target.prefix_length(self.cache)
        candidates = self.draft(method)
        mark = stats.lap("draft", start)
        tree = self.build_tree(candidates, method, context)
        built = stats.lap("build", mark)
        out, target_tokens = self.verify(tree, context)
        verified = stats.lap("verify", built)
        walk = self.walk(tree, target_tokens)
        mark = stats.lap("walk", verified)
        path, bonus = self.commit(tree, out, walk, target_tokens)
        new = [tree.tokens[node] for node in path[1:]] + [bonus]
        if self.sizer is not None:
            self.sizer.produced(new)  # what earlier peeks would have accepted
            if candidates is None and self.next_step is not None and self.sizer.can_peek():
                self.peek(context + len(path))
        seconds = stats.lap("commit", mark) - start
        if self.sizer is not None:  # each cycle's own time: a drafted cycle that queued a step did not take it
            own = seconds + prepaid - self.handed_over
            self.sizer.record(candidates, tree, len(new), own, built - start, context)
        stats.decode_seconds += seconds
        stats.tree_sizes[len(tree) - 1] = stats.tree_sizes.get(len(tree) - 1, 0) + 1
        stats.cycles += 1
        stats.method_cycles[method] = stats.method_cycles.get(method, 0) + 1
        stats.fast_path_cycles += all(tree.ranks[node] == 0 for node in path)
        return new

    def peek(self, context: int) -> None:
        """A plain step is queued and the drafter costs almost nothing: draft anyway, on the host while the device
        runs the step, so the sizer learns at once whether drafting pays again (TreeSizer.peeked)."""
        start = time.perf_counter()
        self.sizer.choose(self.draft(self.method), self.root, context)
        seconds = time.perf_counter() - start
        self.sizer.peeked(seconds)  # a drafter that waited for the device is not cheap: no more peeks
        self.stats.overlap_seconds += seconds

    def next_method(self) -> str:
        method = self.sizer.pick(self.method) if self.sizer else self.method
        return "ar" if self.next_step is not None else method  # a queued plain step runs whatever the pick

    def prefill(self, prompt: list[int], checkpoints: Sequence[int] = ()) -> int:
        """mlx-lm's prefill (see TargetAdapter.prefill), starting after the longest prefix the prompt cache has,
        which then keeps the prompt's body (and, where a recurrent state cannot be rewound, `checkpoints`)."""
        start = time.perf_counter()
        done, reused = self.reuse(prompt)
        marks = [len(prompt) - 1] + ([] if can_trim_prompt_cache(self.cache) else list(checkpoints))
        logits, hidden = self.target.prefill(prompt[done:], self.cache, self.capture_layers, self.config.prefill_step_size,
                                             after_chunk=self.after_chunk, snapshots=[n - done for n in marks],
                                             snapshot=self.snapshot(prompt, done, reused))
        first = self.choose(logits)
        hidden = join_rows(reused, hidden)
        mx.eval(first, hidden, [entry.state for entry in self.cache])
        self.pending_tokens, self.pending_hidden, self.root = list(prompt), hidden, int(first[0])
        self.hold(prompt, hidden)
        self.stats.prefill_seconds = time.perf_counter() - start
        return self.root

    def after_chunk(self, cache: list[Any]) -> None:
        self.kv.convert(cache)  # mlx-lm quantizes its KV cache after each model call
        beat()  # a long prompt's chunks are progress, for the distributed watchdog

    # --- the prompt cache (serving) ---------------------------------------------------------------------------

    def snapshot(self, prompt: list[int], done: int, reused: mx.array | None) -> Callable | None:
        """What keeps the cache once `n` more prompt tokens (after the `done` reused ones) are in it."""
        if self.prompt_cache is None:
            return None
        return lambda n, hidden: self.prompt_cache.store(prompt[: done + n], self.cache, self.variant,
                                                         join_rows(reused, hidden))

    def reuse(self, prompt: list[int]) -> tuple[int, mx.array | None]:
        """Prompt tokens already in the cache from the prompt cache, and their captured hidden states."""
        hit = self.prompt_cache.lookup(prompt, self.variant) if self.prompt_cache is not None else None
        if hit is None:
            return 0, None
        self.cache = hit.cache
        self.stats.reused_prompt_tokens = hit.length
        return hit.length, hit.hidden

    @property
    def variant(self) -> tuple:
        """What a prompt-cache entry must share with this session besides tokens."""
        return tuple(self.capture_layers), self.kv

    def hold(self, tokens: list[int], hidden: mx.array | None) -> None:
        if self.prompt_cache is not None:
            self.held += tokens
            self.held_hidden += [hidden] if hidden is not None else []

    def remember(self) -> None:
        """At the end of a generation: the conversation so far, for its next turn."""
        if self.prompt_cache is not None:
            if self.next_step is not None:  # a stop token came while the step after it was queued: it is cached
                self.hold([self.root], self.next_step.hidden)
            hidden = mx.concatenate(self.held_hidden) if self.held_hidden else None
            self.prompt_cache.store(self.held, self.cache, self.variant, hidden)


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
) -> Iterator[DecodeStep]:
    """Return an iterator that yields tokens as they are committed. `method` is "ddtree", "dflash" (single path)
    or "ar" (no drafter). temperature 0 is greedy; otherwise tokens are drawn (seeded by `seed`) from the
    target's distribution after top-p and top-k, exactly as plain sampling would. Arguments and configuration
    are checked now, before any model work: explicit arguments win over `config`, then DDTREE_* env vars.
    `prompt_cache` (a PromptCache, shared across calls) skips prefilling what an earlier call already did;
    `prompt_checkpoints` are prompt lengths it should also keep (e.g. where a chat's earlier messages end): a
    hybrid target's recurrent state cannot be rewound, so a later prompt sharing only that much hits there.
    `kv_bits`, `kv_group_size`, `quantized_kv_start`: a quantized KV cache, as mlx-lm's generate_step means them."""
    if config is not None and not isinstance(config, DDTreeConfig):
        raise ValueError(f"config must be a DDTreeConfig (ddtree_mlx.DDTreeConfig(tree_budget=...)), got {type(config).__name__}")
    explicit = {"tree_budget": tree_budget} if tree_budget is not None else {}  # an int or "auto"
    config = config.replace(**explicit) if config is not None else DDTreeConfig.from_env(**explicit)
    sampling = SamplingParams(temperature, top_p, top_k, seed)
    target = adapter_for(target_model)
    kv = KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
    kv.check(target.head_dim)
    prompt = _validate(target, prompt_tokens, max_new_tokens, method)
    stops = _stop_ids(tokenizer, stop_token_ids, target.vocab_size)
    room = target.context_length - len(prompt) if target.context_length else max_new_tokens
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt)} tokens and the model's context is {target.context_length}; "
                         "shorten the prompt")
    drafter = None
    if method != "ar":
        if draft_model is None:
            raise ValueError(f"method {method!r} needs a draft_model; pass one, or use method='ar'")
        drafter = as_drafter(draft_model)
        if hasattr(drafter, "configure"):
            drafter.configure(config)
        drafter.reset(target, prompt)
    cache = target.make_cache()
    target.check_cache(cache)
    max_new_tokens = min(max_new_tokens, room)  # generation ends with the context: "length"
    sizer = tree_sizer_for(target, config, method, drafter, len(prompt), max_new_tokens)
    session = Session(target=target, drafter=drafter, config=config, method=method, cache=cache,
                      choose=TokenChooser(sampling), stats=GenerationStats(prompt_tokens=len(prompt), sizer=sizer),
                      prompt_cache=prompt_cache, kv=kv)
    return _run(session, prompt, max_new_tokens, stops, prompt_checkpoints)


def tree_sizer_for(target: TargetAdapter, config: DDTreeConfig, method: str, drafter: Drafter | None,
                   context: int, max_new_tokens: int) -> TreeSizer | None:
    """DDTREE_TREE_BUDGET=auto: trees sized per cycle from this machine's verify costs (measured once per model) and
    what this kind of drafter's proposals have been worth to this target and what its drafts cost, learned over
    earlier generations too (a generation of a few dozen tokens is too short to learn it alone)."""
    if method != "ddtree" or config.tree_budget != "auto":
        return None
    from .calibration import verify_costs

    with watched(target.group, config.rank_timeout):
        costs = verify_costs(target, config)
    # The costs stand for the target on this machine (one measured curve per model, dtype and device).
    kind = (costs, type(drafter).__name__, drafter.block_size, tuple(drafter.target_layer_ids))
    sizer = TreeSizer(costs, config.max_tree_budget, group=target.group, context=context)
    if kind in LEARNED:
        sizer.carry(LEARNED[kind], max_new_tokens)
    LEARNED[kind] = sizer
    return sizer


LEARNED: dict[tuple, TreeSizer] = {}  # per target and kind of drafter: the last generation's sizer


def _run(session: Session, prompt: list[int], max_new_tokens: int, stops: set[int],
         checkpoints: Sequence[int]) -> Iterator[DecodeStep]:
    # Sharded, a rank whose peer died would wait forever inside a collective: the watchdog bounds every step's
    # wait (not the caller's time between steps).
    watch = partial(watched, session.target.group, session.config.rank_timeout)
    with watch():
        new = [session.prefill(prompt, checkpoints)]
    produced = 0
    while True:
        new, finish = _clip(new, max_new_tokens - produced, stops)
        produced += len(new)
        session.stats.committed = produced - 1  # kept tokens from cycles: prefill gave the first
        if finish:
            session.remember()
        yield DecodeStep(new, session.stats, finish)
        if finish:
            return
        session.more_steps = max_new_tokens - produced > 1
        with watch():
            new = session.cycle()


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
    numbers returned beside `generated_token_ids`, `finish_reason` and (with a tokenizer) `text`."""
    tokens: list[int] = []
    for step in stream_generate(tokenizer=tokenizer, **kwargs):
        tokens.extend(step.tokens)
    result = {"generated_token_ids": tokens, "finish_reason": step.finish_reason, **step.stats.summary(len(tokens))}
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        stops = _stop_ids(tokenizer, kwargs.get("stop_token_ids"))
        result["text"] = tokenizer.decode([t for t in tokens if t not in stops])
    return result
