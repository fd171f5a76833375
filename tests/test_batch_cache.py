"""A batch's caches held together (models.batch_cache) against each row's own: a forest verify over the
padded buffers gives each row what its tree alone gives, and commits of paths of different lengths (padded as the
walk pads them, then trimmed) leave each row's keys, values and recurrent states as its own cache's, over rounds,
with a copy taken between two rows' commits and rows leaving."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_batch import PROMPTS, branching, target

from ddtree_mlx.config import DDTreeConfig
from ddtree_mlx.models import batch_cache
from ddtree_mlx.models.batch_cache import BatchCaches, RowArrays, RowKV
from ddtree_mlx.models.registry import adapter_for


def walk_path(tree, node: int) -> tuple[mx.array, int]:
    """The root-to-`node` path as the walk hands it to a commit (padded to the tree's depth + 1 by repeating its
    last node) and how many of its entries are padding."""
    path = tree.path_to(node)
    padded = path + [path[-1]] * (max(tree.depths) + 1 - len(path))
    return mx.array(padded), len(padded) - len(path)


def states(adapter, cache) -> list[np.ndarray]:
    """Every entry's state as arrays: an attention entry's keys and values up to its offset (a padded row's own)."""
    arrays = []
    for entry in cache:
        entry = copy.deepcopy(entry) if isinstance(entry, (RowKV, RowArrays)) else entry  # the row's own copy
        if adapter.is_attention_cache(entry):
            arrays += [np.array(entry.keys[..., : entry.offset, :]), np.array(entry.values[..., : entry.offset, :])]
        else:
            arrays += [np.array(part) for _, part in tree_flatten(entry.state) if part is not None]
    return arrays


def assert_same(adapter, caches, own_caches):
    for row, (cache, own) in enumerate(zip(caches, own_caches)):
        assert adapter.prefix_length(cache) == adapter.prefix_length(own)
        for mine, theirs in zip(states(adapter, cache), states(adapter, own)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5, err_msg=f"row {row}")


@pytest.mark.parametrize("attention", ["padded", "apart", "padded split", "apart split"])
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_padded_rows_equal_their_own_caches(family, attention, monkeypatch):
    """`padded`: one attention over every row's padded tree; `apart`: each row over its own columns (uneven trees);
    `split`: either as split_attention (the CPU's form at long contexts: the buffers' columns in place, each row's
    masked to its own, the trees apart), against each row alone unsplit.
    The longest prompt joins first and the others join its buffers; the buffers grow 4 columns at a time, so the
    commits grow them. Two rows leave at once (again: nothing happens), one more goes back to a cache of its own."""
    monkeypatch.setattr(batch_cache, "PADDING_PER_ROW", 10**6 if attention.startswith("padded") else -1)
    config = DDTreeConfig(exact_tree_attention="split" in attention, exact_tree_attention_min_prefix=0)
    adapter = adapter_for(target(family))
    rng = np.random.default_rng(1)
    own_caches = []
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3]]  # 123, 9, 2 and 4 tokens
    for prompt in prompts:
        cache = adapter.make_cache()
        adapter.prefill(prompt, cache, [0], chunk=64)
        own_caches.append(cache)
    monkeypatch.setattr(batch_cache, "STEP", 4)  # the rows' commits grow the buffers
    shared = BatchCaches()
    caches = shared.join([copy.deepcopy(cache) for cache in own_caches[:1]])
    caches += shared.join([copy.deepcopy(cache) for cache in own_caches[1:]])  # rows joining a batch's buffers
    roots = [prompt[-1] for prompt in prompts]
    for round_, sizes in enumerate([(6, 1, 9, 3), (2, 7, 1, 5), (4, 4, 8, 1)]):
        trees = [branching(rng, size, root) for size, root in zip(sizes, roots)]
        outs = adapter.verify_forest(trees, caches, [0], config)
        for row, (tree, out, cache, own) in enumerate(zip(trees, outs, caches, own_caches)):
            alone = adapter.verify_forest([tree], [own], [0], DDTreeConfig())[0]
            np.testing.assert_allclose(np.array(out.logits), np.array(alone.logits), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.array(out.hidden), np.array(alone.hidden), rtol=1e-4, atol=1e-4)
            path, padding = walk_path(tree, int(rng.integers(len(tree))))
            for result, entries in ((out, cache), (alone, own)):
                for capture, entry in zip(result.captures, entries):
                    capture.commit(entry, path)
                adapter.trim_attention(entries, padding)
            if round_ == 1 and row == 0:
                copy.deepcopy(cache)  # the prompt cache's copy of a row, between two rows' commits
            roots[row] = tree.tokens[int(path[-1])]
        assert_same(adapter, caches, own_caches)
    gone = [caches[1], caches[3]]  # two rows leave: the rows after them move up
    caches, own_caches = [caches[0], caches[2]], [own_caches[0], own_caches[2]]
    shared.drop(gone)
    shared.drop(gone)  # their slots are gone: no row of the others is taken for them
    assert [slot.index for slot in shared.slots] == [0, 1]
    assert_same(adapter, caches, own_caches)
    plain = shared.leave(caches.pop(0))  # and one goes back to a cache of its own
    assert not BatchCaches.joined(plain)
    assert_same(adapter, [plain, *caches], [own_caches[0], *own_caches[1:]])
