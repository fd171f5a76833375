"""Prompt lookup mixed into a DFlash drafter's drafts: the fast candidates against the dense mixture, and the
engine with it against mlx-lm's greedy decoding."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, greedy_reference, make_dflash, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.drafting.dflash import DFlashDrafter
from ddtree_mlx.drafting.mixed import LookupDFlashDrafter
from ddtree_mlx.drafting.prompt_lookup import PromptLookupDrafter
from ddtree_mlx.loading.load import load_drafter
from ddtree_mlx.models.registry import adapter_for

PHRASE = [11, 23, 5, 77, 42, 9]
PROMPT = [1] + PHRASE + [30, 31] + PHRASE + [60] + PHRASE[:3]  # the root (PHRASE[3] next) has matches
NO_MATCH = [1, 2, 3, 4, 5, 6, 8, 10]
VOCABULARY = [t for t in range(VOCAB - 1) if t not in (42, 77, 100)]  # two matched tokens outside it


def drafters(target, vocab, alone_at=np.inf):
    """Two identical mixed drafters (each call advances a drafter's caches), mixing always by default."""
    model = make_dflash(target)
    pair = [LookupDFlashDrafter(DFlashDrafter(model, vocab), alone_at=alone_at) for _ in range(2)]
    adapter = adapter_for(target)
    for drafter in pair:
        drafter.reset(adapter, PROMPT)
    return pair, adapter


def hidden_of(adapter, drafter, tokens):
    return adapter.forward(mx.array(tokens), adapter.make_cache(), drafter.target_layer_ids)[1]


@pytest.mark.parametrize("vocab", [None, VOCABULARY], ids=["whole-vocabulary", "draft-vocabulary"])
@pytest.mark.parametrize("width", [1, 4, 16, 64])  # 64: matched tokens are among its own top too
def test_candidates_are_the_dense_mixtures_top_tokens(vocab, width):
    """The candidates (the drafter's own top plus the matched tokens, scored on the host) equal a top-k over the
    dense mixture over the whole vocabulary; matched tokens outside the draft vocabulary still get their share."""
    target = make_target("llama")
    (dense_drafter, fast), adapter = drafters(target, vocab)
    hidden = hidden_of(adapter, fast, PROMPT)
    dense = np.array(dense_drafter.draft(77, PROMPT, hidden))
    got = fast.candidates(77, PROMPT, hidden, width).to_numpy()  # lazy: the session evaluates them
    assert got.tokens.shape == got.log_probs.shape == (7, width)
    np.testing.assert_allclose(got.log_probs, np.sort(dense, axis=1)[:, ::-1][:, :width], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, got.tokens, 1), got.log_probs, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.exp(dense).sum(1), 1, atol=1e-4)  # the mixture is a distribution
    assert got.tokens[0, 0] == 42  # the continuation of the two earlier "... 5 77" matches
    if width > 1:
        assert set(got.tokens[0, 1:].tolist()) - {42}  # and the DFlash drafter's choices beside it


@pytest.mark.parametrize("api", ["draft", "candidates"])
def test_a_sure_match_drafts_alone_and_the_dflash_drafter_reads_what_it_missed(api):
    """Prompt lookup's four-token match (weight 64 >= alone_at 16) drafts alone: its own distributions, no
    forward. The next draft, with no match, is the DFlash drafter's over the whole context, the skipped part
    included, as a DFlash drafter that read it all at once gives."""
    target = make_target("llama")
    (mixed, _), adapter = drafters(target, VOCABULARY, alone_at=16.0)
    lookup = PromptLookupDrafter()
    lookup.reset(adapter, PROMPT)
    hidden = hidden_of(adapter, mixed, PROMPT + [77, 42])
    first = getattr(mixed, api)(77, PROMPT, hidden[: len(PROMPT)], *([4] if api == "candidates" else []))
    want = getattr(lookup, api)(77, PROMPT, None, *([4] if api == "candidates" else []))
    assert mixed.dflash.cache[0].offset == 0  # no DFlash forward ran
    if api == "draft":
        assert np.array_equal(np.array(first), np.array(want))
    else:
        assert np.array_equal(first.tokens, want.tokens) and np.allclose(first.log_probs, want.log_probs)
    alone = DFlashDrafter(mixed.dflash.model, VOCABULARY)
    alone.reset(adapter, PROMPT)
    second = np.array(mixed.draft(120, [77, 42], hidden[len(PROMPT):]))  # 120: never seen, no match
    assert mixed.dflash.cache[0].offset > 0
    assert np.allclose(second, np.array(alone.draft(120, PROMPT + [77, 42], hidden)), atol=1e-5)


def test_no_match_is_the_dflash_drafter():
    target = make_target("llama")
    (mixed, _), adapter = drafters(target, VOCABULARY)
    alone = DFlashDrafter(mixed.dflash.model, VOCABULARY)
    alone.reset(adapter, NO_MATCH)
    hidden = hidden_of(adapter, mixed, NO_MATCH)
    assert np.allclose(np.array(mixed.draft(12, NO_MATCH, hidden)), np.array(alone.draft(12, NO_MATCH, hidden)),
                       atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("budget", [4, "auto"])
def test_lookup_dflash_matches_greedy(family, budget):
    """Lossless against mlx-lm: the random DFlash drafter is almost never right, prompt lookup's continuations of
    the repeated phrase are, so drafts are accepted (fewer cycles than tokens) through the mixture."""
    target = make_target(family)
    drafter = LookupDFlashDrafter(DFlashDrafter(make_dflash(target, layer_ids=(0, 1)), VOCABULARY))
    result = generate_ddtree_once(target_model=target, draft_model=drafter, prompt_tokens=PROMPT,
                                  max_new_tokens=40, stop_token_ids=[], tree_budget=budget)
    assert result["generated_token_ids"] == greedy_reference(target, PROMPT, 40)
    assert result["cycles"] < 40


def test_loading_names():
    drafter = load_drafter(None, "dflash+lookup")
    assert isinstance(drafter, LookupDFlashDrafter) and drafter.block_size == 8
    assert isinstance(drafter.lookup, PromptLookupDrafter) and drafter.lookup.block_size == 8
    with pytest.raises(ValueError, match="goes after a DFlash drafter"):
        load_drafter(None, "prompt-lookup+lookup")
    with pytest.raises(ValueError, match="PromptLookupDrafter\\(block_size=8\\)"):
        LookupDFlashDrafter(drafter.dflash, PromptLookupDrafter(block_size=4))
    with pytest.raises(ValueError, match="need prior > 0"):
        LookupDFlashDrafter(drafter.dflash, prior=0)
