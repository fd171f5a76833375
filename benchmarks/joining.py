"""What --concurrency measures besides throughput: the time to first token of a request that arrives while a batch
is decoding, against the issue's bound (one prefill chunk + one cycle), and the memory a row holds."""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import deque
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn

from ddtree_mlx import BatchGenerator
from ddtree_mlx.models.adapter import TargetAdapter
from ddtree_mlx.models.batch_cache import RowArrays, RowKV, RowsArrays, RowsKV
from ddtree_mlx.models.registry import adapter_for

from .presets import Setup, Variant

JOIN_AFTER = 3  # cycles every running row decodes before the late request arrives: the batch's pace, measured
STATE_OF = ("ddtree_mlx", "dflash_mlx", "mlx_lm")  # packages whose objects hold a row's state (caches, drafters)


def make_batch(setup: Setup, drafter: Any, variant: Variant, max_batch: int) -> tuple[BatchGenerator, list[float]]:
    """Our generator, and the seconds of every prefill chunk it runs (appended as they end). A row's own
    stats.prefill_seconds spans its first chunk to its first token, the cycles run between its chunks included;
    the chunks' own time is taken around BatchGenerator.prefill_chunk instead."""
    config = setup.config.replace(tree_budget=variant.tree_budget) if variant.tree else setup.config
    batch = BatchGenerator(setup.target, None if variant.method == "ar" else drafter, method=variant.method,
                           config=config, max_batch=max_batch)
    spent, chunk = [], batch.prefill_chunk

    def timed(row: Any) -> list:
        start = time.perf_counter()
        try:
            return chunk(row)
        finally:
            spent.append(time.perf_counter() - start)

    batch.prefill_chunk = timed
    return batch, spent


def late_joins(setup: Setup, args: argparse.Namespace, drafter: Any, variant: Variant,
               pool: list[list[int]]) -> list[dict]:
    """Per c: c rows decoding (no stop tokens, so none leaves), then one more request inserted between two next()
    calls; its time to first token beside the bound, its own prefill chunk plus the batch's median cycle before
    it arrived. A request arriving in the middle of a cycle would also wait for the rest of that cycle."""
    rows = []
    for c in args.concurrency:
        batch, spent = make_batch(setup, drafter, variant, c + 1)
        uids = [batch.insert(p, max_new_tokens=args.max_tokens, stop_token_ids=[]) for p in pool[:c]]
        started: set[int] = set()
        while len(started) < c:  # until every row's prefill has handed out its first token
            started |= {r.uid for r in batch.next()}
        cycles = []
        for _ in range(JOIN_AFTER):
            start = time.perf_counter()
            batch.next()
            cycles.append(time.perf_counter() - start)
        decoding, chunks = batch.health()["active"], len(spent)
        start = time.perf_counter()
        late = batch.insert(pool[c % len(pool)], max_new_tokens=args.max_tokens, stop_token_ids=[])
        calls, first = 0, None
        while first is None:
            calls += 1
            first = next((r for r in batch.next() if r.uid == late), None)
        ttft = time.perf_counter() - start
        for uid in [*uids, late]:
            batch.cancel(uid)
        # Its prefill: the chunks its next() calls ran (a prompt's last token is a step of its own).
        prefill, cycle = sum(spent[chunks:]), statistics.median(cycles)
        rows.append({"measure": "late-join", "concurrency": c, "label": f"ours {variant.label}",
                     "rows_decoding": decoding, "prompt_tokens": len(pool[c % len(pool)]), "next_calls": calls,
                     "ttft_s": ttft, "prefill_s": prefill, "cycle_s": cycle, "bound_s": prefill + cycle,
                     "ttft_over_bound": ttft / (prefill + cycle)})
        r = rows[-1]
        print(f"# late join, {decoding} rows decoding: TTFT {ttft * 1000:.0f} ms over {calls} next() call(s); "
              f"bound {(prefill + cycle) * 1000:.0f} ms = its {r['prompt_tokens']}-token prefill "
              f"{prefill * 1000:.0f} ({len(spent) - chunks} prefill_chunk calls) + a cycle {cycle * 1000:.0f} "
              f"(median of {JOIN_AFTER}); {r['ttft_over_bound']:.2f}x the bound", flush=True)
    return rows


def row_memory(setup: Setup, args: argparse.Namespace, drafter: Any, variant: Variant,
               pool: list[list[int]]) -> list[dict]:
    """At the largest c, rows decoding to --max-tokens (no stop tokens): the bytes of each row's state at its
    longest, read from its arrays (KV cache as allocated, recurrent state, drafter state, hidden states waiting
    for the drafter), arrays two rows held at once counted apart as shared; MLX's active memory above what it was
    before the batch, per row, at its highest between cycles of the full batch; and what the batch's health()
    reports per row."""
    c = max(args.concurrency)
    target = adapter_for(setup.target)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    batch, _ = make_batch(setup, drafter, variant, c)
    for prompt in pool[:c]:
        batch.insert(prompt, max_new_tokens=args.max_tokens, stop_token_ids=[])
    latest: dict[int, dict[str, dict[int, int]]] = {}  # per row, its last arrays by part: {id: bytes}
    shared: dict[int, int] = {}  # arrays two rows held at once (forks share their drafter's head rows, say)
    active, reported = (0, 1), 0.0
    while batch.has_work:
        batch.next()
        held = {row.uid: row_arrays(row.session, target) for row in batch.rows}
        owners: dict[int, int] = {}
        for parts in held.values():
            for key, nbytes in {k: b for arrays in parts.values() for k, b in arrays.items()}.items():
                owners[key] = owners.get(key, 0) + 1
                if owners[key] > 1:
                    shared[key] = nbytes
        latest.update(held)
        if len(batch.rows) == c:  # per row of a full batch: fewer rows would share what all of them share
            active = max(active, (mx.get_active_memory() - base, len(batch.rows)), key=lambda a: a[0] / a[1])
            reported = max(reported, batch.health()["rows_bytes"] / len(batch.rows))
    mib = {part: statistics.mean(sum(b for k, b in parts[part].items() if k not in shared)
                                 for parts in latest.values()) / 2**20 for part in next(iter(latest.values()))}
    row = {"measure": "row-memory", "concurrency": c, "label": f"ours {variant.label}", "rows": len(latest),
           "tokens": args.max_tokens, "mib_per_row": mib, "own_mib_per_row": sum(mib.values()),
           "shared_mib": sum(shared.values()) / 2**20, "active_mib_per_row": active[0] / active[1] / 2**20,
           "health_mib_per_row": reported / 2**20}
    print(f"# memory per row ({c} rows, prompts of {min(map(len, pool[:c]))}-{max(map(len, pool[:c]))} tokens + "
          f"{args.max_tokens} generated): " + ", ".join(f"{k} {v:.2f}" for k, v in mib.items())
          + f" MiB (its own arrays: {row['own_mib_per_row']:.2f}); held by several rows: {row['shared_mib']:.2f} MiB;"
          f" MLX active memory above the batch's start: {row['active_mib_per_row']:.2f} MiB per row; health()'s "
          f"rows_bytes: {row['health_mib_per_row']:.2f} MiB per row", flush=True)
    return [row]


def row_arrays(session: Any, target: TargetAdapter) -> dict[str, dict[int, int]]:
    """A row's arrays (MLX's and numpy's) by what holds them, {id: bytes}; the target's and drafter's weights are
    not the row's (nn.Module), nor is the target. A batch's padded KV buffers and stacked recurrent states count as
    each row's share of them."""
    kv = [entry for entry in session.cache if target.is_attention_cache(entry)]
    recurrent = [entry for entry in session.cache if not target.is_attention_cache(entry)]
    parts = {"kv": kv, "recurrent": recurrent, "drafter": session.drafter,
             "pending": [session.pending_hidden, session.next_step]}
    held = {}
    for part, root in parts.items():
        held[part] = {id(a): a.nbytes for a in arrays_in(root)}
        if part in ("kv", "recurrent"):
            held[part].update({id(entry): entry.nbytes for entry in root if isinstance(entry, (RowKV, RowArrays))})
    return held


def arrays_in(root: Any) -> list[Any]:
    found, seen, todo = [], set(), deque([root])
    while todo:
        obj = todo.popleft()
        if id(obj) in seen or isinstance(obj, (nn.Module, TargetAdapter, RowsKV, RowsArrays)):  # counted per row
            continue
        seen.add(id(obj))
        if isinstance(obj, (mx.array, np.ndarray)):
            found.append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, deque)):
            todo.extend(obj)
        elif type(obj).__module__.split(".")[0] in STATE_OF and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return found
