"""Commit installs exactly the caches a sequential forward of the accepted tokens would leave."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import make_target

from ddtree_mlx import DDTreeConfig
from ddtree_mlx.models.registry import adapter_for
from ddtree_mlx.tree.draft_tree import DraftTree


def branching_tree(rng, size):
    tree = DraftTree.root_only(int(rng.integers(0, 100)))
    for node in range(1, size):
        tree.add(int(rng.integers(0, node)), int(rng.integers(0, 100)) + 1000 * node, 0)
    tree.tokens = [t % 100 for t in tree.tokens]  # children maps are unused here; keep ids in the vocab
    return tree


def cache_arrays(cache):
    arrays = []
    for entry in cache:
        if hasattr(entry, "offset"):
            arrays += [entry.keys[..., : entry.offset, :], entry.values[..., : entry.offset, :]]
        else:
            arrays += [entry[0], entry[1]]
    return arrays


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3", "llama"])
@pytest.mark.parametrize("tree_aware,padding", [(True, 0), (False, 0), (True, 3)])
def test_commit_equals_sequential_forward(family, tree_aware, padding):
    """`padding`: the path as the device walk gives it, its last node repeated, then the extra positions trimmed."""
    rng = np.random.default_rng(0)
    target = adapter_for(make_target(family))
    prompt = mx.array([3, 17, 42, 9, 100, 5])
    committed, sequential = target.make_cache(), target.make_cache()
    target.forward(prompt, committed, [])
    target.forward(prompt, sequential, [])
    tree = branching_tree(rng, 14)
    layers = [0, len(target.layers) - 1]
    out = target.verify(tree, committed, layers, DDTreeConfig(tree_aware_linear=tree_aware))
    deepest = max(range(len(tree)), key=lambda n: (tree.depths[n], n))
    path = tree.path_to(deepest)
    assert len(path) >= 3 and path[1] != 1  # a deep path that is not the first branch
    for capture, entry in zip(out.captures, committed):
        capture.commit(entry, mx.array(path + [path[-1]] * padding))
    target.trim_attention(committed, padding)
    last, hidden = target.forward(mx.array([tree.tokens[n] for n in path]), sequential, layers)
    logits = target.logits(last)
    for got, want in zip(cache_arrays(committed), cache_arrays(sequential)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(out.logits[mx.array(path)]), np.array(logits), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(out.hidden[mx.array(path)]), np.array(hidden), rtol=1e-4, atol=1e-4)


def test_verify_leaves_the_cache_untouched():
    target = adapter_for(make_target("qwen3_5"))
    cache = target.make_cache()
    target.forward(mx.array([1, 2, 3]), cache, [])
    before = [np.array(a) for a in cache_arrays(cache)]
    target.verify(branching_tree(np.random.default_rng(1), 6), cache, [], DDTreeConfig())
    for got, want in zip(cache_arrays(cache), before):
        np.testing.assert_array_equal(np.array(got), want)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_split_tree_attention_equals_masked_attention(family):
    """DDTREE_EXACT_TREE_ATTENTION computes the same verify as one masked attention over [prefix, tree]."""
    target = adapter_for(make_target(family))
    cache = target.make_cache()
    target.forward(mx.array(list(range(3, 40))), cache, [])
    tree = branching_tree(np.random.default_rng(2), 12)
    plain = target.verify(tree, cache, [0], DDTreeConfig())
    split = target.verify(tree, cache, [0], DDTreeConfig(exact_tree_attention=True, exact_tree_attention_min_prefix=0))
    np.testing.assert_allclose(np.array(split.logits), np.array(plain.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(split.hidden), np.array(plain.hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "llama"])
def test_a_step_with_its_own_attention_equals_mlx_lms_step(family):
    """Past the split's min prefix on the CPU a plain step's attention layers run as a lone root's verify whose keys
    go straight into the cache (`TargetAdapter.lone_root`): the same logits, captured states and cache as the
    model's own step."""
    target = adapter_for(make_target(family))
    own, theirs = target.make_cache(), target.make_cache()
    for cache in (own, theirs):
        target.forward(mx.array(list(range(3, 40))), cache, [])
    config = DDTreeConfig(exact_tree_attention_min_prefix=0)
    assert target.lone_root(own, config) is not None and target.lone_root(own, DDTreeConfig()) is None  # 37 < 1,024
    layers = [0, len(target.layers) - 1]
    for token in (7, 11):
        step = target.step(mx.array([token]), own, layers, config)
        mlx_lm_step = target.step(mx.array([token]), theirs, layers)
        np.testing.assert_allclose(np.array(step.logits), np.array(mlx_lm_step.logits), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(step.hidden), np.array(mlx_lm_step.hidden), rtol=1e-5, atol=1e-5)
    for got, want in zip(cache_arrays(own), cache_arrays(theirs)):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
