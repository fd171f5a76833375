"""Continuous batching with trees: one forward verifying several rows' trees gives each row what its tree alone
gives; every row's output equals mlx-lm's greedy decoding of its prompt (and its solo output), whatever the other
rows do: very different prompt lengths, stop tokens inside a cycle, rows joining late and leaving early, root-only
rows beside deep off-first-rank trees, sampling with a seed, a prompt-cache hit."""

import copy
import itertools
import math
from collections import deque

import mlx.core as mx
import numpy as np

import pytest
from mlx.utils import tree_flatten
from tiny import FakeClock, assert_lossless, make_dflash, make_target, mlx_lm_greedy

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.drafting.oracle import ScriptedDrafter
from ddtree_mlx.engine.batch import BatchGenerator, batch_generate
from ddtree_mlx.engine.prompt_cache import PromptCache
from ddtree_mlx.models.registry import adapter_for
from ddtree_mlx.tree.draft_tree import DraftTree

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3", "llama"]
PROMPTS = [[3, 17, 42, 9, 100, 5, 61, 17, 42], [7, 8], list(range(5, 125)) + [9, 4, 77], [55, 21, 33, 90]]
NEW_TOKENS = 40
_targets, _references = {}, {}


def target(family, form="f32"):
    if (family, form) not in _targets:
        _targets[family, form] = make_target(family, seed=2, form=form)
    return _targets[family, form]


def reference(family, prompt, form="f32"):
    key = family, form, tuple(prompt)
    if key not in _references:
        _references[key] = mlx_lm_greedy(target(family, form), prompt, NEW_TOKENS)
    return _references[key]


class PromptOracle(ScriptedDrafter):
    """The oracle drafter, scripted per prompt: each row (a fork of it) drafts from its own prompt's true
    continuation, the true token often off the first rank or absent."""

    def __init__(self, truths: dict, block_size: int = 8, seed: int = 0):
        super().__init__([], block_size=block_size, rank_weights=(0.55, 0.2, 0.1, 0.15), seed=seed)
        self.truths = truths

    def reset(self, target, prompt_tokens):
        self.truth = list(prompt_tokens) + list(self.truths[tuple(prompt_tokens)])  # the root sits at truth[position]
        super().reset(target, prompt_tokens)


def oracle_for(family, prompts, form="f32"):
    return PromptOracle({tuple(p): reference(family, p, form).tokens for p in prompts})


def branched(results) -> bool:
    """Some row took a branch off the drafter's first choice, and some row's drafts paid (over 1.5 tokens a cycle)."""
    return (any(r["stats"].fast_path_cycles < r["stats"].cycles for r in results)
            and any(r["stats"].committed > 1.5 * r["stats"].cycles for r in results))


def run(batch: BatchGenerator, prompts, **request):
    """Insert every prompt, run to the end; per prompt its tokens, finish reason and stats, and the batches seen."""
    uids = [batch.insert(p, **{"max_new_tokens": NEW_TOKENS, "stop_token_ids": [], **request}) for p in prompts]
    out = {uid: {"tokens": [], "finish": None, "stats": None} for uid in uids}
    while batch.has_work:
        for response in batch.next():
            out[response.uid]["tokens"] += response.tokens
            out[response.uid]["finish"] = response.finish_reason
            out[response.uid]["stats"] = response.stats
    return [out[uid] for uid in uids]


# --- one forward over several rows' trees ---------------------------------------------------------------------------

def branching(rng, size, root):
    tree = DraftTree.root_only(root)
    while len(tree) < size:
        tree.add(int(rng.integers(len(tree))), int(rng.integers(1, 120)), 0)
    return tree


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_forest_verify_equals_each_tree_alone(family):
    """Logits, captured hidden states and committed caches (KV and recurrent) of each row equal its tree's verify
    alone, with rows after different prefixes, a root-only row among them."""
    model = target(family)
    adapter = adapter_for(model)
    rng = np.random.default_rng(0)
    prompts, sizes = PROMPTS[:3], [6, 1, 9]
    caches = []
    for prompt in prompts:
        cache = adapter.make_cache()
        adapter.prefill(prompt, cache, [0], chunk=64)
        caches.append(cache)
    trees = [branching(rng, size, prompt[-1]) for prompt, size in zip(prompts, sizes)]
    alone_caches = copy.deepcopy(caches)
    outs = adapter.verify_forest(trees, caches, [0], DDTreeConfig())
    for tree, out, cache, alone_cache in zip(trees, outs, caches, alone_caches):
        alone = adapter.verify_forest([tree], [alone_cache], [0], DDTreeConfig())[0]
        np.testing.assert_allclose(np.array(out.logits), np.array(alone.logits), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(out.hidden), np.array(alone.hidden), rtol=1e-4, atol=1e-4)
        path = mx.array(tree.path_to(len(tree) - 1))
        for capture, entry in zip(out.captures, cache):
            capture.commit(entry, path)
        for capture, entry in zip(alone.captures, alone_cache):
            capture.commit(entry, path)
        for entry, other in zip(cache, alone_cache):
            for (_, mine), (_, theirs) in zip(tree_flatten(entry.state), tree_flatten(other.state)):
                assert (mine is None) == (theirs is None)
                if mine is not None:
                        np.testing.assert_allclose(np.array(mine), np.array(theirs), rtol=1e-4, atol=1e-5)


# --- rows against mlx-lm ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [4, 12])
def test_every_row_equals_mlx_lm_greedy(family, budget):
    """Four rows, prompts of 2 to 123 tokens, oracle trees that branch: each row is mlx-lm's greedy output."""
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget=budget))
    results = run(batch, PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        assert_lossless(result["tokens"], reference(family, prompt), exact=True, label=f"batch {family} {budget}")
        assert result["finish"] == "length"
    assert batch.stats.largest_batch == 4 and batch.stats.batched_cycles > 0
    assert branched(results), "no row ever took a branch off the drafter's first choice"


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("method", ["ar", "ddtree"])
def test_rows_past_the_split_attention_threshold(family, method):
    """Long contexts on the CPU attend split (the buffers' columns in place, each row's masked to its own; the
    trees apart): a threshold of 16 tokens puts rows on both sides of it, some crossing it while they decode."""
    config = DDTreeConfig(tree_budget=6, exact_tree_attention=True, exact_tree_attention_min_prefix=16)
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), method=method, max_batch=4, config=config)
    results = run(batch, PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        assert_lossless(result["tokens"], reference(family, prompt), exact=True, label=f"split {family} {method}")
    assert batch.stats.batched_cycles > 0 and (method == "ar" or branched(results))


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("method", ["ar", "ddtree"])
def test_rows_whose_commits_rerun_the_target(family, method):
    """config.exact_commit (each commit re-runs the target over the accepted path): a batch's lone roots are
    verified, not written into the caches as plain steps (they were then written twice: every row left mlx-lm's
    tokens at once)."""
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS) if method == "ddtree" else None, method=method,
                           max_batch=4, config=DDTreeConfig(tree_budget=4, exact_commit=True))
    for prompt, result in zip(PROMPTS, run(batch, PROMPTS)):
        assert_lossless(result["tokens"], reference(family, prompt), exact=True, label=f"exact commit {method}")
    assert batch.stats.largest_batch == 4


@pytest.mark.parametrize("form", ["bf16", pytest.param("q4", marks=pytest.mark.slow)])
def test_rows_in_the_models_own_dtype(form):
    family = "qwen3_5"
    batch = BatchGenerator(target(family, form), oracle_for(family, PROMPTS, form), max_batch=4,
                           config=DDTreeConfig(tree_budget=6))
    for prompt, result in zip(PROMPTS, run(batch, PROMPTS)):
        assert_lossless(result["tokens"], reference(family, prompt, form), exact=False, label=f"batch {form}")


def test_dflash_rows_equal_their_solo_output_and_mlx_lm():
    """A real (random) DFlash drafter per row, forked from one: each row equals its solo generation too."""
    family = "qwen3_5"
    model = target(family)
    drafter = make_dflash(model)
    config = DDTreeConfig(tree_budget=6)
    batch = BatchGenerator(model, drafter, max_batch=3, config=config)
    for prompt, result in zip(PROMPTS[:3], run(batch, PROMPTS[:3])):
        solo = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt,
                                    max_new_tokens=NEW_TOKENS, stop_token_ids=[], config=config)
        assert result["tokens"] == solo["generated_token_ids"]
        assert_lossless(result["tokens"], reference(family, prompt), exact=True, label="batch dflash")


def test_stop_inside_a_cycle_and_rows_that_leave_early():
    """A stop token that a cycle commits mid-path ends that row there; a short max_new_tokens ends another; the
    rest carry on unchanged."""
    family = "llama"
    want = [reference(family, p).tokens for p in PROMPTS]
    stop = want[0][9]
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget=8))
    uids = [batch.insert(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop_token_ids=[stop]),
            batch.insert(PROMPTS[1], max_new_tokens=3, stop_token_ids=[]),
            batch.insert(PROMPTS[2], max_new_tokens=NEW_TOKENS, stop_token_ids=[])]
    got = {uid: [] for uid in uids}
    finish = {}
    while batch.has_work:
        for response in batch.next():
            got[response.uid] += response.tokens
            if response.finish_reason:
                finish[response.uid] = response.finish_reason
    first = want[0].index(stop)
    assert got[uids[0]] == want[0][: first + 1] and finish[uids[0]] == "stop"
    assert got[uids[1]] == want[1][:3] and finish[uids[1]] == "length"
    assert got[uids[2]] == want[2] and finish[uids[2]] == "length"


def test_a_row_joining_late_and_a_cancelled_row():
    """Rows join after other rows' cycles (max_batch 2 with four requests, one inserted mid-run), one is
    cancelled mid-generation: the others' outputs are their own."""
    family = "qwen3_5"
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=2,
                           config=DDTreeConfig(tree_budget=6))
    first = [batch.insert(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[]) for p in PROMPTS[:3]]
    got = {uid: [] for uid in first}
    for _ in range(3):
        for response in batch.next():
            got[response.uid] += response.tokens
    assert batch.health()["rows_bytes"] > 0  # two rows' caches (KV, recurrent, drafter context)
    late = batch.insert(PROMPTS[3], max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    got[late] = []
    batch.cancel(first[1])
    while batch.has_work:
        for response in batch.next():
            assert response.uid != first[1]
            got[response.uid] += response.tokens
    for uid, prompt in ((first[0], PROMPTS[0]), (first[2], PROMPTS[2]), (late, PROMPTS[3])):
        assert got[uid] == reference(family, prompt).tokens
    assert len(got[first[1]]) < NEW_TOKENS
    assert batch.stats.largest_batch == 2


def test_row_order_does_not_matter():
    family = "qwen3"
    config = DDTreeConfig(tree_budget=5)
    forward = batch_generate(target(family), oracle_for(family, PROMPTS), prompts=PROMPTS, config=config,
                             max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    backward = batch_generate(target(family), oracle_for(family, PROMPTS), prompts=PROMPTS[::-1], config=config,
                              max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert [r["generated_token_ids"] for r in forward] == [r["generated_token_ids"] for r in backward[::-1]]


def test_plain_rows_beside_tree_rows():
    """method="ar" batches plain steps (root-only trees in one forward); a batch of plain rows equals mlx-lm."""
    family = "qwen3_5"
    batch = BatchGenerator(target(family), method="ar", max_batch=4)
    for prompt, result in zip(PROMPTS, run(batch, PROMPTS)):
        assert result["tokens"] == reference(family, prompt).tokens
    assert batch.stats.batched_cycles > 0


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_queued_plain_steps(family, monkeypatch):
    """Plain batched steps are queued a step ahead (mlx-lm's batch loop): a row that stops with its next step
    queued, one cancelled then, one inserted then, one with log-probs and a prompt cache keeping a finished row's
    conversation (its queued step's token included) all stay mlx-lm's own decoding; the queue really ran."""
    model = target(family)
    queued = []
    real_queue = BatchGenerator.queue
    monkeypatch.setattr(BatchGenerator, "queue", lambda self, *a: queued.append(len(a[0])) or real_queue(self, *a))
    want = [reference(family, p).tokens for p in PROMPTS]
    stop = want[0][6]
    cache = PromptCache(64 << 20)
    batch = BatchGenerator(model, method="ar", max_batch=4, prompt_cache=cache)
    uids = [batch.insert(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop_token_ids=[stop]),
            batch.insert(PROMPTS[1], max_new_tokens=NEW_TOKENS, stop_token_ids=[]),
            batch.insert(PROMPTS[2], max_new_tokens=NEW_TOKENS, stop_token_ids=[], logprobs=2)]
    got, logprobs = {uid: [] for uid in uids}, []
    for step in range(NEW_TOKENS + 8):
        if step == 3:
            assert queued, "no plain step was queued"
            batch.cancel(uids[1])
            uids.append(batch.insert(PROMPTS[3], max_new_tokens=NEW_TOKENS, stop_token_ids=[]))
            got[uids[-1]] = []
        for response in batch.next():
            got[response.uid] += response.tokens
            logprobs += response.logprobs or []
        if not batch.has_work:
            break
    assert got[uids[0]] == want[0][: want[0].index(stop) + 1]
    assert len(got[uids[1]]) < NEW_TOKENS and got[uids[1]] == want[1][: len(got[uids[1]])]
    assert got[uids[2]] == want[2] and got[uids[3]] == want[3]
    assert [entry.token for entry in logprobs] == want[2] and max(queued) >= 2
    solo = generate_ddtree_once(target_model=model, prompt_tokens=PROMPTS[2], method="ar",
                                max_new_tokens=NEW_TOKENS, stop_token_ids=[], logprobs=2)
    np.testing.assert_allclose([entry.logprob for entry in logprobs], [e.logprob for e in solo["logprobs"]],
                               rtol=1e-4, atol=1e-4)
    resumed = PROMPTS[0] + got[uids[0]] + [5]  # the next turn of the stopped row's conversation hits the cache
    again = run(BatchGenerator(model, method="ar", max_batch=2, prompt_cache=cache), [resumed, PROMPTS[1]])
    assert again[0]["stats"].reused_prompt_tokens >= len(resumed) - 2
    assert again[0]["tokens"] == mlx_lm_greedy(model, resumed, NEW_TOKENS).tokens


def test_a_sampled_row_reproduces_its_solo_output():
    """Sampling with a seed: a row's draws use its own key, so beside greedy rows it draws what it draws alone."""
    family = "llama"
    model = target(family)
    config = DDTreeConfig(tree_budget=4)
    drafter = oracle_for(family, PROMPTS)
    solo = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=PROMPTS[0],
                                max_new_tokens=NEW_TOKENS, stop_token_ids=[], config=config, temperature=0.8, seed=7)
    batch = BatchGenerator(model, drafter, max_batch=3, config=config)
    sampled = batch.insert(PROMPTS[0], max_new_tokens=NEW_TOKENS, stop_token_ids=[], temperature=0.8, seed=7)
    for prompt in PROMPTS[1:3]:
        batch.insert(prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    got = []
    while batch.has_work:
        got += [t for r in batch.next() if r.uid == sampled for t in r.tokens]
    assert got == solo["generated_token_ids"]


def test_a_prompt_cache_hit_in_a_batch():
    family = "qwen3_5"
    model = target(family)
    cache = PromptCache(64 << 20)
    batch = BatchGenerator(model, oracle_for(family, PROMPTS), max_batch=4, prompt_cache=cache,
                           config=DDTreeConfig(tree_budget=6))
    run(batch, PROMPTS[:2])
    again = run(batch, [PROMPTS[0], PROMPTS[2]])
    assert again[0]["stats"].reused_prompt_tokens > 0
    assert again[0]["tokens"] == reference(family, PROMPTS[0]).tokens
    assert again[1]["tokens"] == reference(family, PROMPTS[2]).tokens


def test_automatic_sizes_in_a_batch(monkeypatch):
    """DDTREE_TREE_BUDGET=auto sizes the batch's trees together (on a fake clock): lossless, and trees verified."""
    FakeClock().install(monkeypatch)
    family = "qwen3_5"
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget="auto"))
    results = run(batch, PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        assert result["tokens"] == reference(family, prompt).tokens
    assert batch.stats.batched_cycles > 0


def test_lean_cycles_in_a_batch_are_lossless(monkeypatch):
    """Where the trees do not pay, the batch's lean cycles (each row's first node) commit drafted tokens and every
    row stays mlx-lm's greedy output."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    FakeClock().install(monkeypatch)
    family = "qwen3_5"
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget="auto"))
    batch.sizer.gain.update({rows: deque([-100.0]) for rows in range(2, 5)})  # the trees never pay (a probe in ~200 cycles)
    lean, record = [], BatchSizer.record

    def recording(self, drafted, rows, nodes, committed, *args, **kwargs):
        if drafted and self.leaning:
            lean.append((rows, nodes, committed))
        return record(self, drafted, rows, nodes, committed, *args, **kwargs)

    monkeypatch.setattr(BatchSizer, "record", recording)
    for prompt, result in zip(PROMPTS, run(batch, PROMPTS)):
        assert result["tokens"] == reference(family, prompt).tokens
    assert lean and all(nodes <= 2 * rows for rows, nodes, _ in lean)
    assert any(committed > rows for rows, _, committed in lean)  # drafted tokens accepted


def test_a_batch_tells_its_sizer_which_drafts_catch_up(monkeypatch):
    """A drafter catches up on what it has not read: its prompt at a row's first draft, the plain steps' tokens at
    a draft after them. The batch tells the sizer so for exactly the drafted cycles where some row had not drafted
    yet (`first`) or had not drafted in its last cycle (`behind`), and every drafted cycle reaches the sizer."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer
    from ddtree_mlx.engine.session import Session

    FakeClock().install(monkeypatch)
    family = "llama"
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget="auto"))
    told, cycles, last = [], [], {}
    record, forest, accept = BatchSizer.record, BatchGenerator.forest, Session.accept
    picks = itertools.count()

    def recording(self, drafted, *args, **kwargs):
        told.append((drafted, kwargs["first"], kwargs["behind"]))
        return record(self, drafted, *args, **kwargs)

    def accepting(self, drafted, *args):
        last[id(self)] = drafted.method
        return accept(self, drafted, *args)

    def cycle(self, rows):
        def drafts():
            return sum(row.session.stats.method_cycles.get("ddtree", 0) for row in rows)

        first = not all(row.session.caught_up for row in rows)
        behind = any(last.get(id(row.session)) != "ddtree" for row in rows)
        before, drafted = len(told), drafts()
        responses = forest(self, rows)
        if drafts() > drafted:
            cycles.append(((True, first, behind), told[before:]))
        return responses

    monkeypatch.setattr(BatchSizer, "record", recording)
    monkeypatch.setattr(BatchSizer, "pick", lambda self, method, rows: "ar" if next(picks) % 3 == 1 else method)
    monkeypatch.setattr(Session, "accept", accepting)
    monkeypatch.setattr(BatchGenerator, "forest", cycle)
    results = run(batch, PROMPTS)
    assert [r["tokens"] for r in results] == [reference(family, p).tokens for p in PROMPTS]
    kinds = {flags[1:] for flags, _ in cycles}
    assert {(True, True), (False, True), (False, False)} <= kinds  # first drafts, drafts after a plain step, steady
    assert all(sizer_heard == [flags] for flags, sizer_heard in cycles)


def test_a_catch_up_draft_is_judged_at_what_drafts_cost_and_only_if_it_paid():
    """A draft that caught the rows' drafters up is judged with its drafting at what the batch's other drafts cost
    (its verify as measured); on the prompts, only if it paid; before any other draft, not at all (but what its
    nodes cost is measured: that does not depend on drafting)."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    costs = small_costs()
    rate = 4 / 0.012
    sizer = BatchSizer(costs, plain=stepped(4, 0.012))
    catch_up, verify = 0.2, 0.012 + 0.004
    sizer.record(True, 4, 8, 7, seconds=catch_up + verify, drafting=catch_up, context=32, behind=True, first=True)
    assert sizer.gain == {} and sizer.scale == pytest.approx(1.0)  # its nodes' cost measured, its draft not
    sizer.record(True, 4, 8, 7, seconds=0.002 + verify, drafting=0.002, context=32)
    assert list(sizer.gain[4]) == pytest.approx([3 - rate * 0.006])
    sizer.record(True, 4, 8, 8, seconds=catch_up + verify, drafting=catch_up, context=32, behind=True, first=True)
    assert list(sizer.gain[4]) == pytest.approx([3 - rate * 0.006, 4 - rate * 0.006])
    sizer.record(True, 4, 8, 4, seconds=catch_up + verify, drafting=catch_up, context=32, behind=True, first=True)
    assert len(sizer.gain[4]) == 2  # it lost: no verdict
    # A draft after plain steps reads their tokens: priced the same, but its loss is a verdict.
    sizer.record(True, 4, 8, 4, seconds=catch_up + verify, drafting=catch_up, context=32, behind=True)
    assert list(sizer.gain[4])[-1] == pytest.approx(0 - rate * 0.006)
    assert list(sizer.draft_costs) == [4] and list(sizer.draft_costs[4].drafts) == [(1, 0.002)]  # not catch-ups


def test_a_stalled_drafted_cycle_is_judged_at_twice_the_usual():
    """A drafted cycle whose time past a plain step is more than STALL times the usual (one stalled verify) is
    judged at STALL times it: one stall at 4 rows otherwise sent a batch to plain steps for a whole wave."""
    from ddtree_mlx.engine.batch_sizing import STALL, BatchSizer

    costs = small_costs()
    rate = 4 / 0.012
    sizer = BatchSizer(costs, plain=stepped(4, 0.012))
    sizer.record(True, 4, 8, 7, seconds=0.012 + 0.004 + 0.002, drafting=0.002, context=32)
    usual = sizer.excess
    assert usual == pytest.approx(0.006)
    sizer.record(True, 4, 8, 7, seconds=0.1 + 0.002, drafting=0.002, context=32)
    assert list(sizer.gain[4])[-1] == pytest.approx(3 - rate * STALL * usual)


def test_batch_probes_come_as_far_apart_as_what_they_lose():
    """While neither the trees nor lean cycles pay, a lean probe comes every PROBE_EVERY plain cycles, or as far
    apart as keeps what lean lost (its worth below zero, in tokens) to PROBE_SHARE of the plain steps' tokens; while
    lean cycles pay, a tree probe, as far apart as the trees lost."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer
    from ddtree_mlx.engine.sizing import PROBE_EVERY, PROBE_SHARE

    costs = small_costs()
    sizer = BatchSizer(costs, plain=stepped(4, 0.012), gain={4: deque([-4.8])}, lean={4: deque([-2.4])})
    apart = round(2.4 / (PROBE_SHARE * 4))
    assert apart > PROBE_EVERY and sizer.every(4) == pytest.approx(apart)
    picks = [(sizer.pick("ddtree", 4), sizer.leaning) for _ in range(2 * apart)]
    assert [n for n, (pick, _) in enumerate(picks) if pick == "ddtree"] == [apart - 1, 2 * apart - 1]
    assert all(leaning == (pick == "ddtree") for pick, leaning in picks)  # the probes are lean cycles
    sizer.lean[4] = deque([0.5])
    apart = round(4.8 / (PROBE_SHARE * 4))
    assert sizer.every(4) == pytest.approx(apart)
    picks = [(sizer.pick("ddtree", 4), sizer.leaning) for _ in range(apart)]
    assert set(pick for pick, _ in picks) == {"ddtree"}
    assert [n for n, (_, leaning) in enumerate(picks) if not leaning] == [apart - 1]  # the trees' probe
    sizer.gain[4] = deque([-0.2])
    assert sizer.every(4) == PROBE_EVERY
    # A lean probe that fails at 3 rows, where only 4 rows' trees were judged, sends 3 rows' next probe further.
    sizer.lean[3] = deque([-0.1])
    sizer.leaning = True
    sizer.record(True, 3, 6, 3, seconds=0.02, drafting=0.002, context=32)
    apart = 2 * sizer.every(3)
    picks = [sizer.pick("ddtree", 3) for _ in range(math.ceil(apart))]
    assert sizer.backoff[3] == 2 and picks.index("ddtree") == math.ceil(apart) - 1


def test_where_trees_do_not_pay_a_batch_drafts_lean_before_plain_steps():
    """Where the sizer's trees did not pay, cycles are lean (each row's first node, drafted one level deep) and
    judged on their own; where those did not pay either, plain steps, with lean probes; from lean cycles that pay,
    tree probes; a tree probe that pays clears lean's verdict. Before any plain step, plain steps: every verdict
    weighs a cycle against them."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    costs = small_costs()
    assert BatchSizer(costs).pick("ddtree", 4) == "ar"
    sizer = BatchSizer(costs, plain=stepped(4, 0.012), gain={4: deque([-2.4])}, reach=5)
    assert sizer.pick("ddtree", 4) == "ddtree" and sizer.leaning and sizer.depth == 1
    rng = np.random.default_rng(0)
    trees = [random_best_first_tree(rng, size) for size in (0, 1, 4, 6)]
    kept = sizer.size(trees, 32)
    assert [len(k) for k in kept] == [1, 2, 2, 2] and all(depth == 1 for k in kept for depth in k.depths[1:])
    assert [k.tokens for k in kept] == [tree.tokens[:len(k)] for tree, k in zip(trees, kept)]  # the first-choice node
    sizer.record(True, 4, 7, 4, seconds=0.012 + 0.002 + 0.006, drafting=0.002, context=32)  # committed no node
    assert sizer.worth(4) == -2.4 and sizer.lean_worth(4) < 0 and sizer.reach == 5  # lean's verdict, not the trees'
    picks = [sizer.pick("ddtree", 4) for _ in range(math.ceil(sizer.every(4)) - 2)]
    assert set(picks) == {"ar"} and not sizer.leaning  # neither pays: plain steps until lean's probe
    assert sizer.pick("ddtree", 4) == "ddtree" and sizer.leaning and sizer.depth == 1
    sizer.record(True, 4, 8, 7, seconds=0.012 + 0.002 + 0.002, drafting=0.002, context=32)  # the lean probe paid
    assert sizer.lean_worth(4) > 0 and sizer.backoff[4] == 1
    picks = [(sizer.pick("ddtree", 4), sizer.leaning) for _ in range(round(sizer.every(4)))]
    assert set(picks[:-1]) == {("ddtree", True)} and picks[-1] == ("ddtree", False) and sizer.depth == 5
    sizer.record(True, 4, 12, 12, seconds=0.012 + 0.002 + 0.006, drafting=0.002, context=32)  # the trees' probe paid
    assert sizer.worth(4) > 0 and 4 not in sizer.lean


def test_a_verdict_is_the_median_of_recent_cycles():
    """What the trees (or lean cycles) were worth is the median of the last VERDICT cycles' worths: one noisy cycle
    does not turn a paying verdict, three do; a probe's verdict stands alone; the trees at a number of rows not judged
    yet carry on from the nearest one's, lean cycles start afresh."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    sizer = BatchSizer(small_costs(), plain=stepped(4, 0.012))
    timing = dict(seconds=0.012 + 0.002 + 0.004, drafting=0.002, context=32)
    paying, losing = 7, 4  # tokens committed: three drafted tokens accepted, or none
    for committed in (paying, paying, losing):
        sizer.record(True, 4, 8, committed, **timing)
    assert sizer.worth(4) > 0 and sizer.pick("ddtree", 4) == "ddtree" and not sizer.leaning
    for committed in (losing, losing):
        sizer.record(True, 4, 8, committed, **timing)
    assert sizer.worth(4) < 0 and sizer.pick("ddtree", 4) == "ddtree" and sizer.leaning
    sizer.leaning = False
    sizer.gain[4] = deque([-1.0] * 5)
    sizer.record(True, 4, 8, paying, **timing)  # a probe
    assert len(sizer.gain[4]) == 1 and sizer.worth(4) > 0
    sizer.record(True, 3, 6, 5, **timing)
    assert len(sizer.gain[3]) == 2
    sizer.lean[2] = deque([-1.0])  # lean cycles are judged at their own number of rows: untried at 4, worth a try
    assert sizer.lean_worth(4) == 0 and sizer.lean_worth(2) == -1.0


def test_plain_steps_are_priced_at_their_median_moved_along_the_curve():
    """A plain step's price is the median of the recent ones measured (one stall does not move it), at the nearest
    number of rows measured, moved to the rows asked along the calibration's curve."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    costs = small_costs()
    sizer = BatchSizer(costs)
    assert sizer.plain_seconds(4, 32) == pytest.approx(0.012)  # the calibration's price before any
    for seconds in (0.024, 0.025, 0.5, 0.023):
        sizer.record(False, 4, 4, 4, seconds=seconds, drafting=0.0, context=32)
    assert sizer.plain_seconds(4, 32) == pytest.approx(0.0245)
    assert sizer.plain_seconds(8, 32) == pytest.approx(0.0245 * 0.016 / 0.012)


def test_rows_joining_are_not_timed_with_their_first_cycle(monkeypatch):
    """Rows joining copy their caches into the batch's buffers: the sizer times the cycle after that copy (timed
    with it, the first cycle priced nodes at 4x here)."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer
    from ddtree_mlx.models.batch_cache import BatchCaches

    from ddtree_mlx.engine import batch as batch_module

    clock = FakeClock().install(monkeypatch)
    monkeypatch.setattr(batch_module, "time", clock)
    family = "llama"
    batch = BatchGenerator(target(family), oracle_for(family, PROMPTS), max_batch=4,
                           config=DDTreeConfig(tree_budget="auto"))
    batch.sizer.plain.update(stepped(4, 0.01))  # measured already: the first cycle drafts, and is timed
    join, record, timed = BatchCaches.join, BatchSizer.record, []

    def joining(self, caches):
        clock.advance(100.0)
        return join(self, caches)

    def recording(self, drafted, rows, nodes, committed, seconds, *args, **kwargs):
        timed.append(seconds)
        return record(self, drafted, rows, nodes, committed, seconds, *args, **kwargs)

    monkeypatch.setattr(BatchCaches, "join", joining)
    monkeypatch.setattr(BatchSizer, "record", recording)
    run(batch, PROMPTS)
    assert timed and max(timed) < 100.0


def test_the_batch_sizers_first_node_cost_stands_alone():
    """The first drafted cycle sets what nodes cost over the calibration's word at once (later ones average in):
    trees sized on the calibration's word alone at a batch's start measured nearly twice it."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer

    costs = small_costs()
    sizer = BatchSizer(costs, plain=stepped(4, 0.012))
    assert sizer.added(4, 4, 32) == pytest.approx(0.004)  # the calibration's word before any cycle
    sizer.record(True, 4, 8, 6, seconds=0.012 + 0.002 + 2 * 0.004, drafting=0.002, context=32)
    assert sizer.scale == pytest.approx(2.0) and sizer.added(4, 4, 32) == pytest.approx(0.008)
    sizer.record(True, 4, 8, 6, seconds=0.012 + 0.002 + 0.004, drafting=0.002, context=32)
    assert 1.0 < sizer.scale < 2.0


def test_bad_requests_fail_before_any_model_work():
    model = target("llama")
    with pytest.raises(ValueError, match="max_batch"):
        BatchGenerator(model, method="ar", max_batch=0)
    batch = BatchGenerator(model, method="ar", max_batch=2)
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        batch.insert([1, 10_000])
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch.insert([1, 2], max_new_tokens=0)
    assert not batch.has_work


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_rows_with_a_quantized_kv_cache(family):
    """kv_bits per row as mlx-lm means it (quantized from mid-prompt on): each row is mlx-lm's own decoding with
    the same quantized cache (a hybrid's recurrent states still held together, its attention caches apart)."""
    model = make_target(family, seed=4, head_dim=32)  # kv groups of 32 need a head size they divide
    options = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=8)
    wants = {tuple(p): mlx_lm_greedy(model, p, NEW_TOKENS, **options) for p in PROMPTS}
    drafter = PromptOracle({prompt: want.tokens for prompt, want in wants.items()})
    batch = BatchGenerator(model, drafter, max_batch=4, config=DDTreeConfig(tree_budget=6), **options)
    results = run(batch, PROMPTS)
    for prompt, result in zip(PROMPTS, results):
        assert_lossless(result["tokens"], wants[tuple(prompt)], exact=True, label="batch kv8")
    assert branched(results) and batch.stats.batched_cycles > 0


def test_one_row_at_a_time_is_stream_generate():
    """max_batch 1: each request runs alone, its cycles exactly stream_generate's (plain steps queued as mlx-lm)."""
    family = "qwen3_5"
    model = target(family)
    drafter = oracle_for(family, PROMPTS)
    config = DDTreeConfig(tree_budget=6)
    batch = BatchGenerator(model, drafter, max_batch=1, config=config)
    results = run(batch, PROMPTS[:2])
    for prompt, result in zip(PROMPTS[:2], results):
        solo = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt,
                                    max_new_tokens=NEW_TOKENS, stop_token_ids=[], config=config)
        assert result["tokens"] == solo["generated_token_ids"]
        assert result["stats"].cycles == solo["cycles"]
    assert batch.stats.batched_cycles == 0


def test_a_failed_prefill_fails_its_row_alone(monkeypatch):
    """A joining row whose prefill raises leaves the batch with finish_reason "error" and the exception; rows
    joining beside it and rows decoding finish unchanged."""
    family = "llama"
    batch = BatchGenerator(target(family), method="ar", max_batch=4)
    real = batch.target.prefill_chunks

    def failing(tokens, *args, **kwargs):
        if tokens == PROMPTS[1]:
            raise RuntimeError("boom")
        return (yield from real(tokens, *args, **kwargs))

    monkeypatch.setattr(batch.target, "prefill_chunks", failing)
    uids = [batch.insert(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[]) for p in PROMPTS[:3]]
    got, errors = {uid: [] for uid in uids}, {}
    while batch.has_work:
        for response in batch.next():
            got[response.uid] += response.tokens
            if response.error is not None:
                errors[response.uid] = (response.finish_reason, str(response.error))
    assert errors == {uids[1]: ("error", "boom")} and got[uids[1]] == []
    assert got[uids[0]] == reference(family, PROMPTS[0]).tokens and got[uids[2]] == reference(family, PROMPTS[2]).tokens


def test_a_draft_level_is_priced_by_a_line_through_recent_drafts():
    """DraftCost's line equals the Theil-Sen line computed directly over its last WINDOW drafts (median of the
    pairwise slopes, median height); the slope of drafts that grow with depth is found though a quarter of them
    stalled; until PAIRS pairs differ in depth, a level costs the prior."""
    from ddtree_mlx.engine.batch_sizing import PAIRS, WINDOW, DraftCost

    rng = np.random.default_rng(5)
    depths = rng.integers(1, 9, size=WINDOW + 8)
    seconds = 0.008 + 0.003 * depths + rng.normal(0, 0.0005, size=len(depths))
    stalled = rng.random(len(depths)) < 0.25
    seconds[stalled] += rng.uniform(0.05, 0.12, size=int(stalled.sum()))
    cost = DraftCost.first(int(depths[0]), float(seconds[0]))
    for depth, took in zip(depths[1:], seconds[1:]):
        cost.add(int(depth), float(took))
    recent_depths, recent = depths[-WINDOW:], seconds[-WINDOW:]
    slopes = [(recent[j] - recent[i]) / (recent_depths[j] - recent_depths[i])
              for i, j in itertools.combinations(range(WINDOW), 2) if recent_depths[i] != recent_depths[j]]
    assert cost.prior == pytest.approx(seconds[0] / (2 * depths[0]))
    assert cost.level == pytest.approx(np.median(slopes))
    assert cost.level == pytest.approx(0.003, rel=0.2)
    assert cost.at(6) == pytest.approx(np.median(recent - cost.level * recent_depths) + 6 * cost.level)
    assert cost.at(6) == pytest.approx(0.008 + 0.018, rel=0.1)
    few = DraftCost.first(6, 0.024)  # prior: 2 ms a level
    few.add(3, 0.021)
    few.add(6, 0.024)
    assert PAIRS > 2 and few.level == pytest.approx(0.002) and few.at(3) == pytest.approx(0.018)  # 2 pairs
    few.add(3, 0.021)
    assert few.level == pytest.approx(0.001)  # 4 pairs, 1 ms a level apart


def test_batch_sizer_picks_the_best_trees_of_every_row():
    """The sizer's choice equals the brute-force best over every combination of rows' trees (ancestor-closed
    subsets of each row's best-first tree), for the value it maximizes: expected tokens less the nodes' time and
    the drafting of the levels they reach, at the going rate. A level's price matters: it cuts some deep trees."""
    from ddtree_mlx.engine.batch_sizing import BatchSizer, DraftCost

    rng = np.random.default_rng(3)
    costs = small_costs()
    cut = 0
    for trial in range(30):
        trees = [random_best_first_tree(rng, int(rng.integers(0, 6))) for _ in range(3)]
        sizer = BatchSizer(costs, plain=stepped(3, float(rng.uniform(0.01, 0.1))))
        level = float(rng.choice([0.0, 0.002, 0.01]))
        sizer.draft_costs[3] = DraftCost(prior=level)
        kept = sizer.size(trees, 32)
        rate = sizer.rate(3, 32)

        def value(choice):  # a subset of nodes per row
            nodes = [node for subset in choice for node in subset]
            gained = sum(np.exp(tree.scores[n]) for tree, subset in zip(trees, choice) for n in subset)
            depth = max((tree.depths[n] for tree, subset in zip(trees, choice) for n in subset), default=0)
            return gained - rate * (float(sizer.added(3, len(nodes), 32)) + level * depth)

        best = max(itertools.product(*[closed_subsets(tree) for tree in trees]), key=value)
        chosen = [kept_nodes(tree, k) for tree, k in zip(trees, kept)]
        assert value(chosen) == pytest.approx(value(best)), (trial, chosen, best)
        unpriced = BatchSizer(costs, plain=sizer.plain)
        cut += max(max(k.depths) for k in kept) < max(max(k.depths) for k in unpriced.size(trees, 32))
        assert sizer.reach == max(max(k.depths) for k in kept) + 1  # the next drafts: a level past the deepest kept
    assert cut > 0


def random_best_first_tree(rng: np.random.Generator, size: int) -> DraftTree:
    tree = DraftTree.root_only(1)
    probs = np.sort(rng.uniform(0.05, 0.95, size=size))[::-1]
    for p in probs:  # best first: each node's path probability no higher than the one before
        tree.add(int(rng.integers(len(tree))), len(tree), 0, float(np.log(p)))  # tokens name their nodes
    return tree


def closed_subsets(tree: DraftTree) -> list[tuple[int, ...]]:
    """Every set of draft nodes that holds each member's parent (or the root)."""
    nodes = range(1, len(tree))
    subsets = itertools.chain.from_iterable(itertools.combinations(nodes, k) for k in range(len(tree)))
    return [s for s in subsets if all(tree.parents[n] == 0 or tree.parents[n] in s for n in s)]


def kept_nodes(tree: DraftTree, kept: DraftTree) -> tuple[int, ...]:
    """The nodes of `tree` that `kept` holds, found by their root paths' tokens."""
    spelled = {tuple(tree.tokens[m] for m in tree.path_to(n)): n for n in range(1, len(tree))}
    return tuple(sorted(spelled[tuple(kept.tokens[m] for m in kept.path_to(n))] for n in range(1, len(kept))))


def stepped(rows: int, seconds: float) -> dict:
    """A batch sizer's plain steps: one of `seconds` at `rows` rows."""
    return {rows: deque([seconds])}


def small_costs():
    """A verify curve for the sizers' unit tests: 10 ms for one row, each row dearer past 4."""
    from ddtree_mlx.engine.calibration import VerifyCosts

    return VerifyCosts((1, 2, 4, 8, 16, 32), (0.010, 0.011, 0.012, 0.016, 0.024, 0.040))
