"""Continuous batching with draft trees: several generations decoded together, every row's tree verified in one
target forward (TargetAdapter.verify_forest), each row lossless on its own.

A row is one request's Session: its own caches, drafter state, sampling key, stop rules and length. Each `next()`:

 1. admits waiting requests while there is room (`max_batch` rows), and prefills joining rows, oldest first, up
    to a chunk's worth of prompt tokens (several short prompts, or one chunk of a long one), so a long prompt holds
    the others up by one chunk at most; a row whose prefill ends hands out its first token;
 2. runs one cycle over the rows that are decoding: their drafters draft together (one DFlash forward for all
    rows' blocks), each row builds its tree, the target verifies all the trees in one forward (one attention per
    layer over the rows' padded KV buffers, a hybrid's recurrences over their stacked states: models.batch_cache),
    each row walks its own tree and commits its own accepted path (acceptance is never clamped to the batch's
    shortest); plain cycles queue the next plain step before reading this one, as mlx-lm's batch loop does; a lone
    row runs stream_generate's own cycle;
 3. returns what each row committed; rows that stopped, reached their length or were cancelled leave at once.

Rows join and leave only between `next()` calls (cycle boundaries). Memory per row is what a lone generation holds
(a hybrid target's recurrent state per linear layer, its drafter's context cache), but for its KV cache: the
batch's buffers are as long as its longest row, so each row holds up to the longest prompt and max_new_tokens;
`max_batch` bounds the rows, waiting requests hold only their tokens.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import mlx.core as mx

from ..config import DDTreeConfig, is_int
from ..drafting.protocol import Drafter, as_drafter, propose_rows
from ..models.batch_cache import BatchCaches
from ..models.kv_quantization import DEFAULT_QUANTIZED_KV_START, KVQuantization
from ..models.registry import adapter_for
from ..models.verify import VerifyOutput
from ..tree.build import Candidates
from ..tree.draft_tree import DraftTree
from . import calibration
from .batch_sizing import BatchSizer
from .generate import METHODS, Generation, open_generation, resolve_config
from .logprobs import TokenLogprob
from .prompt_cache import PromptCache
from .sampling import SamplingParams
from .session import Drafted, GenerationStats, Session


@dataclass
class BatchResponse:
    """What one row committed in one `next()`: its tokens (a prefill's first token, or a cycle's), with
    finish_reason set ("stop" or "length") on its last; "error" and the exception if its prefill failed (that row
    alone: an error in a cycle over several rows raises from `next()`)."""

    uid: int
    tokens: list[int]
    finish_reason: str | None
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None
    error: Exception | None = None


@dataclass
class Row:
    uid: int
    generation: Generation
    prefill: Generator[int, None, int] | None = None  # until the row's prompt is in its cache
    prefilled: int = 0  # prompt tokens its prefill ran so far

    @property
    def session(self):
        return self.generation.session


@dataclass
class BatchStats:
    cycles: int = 0  # batch cycles run
    batched_cycles: int = 0  # of them, cycles verifying more than one row in one forward
    largest_batch: int = 0  # the most rows one forward verified
    rows_verified: int = 0  # rows over all cycles (the mean batch is rows_verified / cycles)
    prefill_chunks: int = 0


def row_bytes(session: Any) -> int:
    """What a row holds on the device: its target cache (KV, a hybrid's conv and recurrent states), the hidden
    states its drafter has not read yet and the drafter's own context cache."""
    drafter = getattr(session.drafter, "dflash", session.drafter)  # the mixed drafter's context is its DFlash part's
    drafter_cache = getattr(drafter, "cache", None) or []
    arrays = [value for entry in drafter_cache for value in vars(entry).values() if isinstance(value, mx.array)]
    pending = session.pending_hidden.nbytes if session.pending_hidden is not None else 0
    return sum(entry.nbytes for entry in session.cache) + pending + sum(a.nbytes for a in arrays)


def fork(drafter: Drafter | None) -> Drafter | None:
    """A drafter for one row: the same weights, its own state (reset gives it fresh state for its prompt)."""
    if drafter is None:
        return None
    return drafter.fork() if hasattr(drafter, "fork") else copy.copy(drafter)


class BatchGenerator:
    """Decode several requests together, in the spirit of mlx-lm's BatchGenerator: `insert` requests (checked at
    once, before any model work), call `next()` until `has_work` is false, `cancel` a request any time between
    calls. max_batch 1 decodes one request at a time, each exactly as stream_generate does. Sharded targets
    batch nothing (max_batch must be 1)."""

    def __init__(self, target_model: Any, draft_model: Any = None, *, tokenizer: Any = None, method: str = "ddtree",
                 config: DDTreeConfig | None = None, max_batch: int | None = None,
                 prompt_cache: PromptCache | None = None, kv_bits: int | None = None, kv_group_size: int = 64,
                 quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START):
        self.config = resolve_config(config, None)
        max_batch = self.config.max_batch if max_batch is None else max_batch  # None: the config's (DDTREE_MAX_BATCH)
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if method != "ar" and draft_model is None:
            raise ValueError(f"method {method!r} needs a draft_model; pass one, or use method='ar'")
        self.target = adapter_for(target_model)
        if max_batch > 1 and self.target.group is not None:
            raise ValueError("a sharded target decodes one request at a time: use max_batch=1")
        self.drafter = as_drafter(draft_model) if method != "ar" else None
        self.tokenizer, self.method, self.max_batch, self.prompt_cache = tokenizer, method, max_batch, prompt_cache
        self.kv = KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
        self.kv.check(self.target.head_dim)
        self.sizer = None
        if method == "ddtree" and self.config.tree_budget == "auto":  # measured now, not in a request's time
            self.sizer = BatchSizer(calibration.verify_costs(self.target, self.config))
        # Rows verified together hold their caches together (models.batch_cache): padded attention buffers (not a
        # quantized KV cache: each row's own) and stacked recurrent states; re-running the target at commit
        # (exact_commit) keeps each row's own caches.
        self.shared = None if self.config.exact_commit else BatchCaches(attention=self.kv.bits is None)
        self.planned: str | None = None  # the next cycle's method, where a cycle chose it already (queue)
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []
        self.uids = itertools.count()
        self.stats = BatchStats()

    # --- requests ------------------------------------------------------------------------------------------------

    def insert(self, prompt_tokens: Any, *, max_new_tokens: int = 2048, stop_token_ids: Sequence[int] | None = None,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               logprobs: int | None = None, prompt_checkpoints: Sequence[int] = ()) -> int:
        """Queue a request (stream_generate's arguments); its uid. Bad arguments raise ValueError here."""
        drafter = fork(self.drafter)
        generation = open_generation(
            self.target, drafter, self.tokenizer, prompt_tokens, max_new_tokens, self.config, self.method,
            stop_token_ids=stop_token_ids, sampling=SamplingParams(temperature, top_p, top_k, seed),
            prompt_cache=self.prompt_cache, prompt_checkpoints=prompt_checkpoints, kv=self.kv, logprobs=logprobs)
        # Later rows fork this one's drafter: reset already, it holds what every row shares (a DFlash drafter's
        # LM-head rows for its vocabulary, 23 MB for SmolLM2's), which a fork of the unused original would redo.
        self.drafter = drafter
        row = Row(next(self.uids), generation)
        self.waiting.append(row)
        return row.uid

    def cancel(self, uid: int) -> None:
        """The request leaves now, whether waiting or decoding; the other rows are untouched."""
        self.waiting = deque(row for row in self.waiting if row.uid != uid)
        self.leave([row for row in self.rows if row.uid == uid])

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def health(self) -> dict[str, int]:
        return {"active": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "largest_batch": self.stats.largest_batch, "cycles": self.stats.cycles,
                "batched_cycles": self.stats.batched_cycles, "rows_verified": self.stats.rows_verified,
                "rows_bytes": sum(row_bytes(row.session) for row in self.rows)}

    # --- the loop ------------------------------------------------------------------------------------------------

    def next(self) -> list[BatchResponse]:
        """One step of the batch: admissions and up to one chunk of prompt tokens, then one cycle over the rows that
        were decoding already."""
        while self.waiting and len(self.rows) < self.max_batch:
            row = self.waiting.popleft()
            row.prefill = row.session.prefill_chunks(row.generation.prompt, row.generation.checkpoints)
            self.rows.append(row)
        decoding = [row for row in self.rows if row.prefill is None]
        responses = self.prefill()
        if decoding:
            responses += self.cycle(decoding)
        finished = {response.uid for response in responses if response.finish_reason}
        self.leave([row for row in self.rows if row.uid in finished])
        return responses

    def leave(self, rows: list[Row]) -> None:
        if self.shared is not None:
            self.shared.drop([row.session.cache for row in rows])
        for row in rows:
            self.rows.remove(row)

    def prefill(self) -> list[BatchResponse]:
        """Prefill joining rows, oldest first, until a chunk's worth of prompt tokens ran (prefill_step_size): short
        prompts join several at a time, a long one runs one chunk per step."""
        responses, budget = [], self.config.prefill_step_size
        for row in [row for row in self.rows if row.prefill is not None]:
            if budget <= 0:
                break
            ran, first = self.prefill_chunk(row)
            budget -= ran
            responses += first
        return responses

    def prefill_chunk(self, row: Row) -> tuple[int, list[BatchResponse]]:
        """One chunk of a joining row's prompt: the tokens it ran, and the row's first token once its prefill
        ended. A failure there is that row's alone: it leaves with finish_reason "error" (no other row has been
        touched this step)."""
        self.stats.prefill_chunks += 1
        try:
            ran = next(row.prefill)
            row.prefilled += ran
            return ran, []
        except StopIteration as end:
            row.prefill = None
            return len(row.generation.prompt) - row.prefilled, [self.respond(row, [end.value])]
        except Exception as error:
            self.cancel(row.uid)
            return 0, [BatchResponse(row.uid, [], "error", row.session.stats, error=error)]

    def cycle(self, rows: list[Row]) -> list[BatchResponse]:
        """One cycle over `rows`. Rows whose plain steps the last cycle queued together take them (`queue`); a
        row with a plain step queued from when it ran alone takes that step first (it is already in its cache); a
        lone row runs its own session's cycle, as stream_generate."""
        if any(self.batch_queued(row) for row in rows):  # every row's step was queued together last cycle
            return self.forest(rows)
        queued = [row for row in rows if row.session.next_step is not None]
        rows = [row for row in rows if row.session.next_step is None]
        if len(rows) == 1 and not queued:
            queued, rows = rows, []
        # Waiting requests with one row decoding means max_batch 1: nobody can join, so it queues its steps.
        responses = [self.solo(row, alone=len(self.rows) == 1) for row in queued]
        if len(rows) == 1:
            responses.append(self.solo(rows[0], alone=False))
        elif rows:
            responses += self.forest(rows)
        return responses

    def solo(self, row: Row, alone: bool) -> BatchResponse:
        """The row's own cycle. Alone in the batch, it queues its next plain step as stream_generate does; with
        others, none (the next cycle verifies it in the forest)."""
        session = row.session
        if self.shared is not None and self.shared.joined(session.cache):  # its own cycle reads its own caches
            session.cache = self.shared.leave(session.cache)
        session.more_steps = alone and row.generation.remaining > 1
        self.count(1)
        return self.respond(row, session.cycle())

    def batch_queued(self, row: Row) -> bool:
        return row.session.next_step is not None and self.shared is not None and self.shared.joined(row.session.cache)

    def forest(self, rows: list[Row]) -> list[BatchResponse]:
        """Draft and build every row's tree, verify all of them in one forward (or take the plain step queued for
        them last cycle), then walk and commit each."""
        sessions = [row.session for row in rows]
        # Rows joining copy their caches into the batch's buffers: a cost of joining, not of this cycle's method
        # (at 8 rows here 0.4-0.6 s; timed with the first cycle, it set the sizer's price of a node at 4x).
        self.join(sessions)
        start = time.perf_counter()
        queued = [session.next_step for session in sessions]
        took_step = queued[0] is not None
        method = "ar" if took_step else self.plan(len(rows))
        drafting = method != "ar"
        behind = drafting and any(session.behind for session in sessions)
        first = drafting and not all(session.caught_up for session in sessions)
        drafted, context = self.draft_trees(sessions, method, start)
        outs = queued if took_step else self.target.verify_forest(
            [d.tree for d in drafted], [s.cache for s in sessions], sessions[0].capture_layers, self.config)
        for session in sessions:
            session.next_step, session.more_steps = None, False  # a batch queues its rows' steps itself
        tokens = [session.verified(d.tree, out) for session, d, out in zip(sessions, drafted, outs)]
        queues = method == "ar" and self.queue_next(rows, outs, tokens)
        news = [session.accept(d, out, t) for session, d, out, t in zip(sessions, drafted, outs, tokens)]
        self.count(len(rows))
        # A cycle that queued the next step without having taken one queued for it paid for two forwards, one that
        # took its step without queuing the next for none: only the others' times are one cycle's.
        # A drafter behind reads the prompt (a row's first draft; SmolLM2's: 60-200 ms at 4 rows) or the plain
        # steps' tokens since it last drafted: a cost paid once when drafting starts, not what drafting costs
        # (judged with it, auto at 4 rows stopped drafting where one-node trees paid, and probed ever more dearly).
        self.learn(rows, method, drafted, news, start, context, timed=queues == took_step, behind=behind, first=first)
        return [self.respond(row, new) for row, new in zip(rows, news)]

    def join(self, sessions: list[Session]) -> None:
        """Rows verified together share padded attention caches: those not in them yet join, all at once."""
        joining = [session for session in sessions if self.shared is not None and not self.shared.joined(session.cache)]
        if joining:
            for session, cache in zip(joining, self.shared.join([session.cache for session in joining])):
                session.cache = cache

    def learn(self, rows: list[Row], method: str, drafted: list[Drafted], news: list[list[int]], start: float,
              context: int, timed: bool, behind: bool, first: bool) -> None:
        """Tell the sizer what a `timed` cycle cost and committed."""
        if self.sizer is not None and timed:
            depth = max((len(d.candidates.tokens) for d in drafted if d.candidates is not None), default=0)
            self.sizer.record(method != "ar", len(rows), sum(len(d.tree) for d in drafted), sum(map(len, news)),
                              time.perf_counter() - start, drafted[-1].built - start, context, depth=depth,
                              behind=behind, first=first)

    def draft_trees(self, sessions: list[Session], method: str, start: float) -> tuple[list[Drafted], int]:
        """The rows' trees (drafted together, each built whole, then sized together with auto sizes), and the
        rows' mean context."""
        drafted = [session.tree_from(method, candidates, start, sized=self.sizer is None)
                   for session, candidates in zip(sessions, self.draft(sessions, method))]
        context = sum(d.context for d in drafted) // len(drafted)
        if self.sizer is not None and method != "ar":
            for d, tree in zip(drafted, self.sizer.size([d.tree for d in drafted], context)):
                d.tree = tree
        for d in drafted:
            d.batched = True
        return drafted, context

    def plan(self, rows: int) -> str:
        """The method of the next forest cycle of `rows` rows: the sizer's pick (or the batch's method), made once
        per cycle."""
        planned, self.planned = self.planned, None
        if planned is None:
            planned = self.sizer.pick(self.method, rows) if self.sizer is not None else self.method
        return planned

    def queue_next(self, rows: list[Row], outs: list[VerifyOutput], tokens: list[mx.array]) -> bool:
        """After a plain cycle: queue the next one now (`queue`) where these rows surely decode together again and
        the sizer picks another plain step for them; whether it did."""
        if not self.may_queue(rows):
            return False
        self.planned = self.plan(len(rows))
        if self.planned != "ar":
            return False
        self.planned = None
        self.queue([row.session for row in rows], outs, tokens)
        return True

    def may_queue(self, rows: list[Row]) -> bool:
        """Whether this plain cycle's rows surely decode together again: two or more, sharing padded caches, each
        with more than a token to go, and nobody waiting to join (whoever arrives meanwhile joins a cycle later)."""
        return (len(rows) > 1 and self.shared is not None and self.shared.attention and not self.waiting
                and len(rows) == len(self.rows) and all(row.generation.remaining > 1 for row in rows))

    def queue(self, sessions: list[Session], outs: list[VerifyOutput], tokens: list[mx.array]) -> None:
        """mlx-lm's batch loop: the next plain step of every row, built on this step's still-lazy tokens and handed
        to the device before this one is read, so the host's work overlaps the device's. This step's roots are
        committed first (a lone root is always accepted), then the next forward reads them."""
        for session, out, token in zip(sessions, outs, tokens):
            session.commit_root(out)
            session.step_scored(out, token)
        roots = [DraftTree.root_only(0) for _ in sessions]  # tokens still on the device: `tokens` below
        steps = self.target.verify_forest(roots, [session.cache for session in sessions], sessions[0].capture_layers,
                                          self.config, tokens=mx.concatenate(tokens))
        mx.async_eval([step.logits for step in steps])
        for session, step in zip(sessions, steps):
            session.next_step = step

    def draft(self, sessions: list[Session], method: str) -> list[Candidates | None]:
        """Every row's candidates, drafted together where their drafters can share a forward (propose_rows), as
        deep as the batch's sizer lets trees reach."""
        depth = self.sizer.depth if self.sizer is not None else None
        requests = [session.draft_request(method, depth) for session in sessions]
        if requests[0] is None:
            return [None] * len(sessions)
        proposals = propose_rows([session.drafter for session in sessions], requests)
        mx.eval([(c.tokens, c.log_probs) for c in proposals if isinstance(c.tokens, mx.array)])
        return [c.to_numpy() for c in proposals]

    def count(self, rows: int) -> None:
        stats = self.stats
        stats.cycles += 1
        stats.batched_cycles += rows > 1
        stats.rows_verified += rows
        stats.largest_batch = max(stats.largest_batch, rows)

    @staticmethod
    def respond(row: Row, new: list[int]) -> BatchResponse:
        step = row.generation.step(new)
        return BatchResponse(row.uid, step.tokens, step.finish_reason, step.stats, step.logprobs)


def batch_generate(target_model: Any, draft_model: Any = None, *, prompts: Sequence[Any], tokenizer: Any = None,
                   max_new_tokens: int = 256, method: str = "ddtree", config: DDTreeConfig | None = None,
                   max_batch: int | None = None, **request: Any) -> list[dict[str, Any]]:
    """Generate every prompt to completion, `max_batch` at a time (None: the config's; more join as rows finish);
    per prompt, in order: generated_token_ids, finish_reason and (with logprobs) logprobs. `request`: insert's
    other arguments, the same for every prompt."""
    batch = BatchGenerator(target_model, draft_model, tokenizer=tokenizer, method=method, config=config,
                           max_batch=max_batch)
    uids = [batch.insert(prompt, max_new_tokens=max_new_tokens, **request) for prompt in prompts]
    results: dict[int, dict[str, Any]] = {uid: {"generated_token_ids": [], "finish_reason": None} for uid in uids}
    if request.get("logprobs") is not None:
        for result in results.values():
            result["logprobs"] = []
    while batch.has_work:
        for response in batch.next():
            if response.error is not None:
                raise response.error
            result = results[response.uid]
            result["generated_token_ids"] += response.tokens
            result["finish_reason"] = response.finish_reason
            if response.logprobs is not None:
                result["logprobs"] += response.logprobs
    return [results[uid] for uid in uids]
