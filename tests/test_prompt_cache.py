"""The prompt cache: later prompts that start like earlier ones skip that part of prefill, and every output is
still mlx-lm's own greedy output (and the same drafts: the drafter's hidden states line up with its tokens)."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import greedy_reference, make_dflash, make_target

from ddtree_mlx import PromptLookupDrafter, generate_ddtree_once
from ddtree_mlx.drafting.protocol import as_drafter
from ddtree_mlx.engine.prompt_cache import PromptCache
from ddtree_mlx.models.registry import adapter_for

FIRST = [int(t) for t in np.random.default_rng(5).integers(0, 120, 30)]


class Recording:
    """A drafter that records what the engine hands it: the context tokens and their hidden states."""

    def __init__(self, inner):
        self.inner, self.block_size, self.target_layer_ids = inner, inner.block_size, inner.target_layer_ids
        self.calls = []

    def reset(self, target, prompt_tokens):
        self.calls = []
        self.inner.reset(target, prompt_tokens)

    def draft(self, root, tokens, hidden):
        self.calls.append((list(tokens), None if hidden is None else np.array(hidden)))
        return self.inner.draft(root, tokens, hidden)


def run(model, drafter, prompt, cache, tokens=16, checkpoints=()):
    result = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt, max_new_tokens=tokens,
                                  stop_token_ids=[], tree_budget=4, prompt_cache=cache, prompt_checkpoints=checkpoints)
    assert result["generated_token_ids"] == greedy_reference(model, prompt, tokens)
    return result


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("drafter_kind", ["dflash", "lookup"])
def test_turns_reuse_what_earlier_turns_prefilled(family, drafter_kind):
    model = make_target(family)
    drafter = Recording(as_drafter(make_dflash(model) if drafter_kind == "dflash" else PromptLookupDrafter()))
    cache = PromptCache(2**30)
    first = run(model, drafter, FIRST, cache, checkpoints=[12])  # e.g. where a system message ends
    assert first["reused_prompt_tokens"] == 0 and cache.stats()["misses"] == 1

    # The next turn of the conversation: the first prompt, its answer and more.
    second_prompt = FIRST + first["generated_token_ids"] + [7, 8, 9]
    second = run(model, drafter, second_prompt, cache)
    assert second["reused_prompt_tokens"] >= len(FIRST) - 1
    seen = drafter.calls
    uncached = run(model, drafter, second_prompt, None)
    assert (second["cycles"], second["avg_acceptance"]) == (uncached["cycles"], uncached["avg_acceptance"])
    for (tokens, hidden), (want_tokens, want_hidden) in zip(seen, drafter.calls):  # the drafter saw the same
        assert tokens == want_tokens
        if want_hidden is not None:
            # Prefilled in other chunks: float32 sums in another order (1.8e-5 seen on one machine's OpenBLAS).
            np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=5e-5)

    # Prompts that share only part of the first: attention caches are trimmed to any shared length; a recurrent
    # state cannot be rewound, so a hybrid target resumes from the checkpoint kept at 12 tokens.
    hybrid = any(adapter_for(model).mixer_kind(layer) == "linear" for layer in adapter_for(model).layers)
    assert run(model, drafter, FIRST[:12] + [3, 3, 3, 3, 3], cache)["reused_prompt_tokens"] == 12
    assert run(model, drafter, FIRST[:20] + [4, 4, 4], cache)["reused_prompt_tokens"] == (12 if hybrid else 20)

    again = run(model, drafter, FIRST, cache)  # entries are copies: generating never changed them
    assert again["generated_token_ids"] == first["generated_token_ids"] and again["reused_prompt_tokens"] > 0
    assert cache.stats()["hits"] >= 2


def test_least_recently_used_entries_go_first():
    model = make_target("llama")
    target = adapter_for(model)
    caches = []
    for prompt in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):
        kv = target.make_cache()
        target.forward(mx.array(prompt), kv, [])
        caches.append((prompt, kv))
    size = sum(entry.nbytes for entry in caches[0][1])
    cache = PromptCache(int(2.5 * size))
    for prompt, kv in caches[:2]:
        cache.store(prompt, kv, (), None)
    assert cache.lookup([1, 2, 3, 99], ()).length == 3  # touches the first entry: the second is now the oldest
    cache.store(*caches[2], (), None)
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= 2.5 * size
    assert cache.lookup([4, 5, 6, 99], ()) is None and cache.lookup([7, 8, 9, 99], ()).length == 3
    assert cache.lookup([1, 2, 3, 99], ((0,), None)) is None  # e.g. a drafter tapping layers needs their states
    with pytest.raises(ValueError, match="must be >= 0 bytes"):
        PromptCache(-1)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_plain_decoding_queues_steps_and_caches_the_last_one(family):
    """With a prompt cache, plain steps are still queued one ahead (as mlx-lm's loop does). At a stop token the
    step after it is already in the cache: the entry holds the stop token too, and the next turn is exact."""
    model = make_target(family)
    expected = greedy_reference(model, FIRST, 12)
    stop = next(t for i, t in enumerate(expected) if i >= 3 and expected.index(t) == i)  # a few steps in
    cut = expected[: expected.index(stop) + 1]
    cache = PromptCache(2**30)
    first = generate_ddtree_once(target_model=model, prompt_tokens=FIRST, max_new_tokens=12, method="ar",
                                 stop_token_ids=[stop], prompt_cache=cache)
    assert first["generated_token_ids"] == cut and first["finish_reason"] == "stop"
    second_prompt = FIRST + cut + [7, 8, 9]
    second = generate_ddtree_once(target_model=model, prompt_tokens=second_prompt, max_new_tokens=8, method="ar",
                                  stop_token_ids=[], prompt_cache=cache)
    assert second["reused_prompt_tokens"] == len(FIRST) + len(cut)  # the stop token's step was queued and kept
    assert second["generated_token_ids"] == greedy_reference(model, second_prompt, 8)


def test_a_stored_recurrent_state_holds_only_its_own_row():
    """A batch row's recurrent window and state live in the batch's stacked arrays (models.batch_cache): the stored
    copy owns its data, so it keeps none of the other rows' alive (measured by MLX's active memory, which counts
    live buffers)."""
    import gc

    from mlx_lm.models.cache import ArraysCache

    from ddtree_mlx.models.batch_cache import BatchCaches

    rows = [ArraysCache(2) for _ in range(8)]
    for entry in rows:
        entry[0], entry[1] = mx.ones((1, 3, 1000)), mx.ones((1, 4, 250, 250))  # a window and a state: 12 KB, 1 MB
    shared = BatchCaches()
    joined = shared.join([[entry] for entry in rows])
    mx.eval([layer.cache for layer in shared.layers.values()])
    del rows
    cache = PromptCache(max_bytes=2**30)
    cache.store([1, 2, 3], joined[2], None, None)
    gc.collect()
    before = mx.get_active_memory()
    del shared, joined
    gc.collect()
    freed = before - mx.get_active_memory()
    assert freed == 8 * (3 * 1000 + 4 * 250 * 250) * 4  # every row's stacked arrays went: the copy owns its own
