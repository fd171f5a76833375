"""A quantized KV cache (kv_bits, kv_group_size, quantized_kv_start as mlx-lm means them): DDTree gives mlx-lm's
own greedy output with the same settings, including when the cache turns quantized in the middle of a cycle."""

import numpy as np
import pytest
from tiny import OracleDrafter, assert_lossless, make_target, mlx_lm_greedy

from ddtree_mlx import generate_ddtree_once

PROMPT = [int(t) for t in np.random.default_rng(11).integers(0, 120, 20)]
NEW = 40
_targets = {}


def target(family):
    if family not in _targets:
        _targets[family] = make_target(family, seed=4, head_dim=32)  # kv groups of 32 need a head size they divide
    return _targets[family]


@pytest.mark.parametrize("family", ["qwen3_5", "llama", "qwen3"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("start", [0, len(PROMPT) + 7])  # quantized from the prompt on, or from mid-generation
def test_matches_mlx_lm_with_the_same_kv_settings(family, bits, start):
    model = target(family)
    options = dict(kv_bits=bits, kv_group_size=32, quantized_kv_start=start)
    reference = mlx_lm_greedy(model, PROMPT, NEW, **options)
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + reference.tokens, seed=bits),
                                  prompt_tokens=PROMPT, max_new_tokens=NEW, stop_token_ids=[], tree_budget=12, **options)
    assert_lossless(result["generated_token_ids"], reference, exact=True, label=f"{family}/kv{bits}/start{start}")
    assert result["cycles"] < NEW / 2 and result["fast_path_ratio"] < 1  # deep trees, branches taken


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_the_cache_turns_quantized_at_the_token_mlx_lm_turns_it(family):
    """2-bit keys and values flip the tiny models' next token right where the cache turns quantized, for many
    starts: a tree that computed its deeper nodes on the plain cache past the start would give the plain token."""
    model = target(family)
    for offset in range(1, 13):
        options = dict(kv_bits=2, kv_group_size=32, quantized_kv_start=len(PROMPT) + offset)
        reference = mlx_lm_greedy(model, PROMPT, 20, **options)
        result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + reference.tokens),
                                      prompt_tokens=PROMPT, max_new_tokens=20, stop_token_ids=[], tree_budget=12,
                                      **options)
        assert_lossless(result["generated_token_ids"], reference, exact=True, label=f"{family}/kv2/+{offset}")


def test_the_settings_matter():
    """Else the test above could not tell a quantized cache from a plain one."""
    model = target("llama")
    plain = mlx_lm_greedy(model, PROMPT, NEW).tokens
    assert mlx_lm_greedy(model, PROMPT, NEW, kv_bits=4, kv_group_size=32, quantized_kv_start=0).tokens != plain


@pytest.mark.parametrize("options,message", [
    (dict(kv_bits=7), "kv_bits must be one of"),
    (dict(kv_bits=4, kv_group_size=64), "divide the model's head size 32"),
    (dict(kv_bits=4, kv_group_size=32, quantized_kv_start=-1), "quantized_kv_start must be an integer >= 0"),
])
def test_bad_settings_fail_before_model_work(options, message):
    with pytest.raises(ValueError, match=message):
        generate_ddtree_once(target_model=target("llama"), draft_model=None, method="ar", prompt_tokens=PROMPT,
                             max_new_tokens=4, **options)
