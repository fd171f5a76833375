"""Several rows' drafts in one DFlash forward (drafting.dflash_rows) against each row's drafter run alone: the same
log-probs and the same context caches after, over prompts of different lengths, windowed and full-context caches,
draft vocabularies, shorter depths and a second draft that reads only the new context; the mixed drafter's rows,
some drafting by prompt lookup alone."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, make_dflash, make_target

from ddtree_mlx.config import DDTreeConfig
from ddtree_mlx.drafting.dflash import DFlashDrafter
from ddtree_mlx.drafting.mixed import LookupDFlashDrafter
from ddtree_mlx.drafting.protocol import DraftRequest, propose, propose_rows
from ddtree_mlx.models.registry import adapter_for

PROMPTS = [list(range(1, 6)), [7, 3, 9] * 30, list(range(20, 60))]  # 5, 90 and 40 tokens
VOCABULARY = list(range(0, VOCAB - 1, 2))


def rows_of(target, make, window: int):
    """Each prompt's drafter twice (one drafts alone, one in the batch), reset, and its prompt's hidden states."""
    adapter = adapter_for(target)
    pairs, hiddens = [], []
    for prompt in PROMPTS:
        pair = [make() for _ in range(2)]
        for drafter in pair:
            drafter.configure(DDTreeConfig(draft_window=window))
            drafter.reset(adapter, prompt)
        pairs.append(pair)
        hiddens.append(adapter.forward(mx.array(prompt), adapter.make_cache(), pair[0].target_layer_ids)[1])
    return pairs, hiddens


def caches(drafter: DFlashDrafter) -> list:
    return [(entry.offset, *entry.fetch()) for entry in drafter.cache]


@pytest.mark.parametrize("window", [0, 8], ids=["full-context", "window-8"])  # 8: the 90-token prompt keeps 64 + 8
@pytest.mark.parametrize("vocab", [None, VOCABULARY], ids=["whole-vocabulary", "draft-vocabulary"])
@pytest.mark.parametrize("depth", [None, 3])
def test_rows_drafted_together_equal_each_drafted_alone(window, vocab, depth):
    target = make_target("qwen3")
    model = make_dflash(target)
    pairs, hiddens = rows_of(target, lambda: DFlashDrafter(model, vocab), window)
    alone, together = zip(*pairs)
    news = [hiddens, [mx.random.normal(h[:count].shape) for h, count in zip(hiddens, (1, 3, 2))]]
    for step, context in enumerate(news):  # the prompt, then a cycle's accepted rows (a different count per row)
        roots = [11 + step, 12, 13]
        want = [d.log_probs(root, hidden, depth) for d, root, hidden in zip(alone, roots, context)]
        got = DFlashDrafter.log_probs_rows(list(together), roots, context, depth)
        assert len(got) == 3 and got[0].shape == want[0].shape == (3 if depth else 7, len(vocab or range(VOCAB)))
        for row, (a, b) in enumerate(zip(want, got)):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-5, err_msg=f"row {row}")
        for a, b in zip(alone, together):
            for (offset_a, *arrays_a), (offset_b, *arrays_b) in zip(caches(a), caches(b)):
                assert offset_a == offset_b
                for x, y in zip(arrays_a, arrays_b):
                    np.testing.assert_allclose(np.array(y), np.array(x), rtol=1e-4, atol=1e-5)
    assert together[1].cache[0].offset == 93 and together[1].cache[0].fetch()[0].shape[2] == (93 if not window else 72)


def test_a_rows_root_and_position_matter():
    """The batch is not one row's draft repeated: swapping two rows' roots swaps their drafts."""
    target = make_target("qwen3")
    model = make_dflash(target)
    (pairs, hiddens) = rows_of(target, lambda: DFlashDrafter(model), 0)
    drafters = [pair[1] for pair in pairs]
    first = DFlashDrafter.log_probs_rows(copy.deepcopy(drafters), [5, 9, 5], hiddens)
    assert not np.allclose(np.array(first[0]), np.array(first[1]))
    assert not np.allclose(np.array(first[0]), np.array(first[2]))  # same root, other context and positions


def test_mixed_rows_together_equal_each_alone():
    """Rows of the lookup-mixed drafter: one sure of a prompt-lookup match (drafts alone, no forward), two mixing
    (one DFlash forward between them); each equals its drafter's own candidates."""
    target = make_target("llama")
    model = make_dflash(target)
    pairs, hiddens = rows_of(target, lambda: LookupDFlashDrafter(DFlashDrafter(model, VOCABULARY)), 0)
    alone, together = zip(*pairs)
    roots = [4, 7, 30]  # row 1: its context ends "... 3 9", so "9 7" then repeats a long match
    requests = [DraftRequest((root, prompt, hidden), 4, 5) for root, prompt, hidden in zip(roots, PROMPTS, hiddens)]
    want = [propose(d, r).to_numpy() for d, r in zip(alone, requests)]
    got = [c.to_numpy() for c in propose_rows(list(together), requests)]
    assert together[1].dflash.cache[0].offset == 0  # drafted by prompt lookup alone: the DFlash part waits
    assert together[0].dflash.cache[0].offset == 5 and together[2].dflash.cache[0].offset == 40
    for a, b in zip(want, got):
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_allclose(b.log_probs, a.log_probs, rtol=1e-4, atol=1e-5)
