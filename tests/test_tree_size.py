"""DDTREE_TREE_BUDGET=auto: the size chosen vs brute force over every tree, what the acceptance estimate learns, when
drafting stops and restarts, and what the cycles' timings correct."""

import numpy as np
import pytest
from test_tree import all_prefixes, random_candidates

from ddtree_mlx.engine import acceptance
from ddtree_mlx.engine import sizing as tree_size
from ddtree_mlx.engine.acceptance import CLAIM_WORTH, MEMORY, Acceptance
from ddtree_mlx.engine.calibration import VerifyCosts
from ddtree_mlx.engine.sizing import TreeSizer
from ddtree_mlx.tree.build import Candidates, build_tree
from ddtree_mlx.tree.draft_tree import DraftTree

SHORT = 32  # the calibration's own context: its curve as measured

# The probing and peeking schedule these tests are written for, set on the sizer so that they check how it follows
# a schedule, not how sizing.py happens to be tuned: a probe every EVERY cycles at least, or as far apart as keeps
# probes to SHARE of the time, at most BACKOFF times further after failures; peeks by drafters under PEEK of a cycle.
EVERY, SHARE, BACKOFF, PEEK = 8, 0.03, 8, 0.05


@pytest.fixture(autouse=True)
def schedule(monkeypatch):
    for name, value in (("PROBE_EVERY", EVERY), ("PROBE_SHARE", SHARE), ("PROBE_BACKOFF", BACKOFF),
                        ("PEEK_SHARE", PEEK)):
        monkeypatch.setattr(tree_size, name, value)


def prefix_closed_sets(candidates):
    """Every set of ranked prefixes whose every prefix is in it too (the trees a draft can make)."""
    prefixes = dict(all_prefixes(candidates))
    keys = list(prefixes)
    for mask in range(1 << len(keys)):
        chosen = {keys[i] for i in range(len(keys)) if mask >> i & 1}
        if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
            yield chosen, prefixes


@pytest.mark.parametrize("seed", range(12))
def test_the_chosen_size_is_the_best_tree_over_every_tree(seed):
    rng = np.random.default_rng(seed)
    candidates = random_candidates(rng, 3, 2)
    # A convex or concave verify curve, in seconds, and a decoding rate in tokens per second.
    sizes = (1, 2, 4, 8, 15)
    seconds = tuple(0.01 * (1 + rng.uniform(0.02, 0.4) * (s - 1) ** rng.uniform(0.6, 1.4)) for s in sizes)
    sizer = TreeSizer(VerifyCosts(sizes, seconds), cap=14)
    sizer.tokens, sizer.seconds = rng.uniform(1.5, 3.0), 0.01
    calibrated = sizer.acceptance.calibrate(candidates)
    chosen = sizer.size(build_tree(calibrated, 0, sizer.cap), SHORT)
    value = lambda nodes, total: 1 + total - sizer.rate * sizer.cycle_seconds(nodes, SHORT)  # noqa: E731
    best = max(value(len(s), sum(np.exp(p[r]) for r in s)) for s, p in prefix_closed_sets(calibrated))
    picked = sum(np.exp(chosen.scores[1:]))  # path probabilities (tests/test_tree.py checks the scores)
    assert value(len(chosen) - 1, picked) == pytest.approx(best)


def test_unlikely_nodes_are_cut_and_free_ones_kept(monkeypatch):
    monkeypatch.setattr(acceptance, "CLAIM_WORTH", 1.0)  # the drafter's word as it is
    flat = Candidates(np.arange(12).reshape(3, 4), np.full((3, 4), np.log(1 / 5000)))
    dear = TreeSizer(VerifyCosts((1, 2), (0.01, 0.02)), cap=8)
    assert len(dear.size(build_tree(dear.acceptance.calibrate(flat), 0, 8), SHORT)) == 1  # a plain step
    sure = Candidates(np.arange(12).reshape(3, 4), np.log(np.tile([0.97, 0.01, 0.01, 0.01], (3, 1))))
    free = TreeSizer(VerifyCosts((1, 2), (0.01, 0.01)), cap=8)
    assert len(free.size(build_tree(free.acceptance.calibrate(sure), 0, 8), SHORT)) == 9
    assert len(dear.size(build_tree(dear.acceptance.calibrate(sure), 0, 8), SHORT)) == 1  # 0.97 token for a token's time
    noisy = TreeSizer(VerifyCosts((1, 2), (0.01, 0.02)), cap=8)
    noisy.step_scale = 1.2  # queued plain steps measured slower than drafted ones (noise): still no gain in a root
    assert len(noisy.size(build_tree(noisy.acceptance.calibrate(flat), 0, 8), SHORT)) == 1 and noisy.last_gain == 0
    half = TreeSizer(VerifyCosts((1, 2), (0.01, 0.015)), cap=8)
    assert len(half.size(build_tree(half.acceptance.calibrate(sure), 0, 8), SHORT)) == 4  # the likely chain only


def one_node_tree(candidates):
    tree = DraftTree.root_only(0)
    tree.add(0, int(candidates.tokens[0, 0]), 0, float(candidates.log_probs[0, 0]))
    return tree


def learn(acceptance, candidates, tree, path):
    """One verified tree's evidence, by definition: every node whose parent is on the accepted path was a trial,
    accepted if it is on the path too (one fade per cycle)."""
    acceptance.fade()
    on_path = set(path)
    acceptance.observe(candidates, tree, [n for n in range(1, len(tree)) if tree.parents[n] in on_path], on_path)


MISS = -1  # a token no drafter proposes


def drafted_cycle(sizer, candidates, text, seconds, drafting, context=SHORT):
    """A drafted cycle as Session.cycle runs it, the target's text after the root being `text`: the sized tree
    chosen, the tokens it commits produced (the accepted path's and the bonus), the cycle recorded."""
    tree = sizer.choose(candidates, 0, context)
    node, produced = 0, []
    for token in text:
        produced.append(token)
        node = tree.children[node].get(token)
        if node is None:
            break
    sizer.produced(produced)
    sizer.record(candidates, tree, len(produced), seconds, drafting, context)
    return tree, produced


def test_acceptance_learns_what_the_drafter_is_worth():
    """A drafter that says 0.9 and is right 30% of the time at depth 1: after a few hundred cycles its 0.9 is
    worth ~0.3, and calibrating keeps every depth's order (the heap needs it)."""
    rng = np.random.default_rng(0)
    acceptance = Acceptance()
    candidates = Candidates(np.array([[5, 6, 7], [8, 9, 10]]), np.log([[0.9, 0.05, 0.01], [0.6, 0.3, 0.02]]))
    before = np.exp(acceptance.calibrate(candidates).log_probs)
    assert before == pytest.approx(CLAIM_WORTH * np.exp(candidates.log_probs))  # no evidence yet: its word, discounted
    tree = one_node_tree(candidates)
    for _ in range(600):
        learn(acceptance, candidates, tree, [0, 1] if rng.random() < 0.3 else [0])
    after = np.exp(acceptance.calibrate(candidates).log_probs)
    assert after[0, 0] == pytest.approx(0.3, abs=0.08)
    assert after[1, 0] < 0.4  # depth 2 was never tried: it takes depth 1's lesson (the drafter overrates)
    assert all(np.all(np.diff(row) <= 0) for row in after)


def test_a_claim_seen_once_or_never_borrows_what_the_drafter_overstates_elsewhere():
    """Prompt lookup's 0.985 on a single long match, after its 0.6s were right 10% of the time: worth far less
    than its word (a 7-node tree on it cost seven plain steps for one token on the reference BLAS), even once it
    was right once. A drafter that underrates keeps its word where nothing was seen."""
    rng = np.random.default_rng(0)
    candidates = Candidates(np.array([[5, 6, 7]]), np.log([[0.6, 0.3, 0.01]]))
    sure = Candidates(np.array([[5, 6, 7]]), np.log([[0.985, 0.01, 0.005]]))
    over, under = Acceptance(), Acceptance()
    for _ in range(200):
        learn(over, candidates, one_node_tree(candidates), [0, 1] if rng.random() < 0.1 else [0])
        learn(under, candidates, one_node_tree(candidates), [0, 1] if rng.random() < 0.9 else [0])
    assert np.exp(over.calibrate(sure).log_probs[0, 0]) < 0.2
    learn(over, sure, one_node_tree(sure), [0, 1])
    assert np.exp(over.calibrate(sure).log_probs[0, 0]) < 0.8
    assert np.exp(under.calibrate(sure).log_probs[0, 0]) == pytest.approx(0.985, abs=0.005)


def test_drafting_stops_when_it_does_not_pay_and_is_probed():
    """Drafts cost 1.2 plain steps and are never accepted: plain steps, with a probe once a draft costs SHARE of
    the plain steps since the last one (40 here, more than EVERY), twice that after each probe that failed (up to
    BACKOFF times). When the text changes, the next probe brings drafting back to stay."""
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.011)), cap=8)
    candidates = Candidates(np.array([[5, 6]]), np.log([[0.5, 0.1]]))
    step, draft = 0.01, 0.012
    picks = []
    for _ in range(1500):
        picks.append(sizer.pick("ddtree"))
        if picks[-1] == "ar":
            sizer.record(None, DraftTree.root_only(0), 1, step, 0.0, SHORT)
            continue
        drafted_cycle(sizer, candidates, [MISS], draft + step, draft)
    # The first draft catches up on the prompt, a cost of the generation's; the second shows drafts cost more
    # than they bring.
    assert picks[:3] == ["ddtree", "ddtree", "ar"] and sizer.first == sizer.drafting == draft
    probes = [i for i, pick in enumerate(picks) if pick == "ddtree"]
    waits = np.diff(probes[1:]) - 1  # plain steps between probes
    first = draft / SHARE / step  # 40 cycles: a probe costs 3% of the time
    assert first > EVERY
    assert len(waits) > 4  # past the backoff's cap
    assert waits.tolist() == pytest.approx([first * min(2**k, BACKOFF) for k in range(len(waits))], abs=1)
    assert len(probes) * draft < 1.5 * SHARE * len(picks) * step  # what probing cost, roughly its share
    # The text changes: every draft is accepted. The next probe brings drafting back to stay.
    candidates = Candidates(np.arange(8)[:, None], np.log(np.full((8, 1), 0.99)))
    picks = []
    for _ in range(int(2 * BACKOFF * first)):
        picks.append(sizer.pick("ddtree"))
        if picks[-1] == "ddtree":
            drafted_cycle(sizer, candidates, list(range(9)), draft + 0.012, draft)
        else:
            sizer.record(None, DraftTree.root_only(0), 1, step, 0.0, SHORT)
    start = picks.index("ddtree")
    assert start <= BACKOFF * first + 1 and set(picks[start:]) == {"ddtree"}
    assert sizer.backoff == 1  # a probe that paid: back to probing often


def generations(node, lengths, step=0.01, draft=0.009, first=0.044, cap=32):
    """Generations one after another (each carrying the last one's sizer, as tree_sizer_for does), driven as
    Session.cycle drives the sizer, with drafts that are never accepted: nodes cost `node` of a plain step, a draft
    `draft` seconds and a generation's first `first` (the shipped drafter on the reference BLAS: 0.9 and 4.4 plain
    steps). Per generation: seconds spent drafting (peeks, which run beside a queued step, not counted), seconds in
    all, drafted cycles and peeks."""
    costs = VerifyCosts((1, 2), (step, step * (1 + node)))
    candidates = Candidates(np.array([[5, 6]] * 7), np.log([[0.9, 0.05]] * 7))  # sure of itself, always wrong
    last, runs = None, []
    for length in lengths:
        sizer = TreeSizer(costs, cap=cap, context=SHORT)
        if last is not None:
            sizer.carry(last, length)
        drafting = seconds = drafts = peeks = 0
        for _ in range(length - 1):  # prefill gave the first token
            if sizer.pick("ddtree") == "ar":
                sizer.produced([MISS])
                if sizer.can_peek():
                    sizer.choose(candidates, 0, SHORT)
                    sizer.peeked(draft)
                    peeks += 1
                sizer.record(None, DraftTree.root_only(0), 1, step, 0.0, SHORT)
                seconds += step
                continue
            cost = first if sizer.drafts == 0 else draft
            assert len(drafted_cycle(sizer, candidates, [MISS], cost + step, cost)[0]) == 1  # no node pays here
            drafting, seconds, drafts = drafting + cost, seconds + cost + step, drafts + 1
        runs.append((drafting, seconds, drafts, peeks))
        last = sizer
    return runs


@pytest.mark.parametrize("node", [1.1, 1.0 + 1e-6])
def test_where_a_node_costs_a_plain_step_nothing_is_drafted(node):
    """The reference BLAS, where a tree node costs about a plain step (calibrated on a busy machine: more): even a
    draft whose every node is accepted is no faster than plain steps, so nothing is drafted, probed or peeked, from
    a process's first generation on, whatever the drafter costs."""
    for draft in (0.009, 0.0):  # the shipped drafter; a free one (prompt lookup) would peek at every step
        runs = generations(node, [64, 256, 64], draft=draft, first=draft or 0.044)
        assert [drafts for _, _, drafts, _ in runs] == [0, 0, 0] and [peeks for *_, peeks in runs] == [0, 0, 0]


def test_where_a_perfect_draft_would_be_barely_faster_drafting_is_looked_for_at_a_tiny_share():
    """A node at 0.9 of a plain step (the reference BLAS on a quiet machine), drafts at 0.9 steps, 4.4 for a
    generation's first: with every node of a 32-node tree accepted a cycle would be ~7% faster than plain steps,
    so probes take that much of PROBE_SHARE (~0.2% of the time, not 3%). The process's first generation drafts
    twice (its first draft is no verdict) and learns what drafts cost; in the generations after it, short (64
    tokens) or long (256), drafting takes under 1% of the time (at the full share: 3% of each 256-token one's).
    Where nodes are cheap, the full share stands."""
    runs = generations(0.9, [64] + [64, 256] * 4)
    assert runs[0][2] == 2
    assert sum(drafting for drafting, *_ in runs[1:]) < 0.01 * sum(seconds for _, seconds, *_ in runs[1:])
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.019)), cap=32)
    sizer.drafting = 0.009
    sizer.reckon()
    assert sizer.upside == pytest.approx(33 * 0.01 / (0.01 + 32 * 0.009 + 0.009) - 1)
    assert sizer.probe_share() == pytest.approx(SHARE * sizer.upside)
    cheap = TreeSizer(VerifyCosts((1, 2), (0.01, 0.011)), cap=32)  # OpenBLAS: a node at a tenth of a step
    cheap.drafting = 0.009
    cheap.reckon()
    assert cheap.upside > 1 and cheap.probe_share() == SHARE


def test_what_a_draft_costs_carries_over_and_where_drafts_are_dear_whether_they_paid():
    """A generation's first draft (its catch-up on the prompt) cost two plain steps, later ones half a step, and
    drafting did not pay: a short next generation (its first draft would cost more than its share for probes)
    starts with plain steps and probes once the share of that first draft is earned; a long one finds out for
    itself at once, as a first generation does. Drafts that paid are drafted at once."""
    costs = VerifyCosts((1, 2), (0.01, 0.011))
    last = TreeSizer(costs, cap=8)
    last.drafting, last.first, last.gain, last.backoff = 0.005, 0.02, -0.3, BACKOFF

    def next_generation(max_new_tokens):
        sizer = TreeSizer(costs, cap=8)
        sizer.carry(last, max_new_tokens)
        assert sizer.acceptance is last.acceptance and (sizer.drafting, sizer.first, sizer.backoff) == (0.005, 0.02, 1)
        return sizer

    wait = 0.02 / SHARE / 0.01  # plain cycles a probe's cost buys: 66.7
    once = TreeSizer(costs, cap=8)  # a generation that drafted once (its first draft) and stopped: not free to probe
    once.first, once.plain, once.drafts = 0.02, 0.01, 1
    assert once.probe_every() == pytest.approx(wait) and not once.can_peek()
    once.drafting = 0.005  # later drafts measured: cheaper than the first
    assert once.probe_every() == pytest.approx(wait / 4)
    short, long = next_generation(int(wait) - 1), next_generation(int(wait) + 1)
    assert not short.will_draft() and long.pick("ddtree") == "ddtree" and not long.probing
    for _ in range(int(wait)):  # 66 plain steps
        assert short.pick("ddtree") == "ar"
        short.record(None, DraftTree.root_only(0), 1, 0.01, 0.0, SHORT)
    assert short.pick("ddtree") == "ddtree" and short.probing  # the first probe, once its share is earned
    last.gain = 0.2
    assert next_generation(1).pick("ddtree") == "ddtree"


def test_the_cycles_correct_the_curve():
    """Trees take three times what was calibrated (their walk and commit, a busy machine), a drafted cycle that
    verified the root alone 1.2 times. The scales find both, and the sizer turns to plain steps."""
    sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.0125, 0.02)), cap=4)
    candidates = Candidates(np.array([[5], [6], [7], [8]]), np.log(np.full((4, 1), 0.5)))
    sizes = []
    for _ in range(120):
        tree = sizer.choose(candidates, 0, SHORT)
        sizes.append(len(tree) - 1)
        slower = 1.2 if len(tree) == 1 else 3.0
        produced = [5, 6, 7, 8][: len(tree) // 2] + [MISS]  # half the chain: what 0.5 per node gives
        sizer.produced(produced)
        seconds = 0.001 + slower * float(sizer.costs.at(len(tree)))
        sizer.record(candidates, tree, len(produced), seconds, 0.001, SHORT)
    assert sizer.root_scale == pytest.approx(1.2, rel=0.02) and sizer.step_scale == 1.0  # no plain step ran
    assert sizer.cycle_seconds(0, SHORT) == pytest.approx(0.012, 0.02)
    assert sizer.scale > 1.5  # learned until trees stopped paying, then no tree ran to teach it more
    assert sizes[0] > 0 and sizes[-10:] == [0] * 10  # trees at first, plain steps once their cost is known


def test_a_long_context_prices_every_node_before_any_cycle():
    """The calibration's per-token costs: after 6,000 tokens every node attends over them all, so a draft worth
    verifying at a short context is a plain step at a long one, from the first cycle on."""
    costs = VerifyCosts((1, 2, 9), (0.07, 0.072, 0.09), per_token=(1.2e-5, 1.3e-5, 4e-6))
    # A tree of 3 is verified as one of 9 (the next size measured), whose every node attends over the context.
    assert costs.at(np.array([1, 3]), 6032) == pytest.approx([0.07 + 6000 * 1.2e-5, 0.09 + 6000 * (1.3e-5 + 9 * 4e-6)])
    chain = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.35)))
    sizer = TreeSizer(costs, cap=4)
    tree = build_tree(sizer.acceptance.calibrate(chain), 0, 4)
    assert len(sizer.size(tree, SHORT)) > 1
    long = TreeSizer(costs, cap=4, context=6032)  # a 6K-token prompt: decoding starts at a plain step's rate there
    assert long.rate == pytest.approx(1 / (0.07 + 6000 * 1.2e-5))
    assert len(long.size(tree, 6032)) == 1


def test_drafting_is_charged_the_plain_steps_queueing():
    """A free drafter whose drafts are worth little (p = 0.02, never accepted): drafting goes on while a drafted
    cycle costs what a queued plain step does, and stops once not queueing costs 5 ms a cycle."""
    candidates = Candidates(np.array([[5]]), np.log([[0.02]]))
    picks = {}
    for queueing in (0.0, 0.005):
        sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.011)), cap=1)
        picks[queueing] = []
        for _ in range(40):
            picks[queueing].append(sizer.pick("ddtree"))
            if picks[queueing][-1] == "ar":
                sizer.record(None, DraftTree.root_only(0), 1, 0.01, 0.0, SHORT)
                continue
            drafted_cycle(sizer, candidates, [MISS], 0.01 + queueing, 0.0)
    assert set(picks[0.0]) == {"ddtree"}
    assert picks[0.005][20:].count("ar") >= 15


def test_the_curve_extends_past_its_last_point_and_never_falls():
    costs = VerifyCosts((1, 3, 5, 9), (0.01, 0.012, 0.016, 0.024))
    assert costs.at(np.array([1, 2, 5, 13])) == pytest.approx([0.01, 0.012, 0.016, 0.032])  # upper half's slope
    noisy = VerifyCosts((1, 2, 3, 5), (0.01, 0.008, 0.012, 0.011))  # timing noise: bigger trees looked cheaper
    assert np.all(np.diff(noisy.at(np.arange(1, 12))) >= 0) and noisy.at(11) > noisy.at(5)
    assert noisy.at(2) == pytest.approx(0.01)  # a tree costs at least a plain step


def test_trees_are_verified_at_the_sizes_worth_verifying():
    """OpenBLAS multiplies 4, 8 or 16 rows faster than 3, 5 or 9 (this CPU's measured curve, ms): a tree is
    verified as the smallest size that holds it and is not dearer than a bigger one, and costs what that size
    does; past the grid, trees are verified as they are."""
    costs = VerifyCosts((1, 2, 3, 4, 5, 8, 9, 16, 17), (64, 66.5, 80, 64.1, 76.6, 74.1, 88.9, 88, 101.8))
    assert costs.rows(np.arange(1, 20)).tolist() == [1, 4, 4, 4, 8, 8, 8, 8] + [16] * 8 + [17, 18, 19]
    assert costs.at(np.array([2, 3, 5, 9])) == pytest.approx([64.1, 64.1, 74.1, 88])
    assert np.all(np.diff(costs.at(np.arange(1, 40))) >= 0)
    # After 6,000 tokens every row attends over them (ms per context token as measured: step, tree, per node):
    # padding costs more than it saves, and trees are verified as they are.
    costs = VerifyCosts(costs.sizes, costs.seconds, per_token=(0.0109, 0.0073, 0.0039))
    assert costs.rows(np.array([2, 3, 4, 5]), 6032).tolist() == [2, 3, 4, 5]
    assert costs.rows(np.array([2, 3, 4, 5])).tolist() == [4, 4, 4, 8]
    sizer = TreeSizer(costs, cap=16)  # a sure chain: the 3 nodes that fill a 4-node tree cost what 1 would
    chain = Candidates(np.arange(16)[:, None], np.log(np.full((16, 1), 0.9)))
    assert len(sizer.size(build_tree(sizer.acceptance.calibrate(chain), 0, 16), SHORT)) in (4, 8, 16)


@pytest.mark.parametrize("cap", [1, 3])
def test_the_cap_bounds_the_tree(cap):
    sure = Candidates(np.arange(12).reshape(3, 4), np.log(np.tile([0.97, 0.01, 0.01, 0.01], (3, 1))))
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.01)), cap=cap)
    assert len(sizer.size(build_tree(sizer.acceptance.calibrate(sure), 0, cap), SHORT)) == cap + 1


def test_what_drafts_were_worth_carries_over_to_the_next_generation():
    """A generation of a few dozen tokens is too short to learn acceptance: the next one with the same kind of
    drafter on the same target starts from what earlier ones learned; another kind of drafter starts afresh."""
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import PromptLookupDrafter, generate_ddtree_once
    from ddtree_mlx.engine.generate import LEARNED

    model, prompt = make_target("llama"), [3, 17, 42, 9, 100, 5]
    truth = prompt + greedy_reference(model, prompt, 24)
    run = lambda drafter: generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt,  # noqa: E731
                                               max_new_tokens=24, stop_token_ids=[], tree_budget="auto")
    run(OracleDrafter(truth))
    [(kind, first)] = LEARNED.items()
    learned, tried = first.acceptance, first.acceptance.trials.sum()
    assert tried > 0 and kind[1:] == ("ScriptedDrafter", 8, ())
    run(OracleDrafter(truth, seed=1))
    assert len(LEARNED) == 1 and LEARNED[kind] is not first and LEARNED[kind].acceptance is learned
    assert learned.trials.sum() > tried * MEMORY ** 40  # the same lessons, added to
    assert LEARNED[kind].drafting > 0  # and what a draft costs here
    run(PromptLookupDrafter())
    assert len(LEARNED) == 2


def test_a_draft_sized_to_the_root_alone_still_teaches_what_its_nodes_were_worth(monkeypatch):
    """Nodes priced at 0.9 of a step each (a long context on a CPU): every draft's best tree is the root alone, so
    nothing is verified; the drafted trees are followed as peeks are, and what the target produced after them is
    learned (without it, acceptance learned on other text could never be corrected within a generation)."""
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.engine import calibration
    from ddtree_mlx.engine.generate import LEARNED

    monkeypatch.setattr(calibration, "verify_costs", lambda target, config=None: VerifyCosts((1, 2), (0.01, 0.019)))
    monkeypatch.setattr(tree_size, "PROBE_SHARE", 100.0)  # probes every EVERY cycles, however long drafts take
    model, prompt = make_target("llama"), [3, 17, 42, 9, 100, 5]
    truth = prompt + greedy_reference(model, prompt, 40)
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=prompt,
                                  max_new_tokens=40, stop_token_ids=[], tree_budget="auto")
    assert result["generated_token_ids"] == truth[len(prompt) :]
    assert set(result["tree_sizes"]) == {0} and result["method_cycles"]["ddtree"] >= 3  # drafted, nothing verified
    [sizer] = LEARNED.values()
    assert sizer.acceptance.trials[0].sum() > 2 and sizer.acceptance.hits[0].sum() > 0


def test_a_cheap_drafter_peeks_during_plain_steps():
    """Drafting stopped paying; a draft sized during a queued plain step (prompt lookup: on the host, while the
    device runs the step) that would pay brings drafting back at once, without waiting for a probe. A drafter
    that costs a tenth of a cycle does not peek."""
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.0101)), cap=8)
    sizer.tokens, sizer.seconds, sizer.gain, sizer.backoff, sizer.drafting = 1.0, 0.01, -0.5, BACKOFF, 0.0002
    assert not sizer.will_draft() and sizer.can_peek()
    unsure = Candidates(np.arange(8)[:, None], np.log(np.full((8, 1), 0.02)))
    sizer.choose(unsure, 0, SHORT)
    sizer.peeked(0.0002)
    assert not sizer.will_draft()
    sure = Candidates(np.arange(8)[:, None], np.log(np.full((8, 1), 0.95)))
    for peeks in range(1, 4):
        sizer.choose(sure, 0, SHORT)
        sizer.peeked(0.0002)
        if sizer.will_draft():
            break
    assert sizer.will_draft() and peeks <= 2 and sizer.backoff == 1
    dear = TreeSizer(VerifyCosts((1, 2), (0.01, 0.0101)), cap=8)
    dear.seconds = 0.01
    dear.drafted(0.001)  # a draft that waited for the device: a tenth of a cycle
    assert not dear.can_peek()


def test_peeked_trees_learn_from_the_plain_steps_after_them():
    """Acceptance learned on other text says the drafter's 0.93 is worth 0.3, so no tree pays and none is verified
    to correct it. Peeked trees are scored against the tokens the plain steps then produce (here the drafter is
    right every time): the estimate recovers, and trees pay again, without any tree verified."""
    sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.015, 0.03)), cap=4)  # a node: half a token
    sizer.tokens, sizer.seconds = 1.0, 0.01
    text = list(range(100, 140))
    guess = lambda at: Candidates(np.array(text[at + 1 : at + 5])[:, None], np.log(np.full((4, 1), 0.93)))  # noqa: E731
    rng = np.random.default_rng(0)
    for _ in range(200):  # the other text: right 30% of the time at each depth
        candidates = guess(0)
        tree = build_tree(candidates, text[0], 4)
        learn(sizer.acceptance, candidates, tree, tree.path_to(int(np.argmin(rng.random(4) < 0.3))))
    sizer.acceptance.new_text()  # the next generation
    before = sizer.acceptance.trials.sum()
    sizes = []
    for at in range(len(text) - 6):  # plain steps, each producing the next token of `text`
        candidates = guess(at)
        sizes.append(len(sizer.choose(candidates, text[at], SHORT)) - 1)
        sizer.peeked(0.0001)
        sizer.produced([text[at + 1]])
    assert sizes[0] == 0 and sizes[-1] == 4  # a plain step at first; the whole chain once the lesson is learned
    assert sizer.acceptance.trials.sum() > before and len(sizer.peeks) <= 4  # scored once their depth is known
    fresh = TreeSizer(VerifyCosts((1, 2), (0.01, 0.015)), cap=4)
    missed = Candidates(np.array([[7], [8], [9], [10]]), np.log(np.full((4, 1), 0.9)))
    fresh.choose(missed, 1, SHORT)
    fresh.peeked(0.0001)
    fresh.produced([7, 8])  # evidence as soon as a depth is known
    assert fresh.acceptance.hits.sum(1).tolist() == fresh.acceptance.trials.sum(1).tolist() == [1, 1, 0, 0]
    fresh.produced([99, 10])  # a miss at depth 3: tried and missed; depth 4 never tried (one fade per cycle)
    assert fresh.acceptance.hits.sum(1) == pytest.approx([MEMORY, MEMORY, 0, 0])
    assert fresh.acceptance.trials.sum(1) == pytest.approx([MEMORY, MEMORY, 1, 0])
    assert not fresh.peeks


def test_cycles_not_measured_yet_are_off_the_calibration_as_plain_steps_are():
    """At a long context the calibration's extrapolation is off for every kind of cycle alike: plain steps
    measured at 0.7 of it price drafted roots and trees at 0.7 too, until those are measured (their first
    measurement then stands alone)."""
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.02)), cap=4)
    for _ in range(60):
        sizer.record(None, DraftTree.root_only(0), 1, 0.007, 0.0, SHORT)
    assert sizer.cycle_seconds(np.array([0, 1]), SHORT) == pytest.approx([0.007, 0.014], rel=0.01)
    candidates = Candidates(np.array([[5]]), np.log([[0.9]]))
    sizer.record(candidates, one_node_tree(candidates), 2, 0.03 + 0.001, 0.001, SHORT)
    assert sizer.cycle_seconds(np.array([0, 1]), SHORT) == pytest.approx([0.007, 0.03], rel=0.01)


def test_a_cycle_that_queues_the_next_step_is_not_charged_for_it(monkeypatch):
    """Handing a queued plain step over waits until little of it is left to run (MLX's async_eval): a drafted
    cycle that verified the root alone and queued the next step has waited for the next cycle's work, and must
    not be charged for it (it would price every tree at two steps). Timed on a fake clock that only steps move."""
    import itertools

    from tiny import FakeClock, OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.models.registry import adapter_for

    model, prompt = make_target("llama"), [3, 17, 42, 9]
    truth = prompt + greedy_reference(model, prompt, 24)
    adapter, step = type(adapter_for(model)), type(adapter_for(model)).step
    clock = FakeClock().install(monkeypatch)
    monkeypatch.setattr(adapter, "step", lambda *args: clock.advance(0.2) or step(*args))  # every step takes 0.2 s
    monkeypatch.setattr(TreeSizer, "will_draft", lambda self, turns=itertools.cycle([True, False]): next(turns))
    monkeypatch.setattr(TreeSizer, "size", lambda self, tree, context: tree.prefix(1))  # drafts verify the root
    charged, record = [], TreeSizer.record
    monkeypatch.setattr(TreeSizer, "record", lambda self, candidates, tree, committed, seconds, *rest: (
        charged.append((candidates is not None, seconds)), record(self, candidates, tree, committed, seconds, *rest)))
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=prompt,
                                  max_new_tokens=24, stop_token_ids=[], tree_budget="auto")
    drafted = [seconds for was_drafted, seconds in charged if was_drafted]
    plain = [seconds for was_drafted, seconds in charged if not was_drafted]
    assert drafted and plain
    assert drafted + plain == pytest.approx([0.2] * len(charged), abs=1e-3)  # one step each, not two and none
    assert sum(seconds for _, seconds in charged) == pytest.approx(result["decode_seconds"])


def test_a_tree_verified_in_part_teaches_what_its_sized_out_nodes_were_worth():
    """Nodes cost half a token each: the verified tree is a part of the tree drafted to the cap. The tokens the
    target commits then, and next cycle, score every drafted node whose parent they reached, each once, as
    verifying the whole tree would have (learned on other text, deep nodes would otherwise never be tried)."""
    candidates = Candidates(np.array([[5, 6], [7, 8], [9, 10], [11, 12]]), np.log([[0.95, 0.04]] * 4))
    sizer = TreeSizer(VerifyCosts((1, 2, 3), (0.01, 0.015, 0.02)), cap=12)
    sizer.tokens, sizer.seconds = 1.0, 0.01
    full = sizer.full_tree(candidates, 0)
    text = [5, 7, 10, 12]  # the first-ranked twice, the second-ranked, then one the tree does not have there
    tree, produced = drafted_cycle(sizer, candidates, text, 0.02, 0.001)
    assert 1 < len(tree) < len(full) and tree.tokens == full.tokens[: len(tree)] and len(produced) < len(text)
    sizer.produced(text[len(produced):])  # the next cycle's tokens
    assert not sizer.peeks
    reference = Acceptance()
    learn(reference, candidates, full, full.path_to(full.children[full.children[full.children[0][5]][7]][10]))
    late = np.array([1.0] * 3 + [0.0])[:, None]  # depth 4 was decided a cycle later: faded once less
    for counts, memory in (("hits", MEMORY), ("trials", MEMORY), ("recent_hits", acceptance.RECENT_MEMORY),
                           ("recent_trials", acceptance.RECENT_MEMORY)):
        expected = getattr(reference, counts) * (memory * late + 1 - late)
        assert getattr(sizer.acceptance, counts) == pytest.approx(expected)
    assert reference.trials.sum(1).tolist() == [2, 2, 2, 1] and reference.hits.sum(1).tolist() == [1, 1, 1, 0]


def test_a_probe_that_hit_once_is_overruled_by_the_drafts_after_it():
    """Drafting stopped paying; a probe hits (worth ~0.4 tokens after a draft's cost), and the drafts it brings
    back are worth nothing (sized to the root alone, each costing a third of a step): drafting stops again after
    two or three of them, as their mean with the probe says, not after the nine a moving average would take."""
    sizer = TreeSizer(VerifyCosts((1, 2), (0.01, 0.011)), cap=1)
    sizer.tokens, sizer.seconds, sizer.drafting, sizer.plain, sizer.drafts = 1.0, 0.01, 0.003, 0.01, 5
    sizer.gain, sizer.skipped = -0.3, 10**6
    assert sizer.pick("ddtree") == "ddtree" and sizer.probing
    hit = Candidates(np.array([[5]]), np.log([[0.9]]))
    drafted_cycle(sizer, hit, [5, 6], 0.011 + 0.003, 0.003)
    assert sizer.gain > 0.3 and sizer.backoff == 1
    worthless = Candidates(np.array([[7]]), np.log([[0.01]]))
    drafts = 0
    while sizer.pick("ddtree") == "ddtree":
        assert not sizer.probing and drafts < 9
        drafts += 1
        assert len(drafted_cycle(sizer, worthless, [MISS], 0.01 + 0.003, 0.003)[0]) == 1
    assert drafts <= 3


def test_a_draft_is_judged_by_what_it_committed_not_by_what_was_expected():
    """The estimate expects a sure 4-node chain (worth ~2 tokens past its cost); the cycle commits one token in the
    time of a tree: drafting is judged by that, (1 - 1) - rate * (t - S), and stops."""
    sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.011, 0.014)), cap=4)
    sizer.tokens, sizer.seconds, sizer.drafting, sizer.drafts = 1.0, 0.01, 0.002, 1  # not the generation's first
    sure = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.95)))
    assert sizer.pick("ddtree") == "ddtree" and not sizer.probing
    tree, produced = drafted_cycle(sizer, sure, [MISS], 0.014 + 0.002, 0.002)
    assert len(tree) == 5 and produced == [MISS] and sizer.last_gain > 1
    assert sizer.gain == pytest.approx(0 - sizer.rate * (0.014 + 0.002 - 0.01))  # in full: an ordinary loss
    assert not sizer.will_draft()


def test_one_big_tree_that_missed_among_drafts_that_paid_does_not_stop_drafting():
    """Three sure chains commit five tokens each; then a big tree misses at its first node in a cycle so long that,
    charged in full, it would outweigh all three (so drafting would stop until a probe). Its verdict is charged as
    a draft sized to the root alone and one token more: drafting goes on. Drafts worth nothing still stop it, once
    they outweigh the three that paid."""
    sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.011, 0.014)), cap=4)
    sizer.tokens, sizer.seconds, sizer.drafting, sizer.drafts = 1.0, 0.01, 0.002, 1  # not the generation's first
    sure = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.95)))
    for _ in range(3):
        assert sizer.pick("ddtree") == "ddtree"
        drafted_cycle(sizer, sure, [0, 1, 2, 3, 9], 0.014 + 0.002, 0.002)
    paid = 3 * sizer.gain
    assert sizer.pick("ddtree") == "ddtree"
    tree, _ = drafted_cycle(sizer, sure, [MISS], 0.2 + 0.002, 0.002)
    assert len(tree) == 5 and -sizer.rate * (0.2 + 0.002 - 0.01) < -paid  # in full, it outweighs them
    assert sizer.will_draft() and sizer.gain == pytest.approx((paid + sizer.least_gain(SHORT)) / 4)
    worthless = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.01)))
    drafts = 0
    while sizer.pick("ddtree") == "ddtree":
        drafts += 1
        assert drafts < 30 and len(drafted_cycle(sizer, worthless, [MISS], 0.01 + 0.002, 0.002)[0]) == 1


def test_a_generations_first_draft_is_not_its_verdict_unless_it_paid():
    """A generation's first draft guesses the answer's first tokens, the hardest: sized to the root alone, a loss,
    it leaves drafting on; the next one like it is a verdict, and drafting stops. A first draft that paid despite
    that counts: a draft sized to the root alone after it does not stop drafting (the GSM8K trace)."""
    worthless = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.01)))
    sure = Candidates(np.arange(4)[:, None], np.log(np.full((4, 1), 0.95)))
    for first, text, still_drafting in ((worthless, [MISS], False), (sure, [0, 1, 2, 3, 9], True)):
        sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.011, 0.014)), cap=4)
        sizer.tokens, sizer.seconds = 1.0, 0.01  # the first generation: no draft measured yet
        assert sizer.pick("ddtree") == "ddtree" and not sizer.probing
        tree, produced = drafted_cycle(sizer, first, text, 0.014 + 0.002, 0.002)
        paid = len(produced) - 1 - sizer.rate * (0.014 + 0.002 - 0.01)  # its draft at its own cost: no other yet
        assert (len(tree), paid > 3) == ((1, False) if first is worthless else (5, True))
        assert sizer.will_draft() and sizer.gain == (0 if first is worthless else pytest.approx(paid))
        assert sizer.pick("ddtree") == "ddtree" and not sizer.probing
        drafted_cycle(sizer, worthless, [MISS], 0.012 + 0.002, 0.002)  # one token, a draft's time lost
        assert sizer.gain < 0 if first is worthless else 0 < sizer.gain < paid
        assert sizer.will_draft() == still_drafting


def sharded_run(monkeypatch, rank, shared, seed=0):
    """A sizer on one rank of two, driven as Session.cycle drives it through probes, peeks and drafts, on one text
    with this rank's own timings (rank 1's up to 3x off rank 0's: a busier core). Collectives are simulated:
    rank 0 writes what it broadcasts to `shared`, rank 1 reads it back in the same order."""
    def broadcast(values, group):
        values = np.float32(values).tolist()  # what crosses the wire
        if rank == 0:
            shared.append(values)
            return values
        assert shared and len(shared[0]) == len(values), "rank 1 broadcast what rank 0 did not"
        return shared.pop(0)

    monkeypatch.setattr(tree_size, "broadcast", broadcast)
    rng, clock = np.random.default_rng(seed), np.random.default_rng(seed + 1 + rank)
    sizer = TreeSizer(VerifyCosts((1, 2, 5), (0.01, 0.011, 0.014)), cap=4, group="two ranks")
    decisions = []
    for _ in range(400):
        off = clock.uniform(1 / 3, 3) if rank else 1.0
        text = [int(t) for t in rng.integers(0, 5, 5)]  # tokens 0-4: drafting pays, then not, then again
        candidates = Candidates(rng.integers(0, 5, (4, 2)), np.log(rng.uniform(0.05, 0.9, (4, 2))))
        method = sizer.pick("ddtree")
        if method == "ddtree":
            tree, _ = drafted_cycle(sizer, candidates, text, off * 0.0143, off * 0.0003)
            decisions.append((method, len(tree), sizer.probing))
            continue
        sizer.produced(text[:1])
        peeked = sizer.can_peek()
        if peeked:
            sizer.choose(candidates, 0, SHORT)
            sizer.peeked(off * 0.0003)
        sizer.record(None, DraftTree.root_only(0), 1, off * 0.01, 0.0, SHORT)
        decisions.append((method, peeked))
    return decisions


def test_sharded_ranks_decide_alike_whatever_their_own_clocks_say(monkeypatch):
    """Tensor parallel: every rank must draft, peek and size exactly when rank 0 does (a rank that drafted while
    another stepped would pair no collective: a hang, or a crash). Each rank measures its own times; what is
    decided from them must be rank 0's, including whether a probe failed."""
    shared = []
    rank0 = sharded_run(monkeypatch, 0, shared)
    kinds = {d[0] for d in rank0}
    assert kinds == {"ar", "ddtree"} and any(d[-1] for d in rank0 if d[0] == "ddtree")  # probes, drafts, plain steps
    assert any(d[1] for d in rank0 if d[0] == "ar")  # and peeks
    assert sharded_run(monkeypatch, 1, shared) == rank0
    assert not shared  # every broadcast paired
