"""Drafting only as deep as the tree can reach: a tree of B draft nodes is at most B deep, so a DFlash drafter
(alone or mixed with prompt lookup) fills min(block_size - 1, B) positions, the whole block on the single path and
with automatic sizing (its cap, 32, is past any block here); drafters without the `depth` keyword still draft
their whole block. Every generation equals mlx-lm's greedy output."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import OracleDrafter, greedy_reference, make_dflash, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.drafting.dflash import DFlashDrafter
from ddtree_mlx.drafting.mixed import LookupDFlashDrafter
from ddtree_mlx.drafting.protocol import depth_keyword
from ddtree_mlx.models.registry import adapter_for

PROMPT = [3, 17, 42, 9, 100, 5, 61, 17, 42, 9]  # "17 42 9" repeats: prompt lookup has a match to mix in
NEW_TOKENS = 32
BLOCK = 8


class CountingDFlash(DFlashDrafter):
    """Our DFlash drafter, recording how many positions each forward filled."""

    def __init__(self, model, vocab=None):
        super().__init__(model, vocab)
        self.filled: list[int] = []

    def log_probs(self, root_token, context_hidden, depth=None):
        log_probs = super().log_probs(root_token, context_hidden, depth)
        self.filled.append(log_probs.shape[0])
        return log_probs


def generate(target, drafter, **kwargs):
    return generate_ddtree_once(target_model=target, draft_model=drafter, prompt_tokens=PROMPT,
                                max_new_tokens=NEW_TOKENS, stop_token_ids=[], **kwargs)


@pytest.mark.parametrize("mixed", [False, True], ids=["dflash", "dflash+lookup"])
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("budget", [1, 4, 7, 16, "auto", "single path"])
def test_the_drafted_depth_is_what_the_tree_can_reach_and_the_output_is_mlx_lms(family, budget, mixed):
    target = make_target(family)
    dflash = CountingDFlash(make_dflash(target, block_size=BLOCK, layer_ids=(0, 1)))
    drafter = LookupDFlashDrafter(dflash, alone_at=np.inf) if mixed else dflash  # mixing always: every draft forwards
    options = dict(method="dflash") if budget == "single path" else dict(tree_budget=budget)
    result = generate(target, drafter, **options)
    assert result["generated_token_ids"] == greedy_reference(target, PROMPT, NEW_TOKENS)
    want = BLOCK - 1 if budget in ("auto", "single path") else min(BLOCK - 1, budget)
    assert dflash.filled and set(dflash.filled) == {want}


@pytest.mark.parametrize("api", ["draft", "candidates"])
def test_a_shorter_block_gives_that_many_rows_and_the_whole_block_is_the_default(api):
    target = make_target("qwen3_5")
    adapter = adapter_for(target)
    model = make_dflash(target, block_size=BLOCK, layer_ids=(0, 1))
    hidden = adapter.forward(mx.array(PROMPT), adapter.make_cache(), [0, 1])[1]
    rows = {}
    for depth in (None, BLOCK - 1, 3, 1, 50):
        drafter = LookupDFlashDrafter(DFlashDrafter(model), alone_at=np.inf)
        drafter.reset(adapter, PROMPT)
        out = getattr(drafter, api)(9, PROMPT, hidden, *([4] if api == "candidates" else []), depth=depth)
        rows[depth] = np.array(out if api == "draft" else out.log_probs)
    assert [len(rows[d]) for d in (None, BLOCK - 1, 3, 1, 50)] == [BLOCK - 1, BLOCK - 1, 3, 1, BLOCK - 1]
    assert np.array_equal(rows[None], rows[BLOCK - 1])


class UserDrafter:
    """A drafter written to the protocol before `depth` existed: the dense form only, the whole block."""

    target_layer_ids: list[int] = []

    def __init__(self, truth):
        self.oracle = OracleDrafter(truth, block_size=BLOCK)
        self.block_size = BLOCK
        self.rows: list[int] = []

    def reset(self, target, prompt_tokens):
        self.oracle.reset(target, prompt_tokens)

    def draft(self, root_token, context_tokens, context_hidden):
        dense = self.oracle.draft(root_token, context_tokens, context_hidden)
        self.rows.append(dense.shape[0])
        return dense


@pytest.mark.parametrize("budget", [2, "auto"])
def test_a_drafter_without_the_keyword_drafts_its_whole_block_losslessly(budget):
    target = make_target("qwen3_5")
    want = greedy_reference(target, PROMPT, NEW_TOKENS)
    drafter = UserDrafter(PROMPT + want)
    assert depth_keyword(drafter.draft, 3) == {} and depth_keyword(DFlashDrafter.draft, 3) == {"depth": 3}
    result = generate(target, drafter, tree_budget=budget)
    assert result["generated_token_ids"] == want
    assert drafter.rows and set(drafter.rows) == {BLOCK - 1}
    assert result["cycles"] < NEW_TOKENS  # the oracle's drafts were accepted, through the whole block's rows
