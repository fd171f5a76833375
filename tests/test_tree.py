"""Heap tree vs brute force; the index tables verify uses vs direct walks."""

import itertools

import numpy as np
import pytest

from ddtree_mlx.tree.build import Candidates, build_tree, chain_tree
from ddtree_mlx.tree.draft_tree import DraftTree


def random_candidates(rng, depth, width):
    scores = np.sort(np.log(rng.dirichlet(np.ones(width * 2), size=depth))[:, :width], axis=1)[:, ::-1]
    tokens = np.stack([rng.permutation(50)[:width] for _ in range(depth)])
    return Candidates(tokens, scores.copy())


def all_prefixes(candidates):
    depth, width = candidates.tokens.shape
    for length in range(1, depth + 1):
        for ranks in itertools.product(range(width), repeat=length):
            score = sum(candidates.log_probs[d, r] for d, r in enumerate(ranks))
            yield ranks, score


def tree_prefixes(tree):
    return {tuple(tree.ranks[n] for n in tree.path_to(node)[1:]) for node in range(1, len(tree))}


@pytest.mark.parametrize("seed", range(20))
def test_heap_tree_is_the_best_prefix_closed_set(seed):
    rng = np.random.default_rng(seed)
    depth, width = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    candidates = random_candidates(rng, depth, width)
    prefixes = dict(all_prefixes(candidates))
    budget = int(rng.integers(1, min(len(prefixes), 5) + 1))
    tree = build_tree(candidates, root_token=0, budget=budget)
    assert len(tree) == budget + 1
    chosen = tree_prefixes(tree)
    # Brute force: every prefix-closed set of `budget` ranked prefixes, scored by expected accepted length.
    best = max(
        sum(np.exp(prefixes[p]) for p in subset)
        for subset in itertools.combinations(prefixes, budget)
        if all(p[:-1] in subset or len(p) == 1 for p in subset)
    )
    assert sum(np.exp(prefixes[p]) for p in chosen) == pytest.approx(best, rel=1e-12)
    top = sorted(prefixes, key=prefixes.get, reverse=True)[:budget]
    assert chosen == set(top)


def test_tree_structure_invariants():
    rng = np.random.default_rng(0)
    candidates = random_candidates(rng, 6, 4)
    tree = build_tree(candidates, root_token=99, budget=16)
    assert tree.tokens[0] == 99 and tree.parents[0] == -1
    for node in range(1, len(tree)):
        parent = tree.parents[node]
        assert parent < node
        assert tree.children[parent][tree.tokens[node]] == node
        assert tree.tokens[node] == candidates.tokens[tree.depths[node] - 1, tree.ranks[node]]
    chain = chain_tree(candidates, 99)
    assert chain.parents == list(range(-1, 6)) and chain.ranks == [0] * 7


def test_top_k_is_capped_by_budget_and_vocab():
    candidates = Candidates(np.array([[5, 6]]), np.log(np.array([[0.6, 0.4]])))
    assert len(build_tree(candidates, 0, budget=8)) == 3
    assert len(build_tree(candidates, 0, budget=1)) == 2


def random_tree(rng, size):
    tree = DraftTree.root_only(0)
    for node in range(1, size):
        tree.add(int(rng.integers(0, node)), node, 0)
    return tree


@pytest.mark.parametrize("seed", range(5))
def test_ancestor_mask_and_window_index(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 12)
    mask, windows = tree.ancestor_mask(), tree.window_index(4)
    for node in range(len(tree)):
        path = tree.path_to(node)
        assert set(np.flatnonzero(mask[node])) == set(path)
        # concat(cached rows 0..2, nodes 3..): the window is the last 4 of cached rows + path rows.
        rows = [0, 1, 2] + [3 + n for n in path]
        assert windows[node].tolist() == rows[-4:]


@pytest.mark.parametrize("seed", range(10))
def test_every_prefix_of_the_pop_order_is_the_best_tree_of_its_size(seed):
    """What auto sizing rests on: cutting the full best-first tree after n nodes (no deeper than d) gives the
    heap's tree of n (on the candidates of depths up to d)."""
    rng = np.random.default_rng(seed)
    candidates = random_candidates(rng, 4, 3)
    full = build_tree(candidates, 0, budget=20)
    for nodes in range(1, 21):
        cut, direct = full.prefix(nodes + 1), build_tree(candidates, 0, budget=nodes)
        assert (cut.tokens, cut.parents, cut.ranks) == (direct.tokens, direct.parents, direct.ranks)
        assert cut.children == direct.children
        for depth in range(1, 4):  # no deeper than `depth`: the heap's tree on the candidates of those depths
            cut, direct = full.prefix(nodes + 1, depth), build_tree(candidates.first(depth), 0, budget=nodes)
            if len(direct) <= len(cut):  # the full tree holds them all
                assert (cut.tokens, cut.parents, cut.depths, cut.children) == (
                    direct.tokens, direct.parents, direct.depths, direct.children)
    assert full.scores == sorted(full.scores, reverse=True)  # path scores fall along the pop order
    for node in range(1, len(full)):
        path = full.path_to(node)[1:]
        assert full.scores[node] == pytest.approx(sum(candidates.log_probs[full.depths[n] - 1, full.ranks[n]]
                                                      for n in path))


@pytest.mark.parametrize("weights", [(0.55, 0.2, 0.1, 0.15), (0.1, 0.6, 0.2, 0.1)])
@pytest.mark.parametrize("width", [3, 8])
def test_scripted_candidates_are_its_dense_rows_top_tokens(weights, width):
    """The scripted drafter's sparse candidates (what the synthetic benchmark drafts with) equal a top-k over its
    dense rows, draft after draft, over the whole script; ranks given out of order are sorted best first."""
    from types import SimpleNamespace

    import mlx.core as mx

    from ddtree_mlx.drafting.oracle import ScriptedDrafter
    from ddtree_mlx.tree.build import top_candidates

    truth = list(np.random.default_rng(3).integers(0, 50, size=60))
    sparse, dense = (ScriptedDrafter(truth, block_size=8, rank_weights=weights, seed=2) for _ in range(2))
    for drafter in (sparse, dense):
        drafter.reset(SimpleNamespace(vocab_size=50), truth[:10])
    steps = [10] + [3] * 15
    for step in steps:
        got = sparse.candidates(0, [0] * step, None, width).to_numpy()
        want = top_candidates(dense.draft(0, [0] * step, None), width)
        mx.eval(want.tokens, want.log_probs)
        want = want.to_numpy()
        np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-6)
        assert (np.diff(got.log_probs, axis=1) <= 0).all()
        for g, w, values in zip(got.tokens, want.tokens, want.log_probs):
            assert len(set(g.tolist())) == width
            top = values > values[-1]  # ties at the floor may pick other ids
            assert g[top].tolist() == w[top].tolist()


def host_walk(tree, target_tokens):
    """The reference: follow the target's token down the children while it is one."""
    path = [0]
    while (child := tree.children[path[-1]].get(int(target_tokens[path[-1]]))) is not None:
        path.append(child)
    return path


def test_the_device_walk_is_the_host_walk():
    """Walk.of (on the device, padded to the tree's depth + 1 by repeating the last node) against the direct walk,
    on bushy trees whose target tokens follow a random root path and then leave it (or go on past the tree)."""
    import mlx.core as mx

    from ddtree_mlx.tree.draft_tree import Walk

    deep = off_first_rank = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        tree = build_tree(random_candidates(rng, int(rng.integers(1, 7)), int(rng.integers(1, 5))), root_token=7,
                          budget=int(rng.integers(1, 25)))
        target = rng.integers(0, 50, size=len(tree))
        goal = tree.path_to(int(rng.integers(0, len(tree))))
        for parent, child in zip(goal, goal[1:]):
            target[parent] = tree.tokens[child]
        want = host_walk(tree, target)
        walk = Walk.of(tree, mx.array(target, dtype=mx.uint32))
        nodes = walk.nodes.tolist()
        assert walk.path() == want and len(nodes) == max(tree.depths) + 1
        assert nodes == want + [want[-1]] * (len(nodes) - len(want))
        deep += len(want) >= 4
        off_first_rank += any(tree.ranks[node] > 0 for node in want)
    assert deep >= 5 and off_first_rank >= 5, "the walks stayed shallow or on first-ranked children"
