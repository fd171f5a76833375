"""--concurrency 1,2,4,8: several requests arriving together, served by our BatchGenerator (max_batch = c), by the
same generator one at a time (max_batch = 1), by mlx-lm's BatchGenerator (the loop under its batch_generate) and by
mlx-lm's generate_step (the loop under its stream_generate) one request after another; all in one process, greedy.

The prompts (every --sets set's --limit, taken in turn from each set) are served in waves of c requests that arrive
at once: a wave's requests all count from its arrival, so a request served after others waits for them in its time
to first token, as a client of a one-at-a-time server does. Every c serves the same prompts, repeated to a
multiple of every c asked for. Per wave the variants run back to back (mlx-lm's one-at-a-time first: its tokens are
each prompt's truth; the others in turn forwards and backwards), so the machine's drift hits them alike.

A wave ends with its slowest request, so its last cycles run with fewer rows. Sustained load has no such tails: per
c > 1, the batched servers also take --queue x c requests at once and decode c at a time, a finished request's
place taken by the next, as mlx-lm's batch_generate serves a list of prompts. joining.py adds a request arriving
mid-batch and the memory a row holds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator as MlxBatchGenerator
from mlx_lm.generate import generate_step

from ddtree_mlx import BatchGenerator, stream_generate
from ddtree_mlx.blas import blas_name
from ddtree_mlx.drafting.oracle import ScriptedDrafter
from ddtree_mlx.training.progress import show

from .joining import late_joins, make_batch, row_memory
from .presets import Setup, Variant

WARM_TOKENS = 16  # a warm-up wave's length: enough to build every path a variant takes, short of a measured run


@dataclass
class Trace:
    """One request as its client sees it: its tokens, and when each delivery of them came (seconds after its wave
    arrived)."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def deliver(self, tokens: list[int], at: float) -> None:
        if tokens:
            self.tokens += tokens
            self.times.append(at)


@dataclass
class Wave:
    traces: list[Trace]
    wall: float  # from arrival to the last token
    prefill: float  # of that, seconds spent prefilling (whatever else ran meanwhile waited)
    cycles: int = 0  # ours batched: cycles run, and the rows they verified
    rows: int = 0
    committed: int = 0  # ours: tokens the requests' cycles committed, over each request's cycles
    row_cycles: int = 0


@dataclass(frozen=True)
class Served:
    """How a wave is served: `kind` ours-batched, ours-one, ours-stream, mlx-batch or mlx-stream."""

    kind: str
    variant: Variant | None = None  # ours: the method and tree budget

    @property
    def label(self) -> str:
        ours = self.variant.label if self.variant else ""
        return {"ours-batched": f"ours {ours}, batched (max_batch=c)",
                "ours-one": f"ours {ours}, one at a time (max_batch=1)",
                "ours-stream": f"ours {ours}, stream_generate (today's single stream)",
                "mlx-batch": "mlx-lm BatchGenerator (batch c)",
                "mlx-stream": "mlx-lm generate_step, one at a time"}[self.kind]


class PromptOracle(ScriptedDrafter):
    """The synthetic preset's oracle drafter for a batch: every row (a copy of it) drafts from its own prompt's
    continuation, as mlx-lm produced it."""

    def __init__(self, truths: dict[tuple[int, ...], list[int]], rank_weights: tuple[float, ...]):
        super().__init__([], block_size=16, rank_weights=rank_weights)
        self.truths = truths

    def reset(self, target: Any, prompt_tokens: list[int]) -> None:
        self.truth = list(prompt_tokens) + self.truths[tuple(prompt_tokens)]
        super().reset(target, prompt_tokens)


def measure_concurrency(setup: Setup, args: argparse.Namespace) -> list[dict]:
    pool = request_pool(setup.prompts, args.concurrency)
    truths: dict[tuple[int, ...], list[int]] = {}
    drafter = batch_drafter(setup, args, truths)
    ours = [Variant(method, budget) for method in args.methods if method in ("ar", "dflash", "ddtree")
            for budget in (args.tree_budgets if method == "ddtree" else [None])]
    plans = {c: plan(c, ours) for c in args.concurrency}
    servers: dict[tuple[int, Served], Callable[[list[list[int]], int], Wave]] = {}

    def server(c: int, served: Served) -> Callable[[list[list[int]], int], Wave]:
        if (c, served) not in servers:  # one generator per variant and c, kept across waves as a server keeps it
            servers[c, served] = make_server(setup, served, c, drafter)
        return servers[c, served]

    warm = pool[: min(2, len(pool))]  # warm-up: build each variant's paths, unrecorded (mlx-lm first: truths)
    for c in args.concurrency:
        for served in plans[c]:
            for trace in server(c, served)(warm, WARM_TOKENS).traces:
                if served.kind == "mlx-stream":
                    truths.setdefault(tuple(trace.prompt), trace.tokens)
    truths.clear()
    waves: dict[tuple[int, Served], list[Wave]] = {}
    total, done = sum(len(pool) // c * len(plans[c]) for c in args.concurrency), 0
    for c in args.concurrency:
        for wave, start in enumerate(range(0, len(pool), c)):
            requests = pool[start : start + c]
            truth, *rest = plans[c]  # every other wave the rest in reverse: no variant always runs right after another
            for served in [truth, *(rest[::-1] if wave % 2 else rest)]:
                wave = server(c, served)(requests, args.max_tokens)
                if served.kind == "mlx-stream":
                    truths.update({tuple(t.prompt): t.tokens for t in wave.traces})
                waves.setdefault((c, served), []).append(wave)
                done += 1
                show(done, total, f"c={c} {served.kind}")
    rows = [summarize(c, served, waves[c, served], truths, setup, args)
            for c in args.concurrency for served in plans[c]]
    rows += queued(args, pool, plans, server, truths, setup)
    print_concurrency(rows, args)
    decoding = next((v for v in ours if v.method == "ddtree"), ours[0] if ours else None)
    if decoding is not None:
        rows += late_joins(setup, args, drafter, decoding, pool)
        rows += row_memory(setup, args, drafter, decoding, pool)
    return rows


def queued(args: argparse.Namespace, pool: list[list[int]], plans: dict[int, list[Served]],
           server: Callable[[int, Served], Callable[[list[list[int]], int], Wave]], truths: dict,
           setup: Setup) -> list[dict]:
    """Sustained load: per c > 1, --queue x c requests (the pool, repeated as needed) given at once to each batched
    server, mlx-lm's first, then ours (reversed at every other c)."""
    rows = []
    for turn, c in enumerate(c for c in args.concurrency if c > 1 and args.queue):
        requests = (pool * math.ceil(args.queue * c / len(pool)))[: args.queue * c]
        mlx, *ours = [served for served in plans[c] if served.kind in ("mlx-batch", "ours-batched")]
        for served in [mlx, *(ours[::-1] if turn % 2 else ours)]:
            wave = server(c, served)(requests, args.max_tokens)
            rows.append(summarize(c, served, [wave], truths, setup, args, arrival="queue"))
    return rows


def request_pool(prompts: dict[str, list[list[int]]], sizes: list[int]) -> list[list[int]]:
    """The sets' prompts taken in turn from each set, repeated to a multiple of every wave size."""
    taken = [p for row in zip(*prompts.values()) for p in row]
    taken += [p for rows in prompts.values() for p in rows[min(map(len, prompts.values())):]]
    size = math.ceil(len(taken) / math.lcm(*sizes)) * math.lcm(*sizes)
    return (taken * math.ceil(size / len(taken)))[:size]


def batch_drafter(setup: Setup, args: argparse.Namespace, truths: dict) -> Any:
    """One drafter every row forks: the first --draft-model's; on the synthetic preset an oracle for each prompt."""
    if setup.name == "synthetic":
        miss = 1 - args.accuracy
        return PromptOracle(truths, (args.accuracy, miss / 2, miss / 4, miss / 4))
    return setup.make_drafter([], [], None)


def plan(c: int, ours: list[Variant]) -> list[Served]:
    """mlx-lm's one-at-a-time first (its tokens are the truth). For one request, max_batch 1 is one at a time: the
    second row of ours is then today's stream_generate instead."""
    kinds = ("ours-batched", "ours-one") if c > 1 else ("ours-batched", "ours-stream")
    return [Served("mlx-stream"), Served("mlx-batch"), *(Served(kind, v) for v in ours for kind in kinds)]


def make_server(setup: Setup, served: Served, c: int, drafter: Any) -> Callable[[list[list[int]], int], Wave]:
    if served.kind == "mlx-stream":
        return lambda prompts, max_tokens: mlx_one_at_a_time(setup, prompts, max_tokens)
    if served.kind == "mlx-batch":
        # batch_generate's own settings but for the batch sizes: c rows prefilled and decoded together.
        gen = MlxBatchGenerator(setup.target, stop_tokens=[[t] for t in setup.stop_token_ids],
                                completion_batch_size=c, prefill_batch_size=c,
                                prefill_step_size=setup.config.prefill_step_size)
        return lambda prompts, max_tokens: mlx_batched(gen, prompts, max_tokens)
    variant = served.variant
    if served.kind == "ours-stream":
        config = setup.config.replace(tree_budget=variant.tree_budget) if variant.tree else setup.config
        draft = None if variant.method == "ar" else drafter
        return lambda prompts, max_tokens: ours_streamed(setup, draft, variant, config, prompts, max_tokens)
    batch, spent = make_batch(setup, drafter, variant, c if served.kind == "ours-batched" else 1)
    return lambda prompts, max_tokens: ours_batched(batch, spent, prompts, max_tokens, setup.stop_token_ids)


def ours_batched(batch: BatchGenerator, spent: list[float], prompts: list[list[int]], max_tokens: int,
                 stops: list[int]) -> Wave:
    start, before = time.perf_counter(), (batch.stats.cycles, batch.stats.rows_verified, len(spent))
    uids = [batch.insert(p, max_new_tokens=max_tokens, stop_token_ids=stops) for p in prompts]
    traces, stats = {uid: Trace(p) for uid, p in zip(uids, prompts)}, {}
    while batch.has_work:
        responses = batch.next()
        now = time.perf_counter() - start
        for response in responses:
            traces[response.uid].deliver(response.tokens, now)
            stats[response.uid] = response.stats
    wall = time.perf_counter() - start
    return Wave([traces[uid] for uid in uids], wall, sum(spent[before[2]:]), batch.stats.cycles - before[0],
                batch.stats.rows_verified - before[1], sum(s.committed for s in stats.values()),
                sum(s.cycles for s in stats.values()))


def ours_streamed(setup: Setup, drafter: Any, variant: Variant, config: Any, prompts: list[list[int]],
                  max_tokens: int) -> Wave:
    start, traces, stats = time.perf_counter(), [], []
    for prompt in prompts:
        trace = Trace(prompt)
        for step in stream_generate(target_model=setup.target, draft_model=drafter, prompt_tokens=prompt,
                                    max_new_tokens=max_tokens, stop_token_ids=setup.stop_token_ids,
                                    method=variant.method, config=config):
            trace.deliver(step.tokens, time.perf_counter() - start)
        stats.append(step.stats)
        traces.append(trace)
    return Wave(traces, time.perf_counter() - start, sum(s.prefill_seconds for s in stats),
                committed=sum(s.committed for s in stats), row_cycles=sum(s.cycles for s in stats))


def mlx_batched(gen: MlxBatchGenerator, prompts: list[list[int]], max_tokens: int) -> Wave:
    start = time.perf_counter()
    with gen.stats() as stats:
        uids = gen.insert(prompts, [max_tokens] * len(prompts))
        traces, running = {uid: Trace(p) for uid, p in zip(uids, prompts)}, set(uids)
        while running:
            _, responses = gen.next()
            now = time.perf_counter() - start
            for response in responses:  # the stop token too, as generate_step and our engine hand it out
                traces[response.uid].deliver([response.token], now)
                if response.finish_reason is not None:
                    running.discard(response.uid)
    return Wave([traces[uid] for uid in uids], time.perf_counter() - start, stats.prompt_time)


def mlx_one_at_a_time(setup: Setup, prompts: list[list[int]], max_tokens: int) -> Wave:
    """generate_step, the loop under mlx-lm's stream_generate without its detokenizer (ours has none either). Its
    prefill is the time to its first token from its own start: the prompt, then the step giving that token."""
    start, traces, prefill = time.perf_counter(), [], 0.0
    for prompt in prompts:
        trace, began = Trace(prompt), time.perf_counter() - start
        for token, _ in generate_step(mx.array(prompt), setup.target, max_tokens=max_tokens):
            trace.deliver([int(token)], time.perf_counter() - start)
            if trace.tokens[-1] in setup.stop_token_ids:
                break
        prefill += trace.times[0] - began
        traces.append(trace)
    return Wave(traces, time.perf_counter() - start, prefill)


def summarize(c: int, served: Served, waves: list[Wave], truths: dict, setup: Setup,
              args: argparse.Namespace, arrival: str = "waves") -> dict:
    """Aggregate decode tokens/s: every request's tokens after its first over the waves' time not spent
    prefilling. Per stream: a request's own rate from its first token to its last (the median request's). Time
    per output token (ITL): all requests' such spans over their tokens; the gaps between deliveries are what a
    streaming client waits (a cycle may deliver several tokens at once)."""
    traces = [t for w in waves for t in w.traces]
    decode = sum(w.wall - w.prefill for w in waves)
    spans = [(t.times[-1] - t.times[0], len(t.tokens) - 1) for t in traces if len(t.tokens) > 1]
    gaps = np.concatenate([np.diff(t.times) for t in traces]) if spans else np.zeros(1)  # no gap: none to wait
    ttft = np.array([t.times[0] for t in traces])
    matches = all(t.tokens == truths[tuple(t.prompt)] for t in traces)
    variant = served.variant
    return {
        "measure": "concurrency", "concurrency": c, "kind": served.kind, "label": served.label,
        "method": variant.method if variant else "mlx-lm", "tree_budget": variant.tree_budget if variant else None,
        "draft": setup.draft.split(",")[0] if variant and variant.method != "ar" else None,
        "requests": len(traces), "waves": len(waves), "max_tokens": args.max_tokens,
        "tokens": sum(len(t.tokens) for t in traces),
        "aggregate_tps": sum(n for _, n in spans) / decode,
        "end_to_end_tps": sum(len(t.tokens) for t in traces) / sum(w.wall for w in waves),
        # The median request's: a mean would be led by the few that stop after a handful of fast tokens.
        "per_stream_tps": float(np.median([n / s for s, n in spans if s > 0] or [0.0])),
        "ttft_s": {"mean": float(ttft.mean()), "p50": float(np.percentile(ttft, 50)),
                   "p90": float(np.percentile(ttft, 90))},
        "itl_ms": 1000 * sum(s for s, _ in spans) / max(sum(n for _, n in spans), 1),
        "gap_ms": {"p50": 1000 * float(np.percentile(gaps, 50)), "p90": 1000 * float(np.percentile(gaps, 90))},
        "rows_per_forward": sum(w.rows for w in waves) / max(sum(w.cycles for w in waves), 1),
        "tokens_per_cycle": sum(w.committed for w in waves) / max(sum(w.row_cycles for w in waves), 1),
        # Ours claim mlx-lm's greedy tokens; mlx-lm's batch is only compared with them (`matches_mlx_lm`).
        **({"lossless": matches} if variant else {"matches_mlx_lm": matches}),
        "arrival": arrival,
        "blas": blas_name(),
    }


def print_concurrency(rows: list[dict], args: argparse.Namespace) -> None:
    waves = [r for r in rows if r["arrival"] == "waves"]
    print_rows(waves)
    for c in args.concurrency:
        by = {(r["kind"], r["tree_budget"], r["method"]): r for r in waves if r["concurrency"] == c}
        mlx = by[("mlx-batch", None, "mlx-lm")]["aggregate_tps"]
        for (kind, budget, method), r in by.items():
            if kind != "ours-batched":
                continue
            alone = by[("ours-one" if c > 1 else "ours-stream", budget, method)]["aggregate_tps"]
            print(f"# c={c} {r['label']}: {r['aggregate_tps'] / alone:.2f}x "
                  f"{'one at a time' if c > 1 else 'stream_generate'}, {r['aggregate_tps'] / mlx:.2f}x mlx-lm batch")
    queue = [r for r in rows if r["arrival"] == "queue"]
    if queue:
        print(f"Sustained load: {args.queue} x c requests given at once, c decoding at a time")
        print_rows(queue)
        for r in queue:
            mlx = next(m for m in queue if m["concurrency"] == r["concurrency"] and m["kind"] == "mlx-batch")
            if r["kind"] == "ours-batched":
                print(f"# c={r['concurrency']} queued {r['label']}: "
                      f"{r['aggregate_tps'] / mlx['aggregate_tps']:.2f}x mlx-lm batch")


def print_rows(rows: list[dict]) -> None:
    width = max(len(r["label"]) for r in rows)
    print(f"{'c':>2} {'variant':<{width}} {'agg tok/s':>9} {'e2e':>6} {'stream':>6} {'TTFT mean/p50/p90 s':>20} "
          f"{'ITL ms':>6} {'gap p50/p90 ms':>14} {'rows/fwd':>8} {'tok/cyc':>7} lossless")
    for r in rows:
        t, g = r["ttft_s"], r["gap_ms"]
        same = r.get("lossless", r.get("matches_mlx_lm"))
        tag = ("yes" if same else "NO") + ("" if "lossless" in r else " (vs mlx-lm greedy; not ours)")
        batched = f"{r['rows_per_forward']:8.2f}" if r["kind"] == "ours-batched" else f"{'':8}"
        per_cycle = f"{r['tokens_per_cycle']:7.2f}" if r["kind"].startswith("ours") else f"{'':7}"
        print(f"{r['concurrency']:>2} {r['label']:<{width}} {r['aggregate_tps']:9.1f} {r['end_to_end_tps']:6.1f} "
              f"{r['per_stream_tps']:6.1f} {t['mean']:6.2f} {t['p50']:6.2f} {t['p90']:6.2f} {r['itl_ms']:6.1f} "
              f"{g['p50']:6.0f} {g['p90']:7.0f} {batched} {per_cycle} {tag}")
