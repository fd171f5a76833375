"""The lossless matrix: every family in every form Mac users run (float32, bf16, 8-bit, 4-bit, mixed bits) x
budgets x drafters (oracle, DFlash, prompt lookup) against mlx-lm's own greedy decoding of the same model.

float32 must match token for token; bf16 and quantized targets may leave mlx-lm only at a near-tie (see
tiny.assert_lossless). The guards below check that the bound has teeth."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import (
    FORMS,
    NEAR_TIE,
    OracleDrafter,
    assert_lossless,
    make_dflash,
    make_target,
    mlx_lm_greedy,
)

from ddtree_mlx import PromptLookupDrafter, generate_ddtree_once
from ddtree_mlx.engine import generate as generate_module

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3", "llama"]
PROMPT = [3, 17, 42, 9, 100, 5, 61, 17, 42]
NEW_TOKENS = 48
BUDGETS = [2, 6, 16]

_targets, _references = {}, {}


def cpu_bf16_moe(family, form):
    return family == "qwen3_5_moe" and form == "bf16" and mx.default_device() == mx.cpu


def runnable(family, form):
    if cpu_bf16_moe(family, form):
        pytest.skip("MLX's CPU GatherMM supports only float32: mlx-lm itself cannot run a bf16 MoE here")


def target(family, form):
    if (family, form) not in _targets:
        _targets[family, form] = make_target(family, seed=3, form=form)
    return _targets[family, form]


def reference(family, form):
    if (family, form) not in _references:
        _references[family, form] = mlx_lm_greedy(target(family, form), PROMPT, NEW_TOKENS)
    return _references[family, form]


def drafter(kind, family, form, budget):
    if kind == "oracle":
        return OracleDrafter(PROMPT + reference(family, form).tokens, seed=budget)
    if kind == "dflash":
        return make_dflash(target(family, form), seed=budget)
    return PromptLookupDrafter()


@pytest.mark.parametrize("kind", ["oracle", "dflash", "lookup"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_mlx_lm(family, form, kind):
    runnable(family, form)
    cycles = []
    for budget in BUDGETS:
        result = generate_ddtree_once(target_model=target(family, form), prompt_tokens=PROMPT,
                                      draft_model=drafter(kind, family, form, budget), tree_budget=budget,
                                      max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        assert_lossless(result["generated_token_ids"], reference(family, form), exact=form == "f32",
                        label=f"{family}/{form}/{kind}/budget {budget}")
        cycles.append(result["cycles"])
        if kind == "oracle" and budget >= 6:
            assert result["fast_path_ratio"] < 1.0, "no cycle accepted a non-first branch: the test lost its teeth"
    if kind == "oracle":
        assert cycles[-1] < NEW_TOKENS / 2, "the oracle must get deep drafts accepted"


@pytest.mark.parametrize("form", FORMS)
def test_plain_decoding_matches_mlx_lm(form):
    for family in FAMILIES:
        if cpu_bf16_moe(family, form):
            continue
        result = generate_ddtree_once(target_model=target(family, form), draft_model=None, method="ar",
                                      prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        assert_lossless(result["generated_token_ids"], reference(family, form), exact=form == "f32",
                        label=f"{family}/{form}/ar")


# --- the guards: the near-tie bound must have teeth -----------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_test_models_have_clear_margins(family, form):
    """A bound is only meaningful if ties are rare: the tiny models' median top-2 margin is >= 10x NEAR_TIE."""
    runnable(family, form)
    assert np.median(reference(family, form).margins) >= 10 * NEAR_TIE


@pytest.mark.parametrize("form", ["bf16", "q4"])
def test_a_deliberate_non_tie_error_fails_the_check(monkeypatch, form):
    """The engine made to pick the runner-up at a token with a clear margin: the check must fail."""
    family = "qwen3_5"
    ref = reference(family, form)
    clear = next(i for i, margin in enumerate(ref.margins) if margin > 10 * NEAR_TIE)

    class RunnerUp(generate_module.TokenChooser):
        calls = 0

        def __call__(self, logits):
            tokens = super().__call__(logits)
            RunnerUp.calls += 1
            if RunnerUp.calls == clear + 1:  # plain decoding: call i chooses token i (prefill is call 0)
                tokens = mx.argsort(logits, axis=-1)[:, -2]
            return tokens

    monkeypatch.setattr(generate_module, "TokenChooser", RunnerUp)
    result = generate_ddtree_once(target_model=target(family, form), draft_model=None, method="ar",
                                  prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_lossless(result["generated_token_ids"], ref, exact=False, label="injected")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_a_long_context_matches_mlx_lm(monkeypatch, family, form):
    """Past DDTREE_EXACT_TREE_ATTENTION_MIN_PREFIX the default attention on the CPU is split, its softmax on
    cpu_exp's exp, in tree verifies and plain steps alike: still mlx-lm's greedy output, every branch of a deep
    tree taken as the oracle leads, and every plain step's token."""
    from ddtree_mlx.models import adapter as base

    runnable(family, form)
    split, step, rows, steps = base.split_attention, base.step_attention, [], []
    monkeypatch.setattr(base, "split_attention", lambda *args: rows.append(args[0].shape[2]) or split(*args))
    monkeypatch.setattr(base, "step_attention", lambda *args: steps.append(1) or step(*args))
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 120, 1100)]
    model = target(family, form)
    want = mlx_lm_greedy(model, prompt, 24)
    result = generate_ddtree_once(target_model=model, prompt_tokens=prompt, tree_budget=6, max_new_tokens=24,
                                  draft_model=OracleDrafter(prompt + want.tokens, seed=1), stop_token_ids=[])
    assert_lossless(result["generated_token_ids"], want, exact=form == "f32", label=f"{family}/{form}/1,100 tokens")
    assert max(rows) > 1 and result["cycles"] < 12 and result["fast_path_ratio"] < 1.0
    steps.clear()
    plain = generate_ddtree_once(target_model=model, prompt_tokens=prompt, draft_model=None, method="ar",
                                 max_new_tokens=24, stop_token_ids=[])
    assert_lossless(plain["generated_token_ids"], want, exact=form == "f32", label=f"{family}/{form}/1,100 ar")
    assert len(steps) >= 23  # every step after the prefill's token, in each of its attention layers
