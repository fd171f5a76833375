"""One generation's state and its cycle, five named steps:

    draft -> build tree -> verify -> walk -> commit

The root of every tree is the last committed token, which the target has not processed yet. Verify runs the
target once over the whole tree without touching the cache; walk follows the target's own tokens down the tree;
commit installs the accepted path's cache state from what verify captured, so the target never runs twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache

from ..config import DDTreeConfig
from ..drafting.protocol import Drafter, DraftRequest, propose
from ..models.adapter import TargetAdapter, to_end
from ..models.kv_quantization import KVQuantization
from ..models.verify import VerifyOutput, join_rows
from ..tree.build import Candidates, build_tree, chain_tree
from ..tree.draft_tree import DraftTree, Walk
from .logprobs import Scores, TokenLogprob
from .prompt_cache import PromptCache
from .ranks import beat
from .sampling import TokenChooser
from .sizing import TreeSizer

PHASES = ("draft", "build", "verify", "walk", "commit")
ROOT = mx.array([0], mx.int32)  # the path a lone root commits


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
    logprobs: list[TokenLogprob] | None = None  # with stream_generate(logprobs=k): one per token, aligned


@dataclass
class Drafted:
    """A cycle's tree before its verify, and when its steps ended."""

    method: str
    candidates: Candidates | None
    tree: DraftTree
    context: int  # tokens in the cache before the root
    start: float
    built: float
    prepaid: float = 0.0  # what the last cycle waited for this cycle's queued step
    batched: bool = False  # verified in a batch's forest: the sizer did not time it alone


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
    behind: bool = True  # the drafter has more than a cycle's tokens to read: the prompt's, or plain steps' since
    # it last drafted (reading them makes a draft dearer: a batch's sizer prices such drafts apart)
    prompt_cache: PromptCache | None = None
    next_step: VerifyOutput | None = None  # plain decoding: the next step, issued before this one was read
    more_steps: bool = False  # whether another cycle will surely follow this one (set by the loop)
    handed_over: float = 0.0  # seconds this cycle waited handing the queued next step over: that step's time
    started: float | None = None  # when the verify's last part was handed to the device (Session.start)
    held: list[int] = field(default_factory=list)  # with a prompt cache: the tokens the cache holds,
    held_hidden: list[mx.array] = field(default_factory=list)  # and their captured hidden states
    logprobs: int | None = None  # None: off (nothing computed); k: log-probs of committed tokens and their top k
    scored: list[TokenLogprob] | None = None  # those of the tokens the last prefill or cycle committed
    scores: Scores | None = None  # this cycle's, lazy (a plain step's issued before the step after it is queued)

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
        request = self.draft_request(method)
        return None if request is None else self.drafted(propose(self.drafter, request))

    def draft_request(self, method: str, depth: int | None = None) -> DraftRequest | None:
        """What the drafter reads this cycle (None for plain decoding), at most `depth` positions deep; from here it
        has seen it."""
        if method == "ar":
            return None
        width = 1 if method == "dflash" else self.config.tree_cap
        # A tree of n draft nodes is at most n deep: positions past the cap would be drafted for nothing.
        reach = self.drafter.block_size - 1 if method == "dflash" else min(self.drafter.block_size - 1, width)
        depth = reach if depth is None else min(reach, depth)
        request = DraftRequest((self.root, self.pending_tokens, self.pending_hidden), width, depth)
        self.pending_tokens, self.pending_hidden = [], None
        return request

    @property
    def caught_up(self) -> bool:
        """Whether a cycle of this generation drafted already: its first draft reads the whole prompt."""
        return any(method != "ar" for method in self.stats.method_cycles)

    def drafted(self, candidates: Candidates) -> Candidates:
        """Candidates on the host: evaluated first where the drafter left them lazy (the draft's device time)."""
        if isinstance(candidates.tokens, mx.array):
            self.sync(candidates.tokens, candidates.log_probs)
        return candidates.to_numpy()

    def build_tree(self, candidates: Candidates | None, method: str, context: int, sized: bool = True) -> DraftTree:
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
        if not sized:  # a batch sizes its rows' trees together, from each one's whole tree
            return self.sizer.follow(candidates, self.root)
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
        return out, self.verified(tree, out)

    def verified(self, tree: DraftTree, out: VerifyOutput) -> mx.array:
        """The target's own token at every node of `tree` from its verify `out` (this session's alone, or its row
        of a batch's), the next plain step queued where one surely follows."""
        padded = out.logits.shape[0] > len(tree)
        now = len(tree) > 1  # a tree's tokens are read next (walk); a plain step's may be queued on: lazy
        start = time.perf_counter()
        tokens = self.choose(out.logits[: len(tree)] if padded else out.logits, now)  # nothing drawn for padding
        if now:  # what choosing waited for is the verify's time
            self.stats.sync_seconds += time.perf_counter() - start
        if out.committed:
            self.step_scored(out, tokens)
        self.queue_next_step(out, tokens)
        if not out.committed:
            self.start(tokens)
        for part, seconds in out.profile.items():
            self.stats.verify_parts[part] = self.stats.verify_parts.get(part, 0.0) + seconds
        self.stats.kernels |= out.kernels
        return tokens

    def commit_root(self, out: VerifyOutput) -> None:
        """Commit a plain verify's lone root (always accepted) before its output is read: a batch queues its rows'
        next steps on their roots."""
        for capture, entry in zip(out.captures, self.cache):
            capture.commit(entry, ROOT)
        out.committed = True

    def step_scored(self, out: VerifyOutput, tokens: mx.array) -> None:
        """A plain step's log-probs (with log-probs on), from its one row: issued before any step is queued after
        it, as that step may convert the cache."""
        if self.logprobs is not None:
            self.scores = Scores(out.logits, tokens, self.logprobs)

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
        mx.async_eval(tokens, self.scores and self.scores.arrays)
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
        scoring = self.score(out, walk, target_tokens)  # arrays to read with the path; None with log-probs off
        if self.config.exact_commit and not out.committed:
            path, bonus = self.read(walk, target_tokens, scoring)
            _, hidden = self.target.forward(mx.array([tree.tokens[node] for node in path]), self.cache,
                                            self.capture_layers)
            self.sync(hidden, [entry.state for entry in self.cache])
        elif out.committed:  # a step wrote the cache itself: the next one will wait for it, as in mlx-lm
            (path, bonus), hidden = self.read(walk, target_tokens, scoring), out.hidden
        else:
            for capture, entry in zip(out.captures, self.cache):
                capture.commit(entry, walk.nodes)
            hidden = None if out.hidden is None else out.hidden[walk.nodes]
            states = [entry.state for entry in self.cache]
            path, bonus = self.read(walk, target_tokens, hidden, states, scoring)  # skips None
            self.target.trim_attention(self.cache, len(walk.nodes) - len(path))  # the padding's keys and values
            hidden = None if hidden is None else hidden[: len(path)]
        accepted = [tree.tokens[node] for node in path]
        if scoring is not None:
            self.scored = self.scores.read(len(path))
        if self.drafter is not None:  # what the drafter has not seen yet (plain steps in between included)
            self.pending_tokens = self.pending_tokens + accepted
            self.pending_hidden = join_rows(self.pending_hidden, hidden)
        self.root = bonus
        self.kv.convert(self.cache)
        self.hold(accepted, hidden)
        return path, bonus

    def score(self, out: VerifyOutput, walk: Walk, target_tokens: mx.array) -> list[mx.array] | None:
        """With log-probs on: those of the tokens committed after each node of the accepted path (the bonus after
        the last), from the rows of the walk's nodes (the padding repeats the last one), or a plain step's own."""
        if self.logprobs is None:
            return None
        if not out.committed:  # a plain step's were issued in verify
            self.scores = Scores(out.logits, target_tokens, self.logprobs, walk.nodes)
        return self.scores.arrays

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
        drafted = self.draft_tree()  # draft -> build tree
        out, target_tokens = self.verify(drafted.tree, drafted.context)
        return self.accept(drafted, out, target_tokens)  # walk -> commit

    def draft_tree(self, method: str | None = None) -> "Drafted":
        """Draft and build this cycle's tree."""
        method = method or self.next_method()
        start = time.perf_counter()
        return self.tree_from(method, self.draft(method), start)

    def tree_from(self, method: str, candidates: Candidates | None, start: float, sized: bool = True) -> "Drafted":
        """This cycle's tree from the `candidates` drafted since `start`. A batch drafts all its rows at once with
        the `method` it chose for them and, sizing their trees together, takes each one whole (`sized` False)."""
        prepaid, self.handed_over = self.handed_over, 0.0  # the last cycle waited that long for this one's step
        context = self.target.prefix_length(self.cache)
        mark = self.stats.lap("draft", start)
        tree = self.build_tree(candidates, method, context, sized)
        return Drafted(method, candidates, tree, context, start, self.stats.lap("build", mark), prepaid)

    def accept(self, drafted: "Drafted", out: VerifyOutput, target_tokens: mx.array) -> list[int]:
        """Walk the verified tree and commit its accepted path; the cycle's new tokens (the path's drafts and the
        bonus)."""
        stats, tree, candidates = self.stats, drafted.tree, drafted.candidates
        verified = stats.lap("verify", drafted.built)
        walk = self.walk(tree, target_tokens)
        mark = stats.lap("walk", verified)
        path, bonus = self.commit(tree, out, walk, target_tokens)
        new = [tree.tokens[node] for node in path[1:]] + [bonus]
        if self.sizer is not None:
            self.sizer.produced(new)  # what earlier peeks would have accepted
            if candidates is None and self.next_step is not None and not drafted.batched and self.sizer.can_peek():
                self.peek(drafted.context + len(path))
        seconds = stats.lap("commit", mark) - drafted.start
        if self.sizer is not None and not drafted.batched:
            # Each cycle's own time: a drafted cycle that queued a step did not take it.
            own = seconds + drafted.prepaid - self.handed_over
            self.sizer.record(candidates, tree, len(new), own, drafted.built - drafted.start, drafted.context)
        stats.decode_seconds += seconds
        stats.tree_sizes[len(tree) - 1] = stats.tree_sizes.get(len(tree) - 1, 0) + 1
        stats.cycles += 1
        stats.method_cycles[drafted.method] = stats.method_cycles.get(drafted.method, 0) + 1
        self.behind = drafted.method == "ar"
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
        return to_end(self.prefill_chunks(prompt, checkpoints))

    def prefill_chunks(self, prompt: list[int], checkpoints: Sequence[int] = ()) -> Generator[int, None, int]:
        """`prefill`, pausing between chunks with the tokens each ran (a batch runs other rows' cycles between
        them); returns the first token."""
        start = time.perf_counter()
        done, reused = self.reuse(prompt)
        marks = [len(prompt) - 1] + ([] if can_trim_prompt_cache(self.cache) else list(checkpoints))
        logits, hidden = yield from self.target.prefill_chunks(
            prompt[done:], self.cache, self.capture_layers, self.config.prefill_step_size,
            after_chunk=self.after_chunk, snapshots=[n - done for n in marks],
            snapshot=self.snapshot(prompt, done, reused))
        first = self.choose(logits)
        hidden = join_rows(reused, hidden)
        scores = Scores(logits, first, self.logprobs) if self.logprobs is not None else None
        mx.eval(first, hidden, [entry.state for entry in self.cache], scores and scores.arrays)
        self.scored = scores and scores.read(1)
        self.pending_tokens, self.pending_hidden, self.root = list(prompt), hidden, int(first[0])
        self.hold(prompt, hidden)
        self.stats.prefill_seconds += time.perf_counter() - start  # a batch's rows: their chunks' own time
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
                if not self.next_step.committed:  # a batch's queued step: its root goes in now
                    self.commit_root(self.next_step)
                self.hold([self.root], self.next_step.hidden)
            hidden = mx.concatenate(self.held_hidden) if self.held_hidden else None
            self.prompt_cache.store(self.held, self.cache, self.variant, hidden)
