"""Prefill as mlx-lm does it: the prompt in chunks with no LM head, then the last token alone. No [n, V] logits
for the prompt, hidden states captured chunk by chunk, and the same output whatever the chunk size."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import greedy_reference, make_dflash, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.models.registry import adapter_for

PROMPT = [int(t) for t in np.random.default_rng(0).integers(0, 128, 23)]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("chunk", [1, 4, 2048])
def test_chunked_prefill_is_lossless(family, chunk):
    model = make_target(family)
    result = generate_ddtree_once(target_model=model, draft_model=make_dflash(model), prompt_tokens=PROMPT,
                                  max_new_tokens=24, stop_token_ids=[], config=DDTreeConfig(tree_budget=4, prefill_step_size=chunk))
    assert result["generated_token_ids"] == greedy_reference(model, PROMPT, 24)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3"])
def test_chunks_capture_the_same_hidden_states_as_one_forward(family):
    target = adapter_for(make_target(family))
    layers = [0, len(target.layers) - 1]
    logits, chunked = target.prefill(PROMPT, target.make_cache(), layers, chunk=5)
    cache = target.make_cache()
    last, whole = target.forward(mx.array(PROMPT), cache, layers)
    assert chunked.shape == (len(PROMPT), 2 * target.hidden_size) and logits.shape == (1, target.vocab_size)
    np.testing.assert_allclose(np.array(chunked), np.array(whole), rtol=1e-5, atol=1e-5)
    # The logits sum over the whole hidden size in BLAS-chosen order: a few float32 steps apart (1.4e-5 seen at
    # magnitude 2.5 on one machine's OpenBLAS), never near a token's worth.
    np.testing.assert_allclose(np.array(logits), np.array(target.logits(last[-1:])), rtol=1e-5, atol=5e-5)


def test_prefill_computes_no_logits_for_the_prompt():
    """A 32k vocabulary and a 384-token prompt: logits for every position would be 48 MiB; the prefill's peak
    memory above what it started with stays far below that (it is the KV cache and one chunk's activations)."""
    target = adapter_for(make_target("llama", vocab_size=32768))
    prompt = list(range(384))
    all_logits = len(prompt) * target.vocab_size * 4
    mx.eval(target.model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    logits, hidden = target.prefill(prompt, target.make_cache(), [], chunk=128)
    mx.eval(logits)
    assert hidden is None
    assert mx.get_peak_memory() - start < all_logits / 8
