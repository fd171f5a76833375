"""The prompt-lookup drafter: its distributions follow the history, and decoding with it stays lossless."""

from types import SimpleNamespace

import numpy as np
import pytest
from tiny import VOCAB, greedy_reference, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.drafting.prompt_lookup import PromptLookupDrafter

TARGET = SimpleNamespace(vocab_size=VOCAB)  # reset only reads the vocabulary size


def drafted(history, root, **kwargs):
    drafter = PromptLookupDrafter(**kwargs)
    drafter.reset(TARGET, history)
    return np.array(drafter.draft(root, history, None))


def test_repeating_text_drafts_its_continuation():
    pattern = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    history = [1] + pattern * 3 + pattern[:4]
    log_probs = drafted(history, root=pattern[4])
    assert log_probs.shape == (7, VOCAB)
    assert log_probs.argmax(axis=1).tolist() == pattern[5:] + pattern[:2]
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, rtol=1e-4)


def test_two_continuations_both_get_mass():
    history = [1, 2, 3, 4, 50, 1, 2, 3, 7, 60, 1, 2]
    log_probs = drafted(history, root=3)
    uniform = -np.log(VOCAB)
    first = np.argsort(-log_probs[0])[:2].tolist()
    assert first == [7, 4]  # both continuations, the more recent one first
    assert log_probs[0, 4] > uniform + 3 and log_probs[0, 7] > uniform + 3
    assert sorted(np.argsort(-log_probs[1])[:2].tolist()) == [50, 60]


def test_no_evidence_is_uniform():
    log_probs = drafted([1, 2, 3], root=9, block_size=4)
    np.testing.assert_allclose(log_probs, -np.log(VOCAB), rtol=1e-6)


def test_history_grows_across_calls():
    """context_tokens arrive in pieces (the prompt, then each cycle's root and accepted tokens)."""
    history = [1, 2, 3, 4, 5, 6, 1, 2, 3]
    drafter = PromptLookupDrafter()
    drafter.reset(TARGET, history[:5])
    drafter.draft(history[5], history[:5], None)
    pieces = np.array(drafter.draft(4, history[5:], None))
    np.testing.assert_array_equal(pieces, drafted(history, root=4))
    assert pieces[0].argmax() == 5


def brute_force_matches(drafter, sequence):
    """Every earlier position whose preceding tokens match the suffix ending at the root, by a plain scan."""
    found = []
    for start in range(1, len(sequence)):
        matched = 0
        while (matched < min(drafter.max_ngram, start) and matched < len(sequence) - 1
               and sequence[start - 1 - matched] == sequence[-1 - matched]):
            matched += 1
        if matched >= drafter.min_ngram:
            found.append((start, matched))
    weights = [drafter.length_base ** (m - 1) * drafter.recency ** (len(found) - 1 - i)
               for i, (_, m) in enumerate(found)]
    order = sorted(range(len(found)), key=lambda i: -weights[i])[: drafter.max_matches]
    return [found[i][0] for i in order], [weights[i] for i in order]


@pytest.mark.parametrize("seed", range(6))
def test_indexed_matches_equal_a_full_scan(seed):
    """The history's token index finds exactly the matches a scan of the whole history finds, in pieces."""
    rng = np.random.default_rng(seed)
    history = rng.integers(0, 6, size=200).tolist()
    drafter = PromptLookupDrafter(min_ngram=1 + seed % 2, max_matches=16)
    drafter.reset(TARGET, history)
    found = 0
    for cut in (0, 37, 120, 200):
        drafter.history.extend(history[drafter.history.length : cut])
        sequence = np.array(history[:cut] + [int(rng.integers(0, 6))])
        starts, weights = drafter.matches(sequence)
        expected_starts, expected_weights = brute_force_matches(drafter, sequence.tolist())
        assert starts.tolist() == expected_starts
        np.testing.assert_allclose(weights, expected_weights)
        found += len(starts)
    assert found > 0


@pytest.mark.parametrize("width", [1, 4, 32])
def test_candidates_are_the_dense_rows_top_tokens(width):
    """The sparse top tokens equal a top-k over the dense distributions: same values, same evidenced tokens;
    floor fillers are distinct tokens without evidence."""
    history = [1, 2, 3, 4, 50, 1, 2, 3, 7, 60, 1, 2, 3, 7, 61, 1, 2]
    dense = drafted(history, root=3)
    drafter = PromptLookupDrafter()
    drafter.reset(TARGET, history)
    got = drafter.candidates(3, history, None, width)
    assert got.tokens.shape == got.log_probs.shape == (7, width)
    expected = np.sort(dense, axis=1)[:, ::-1][:, :width]
    np.testing.assert_allclose(got.log_probs, expected, rtol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(dense, got.tokens, 1), got.log_probs, rtol=1e-5)
    for row in got.tokens:
        assert len(set(row.tolist())) == width
    assert got.tokens[0, :2].tolist() == [7, 4][:width] if width > 1 else got.tokens[0, 0] == 7


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 1}, "no draft positions"),
    ({"min_ngram": 3, "max_ngram": 2}, "min_ngram <= max_ngram"),
    ({"recency": 0.0}, "recency"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptLookupDrafter(**kwargs)


PHRASE = [11, 23, 5, 77, 42, 9]
PROMPT = [1] + PHRASE + [30, 31] + PHRASE + [60] + PHRASE[:3]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "llama"])
@pytest.mark.parametrize("budget", [1, 4, 16, "auto"])  # auto: plain steps queued, drafts peeked in between
def test_prompt_lookup_matches_greedy(family, budget):
    target = make_target(family)
    result = generate_ddtree_once(target_model=target, draft_model=PromptLookupDrafter(), prompt_tokens=PROMPT,
                                  max_new_tokens=48, stop_token_ids=[], tree_budget=budget)
    assert result["generated_token_ids"] == greedy_reference(target, PROMPT, 48)
    assert result["cycles"] < 48  # some drafts were accepted
