"""The lossless standard, in one place: every family in every form Mac users run (float32, bf16, 8-bit, 4-bit,
mixed bits) x budgets x drafters (oracle, DFlash, prompt lookup) against mlx-lm's own greedy decoding of the same
model; then every other way through the engine (plain decoding, DFlash's single path, stop tokens and length
limits inside a cycle, streaming, engine settings, profiling, automatic tree sizes, split tree attention, long
contexts).

float32 must match token for token; bf16 and quantized targets may leave mlx-lm only at a near-tie (see
tiny.assert_lossless). The oracle drafter puts the true token off the first rank often, and the tests assert that
branches other than the first were taken. The guards check that the near-tie bound has teeth."""

import mlx.core as mx
import numpy as np
import pytest
from tiny import (
    FORMS,
    NEAR_TIE,
    STEP,
    OracleDrafter,
    assert_lossless,
    make_dflash,
    make_target,
    mlx_lm_greedy,
    target_time,
)

from ddtree_mlx import DDTreeConfig, PromptLookupDrafter, generate_ddtree_once, stream_generate
from ddtree_mlx.engine import generate as generate_module
from ddtree_mlx.engine import sizing

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3", "llama"]
PROMPT = [3, 17, 42, 9, 100, 5, 61, 17, 42]
NEW_TOKENS = 48
# float32 from a one-node chain to the default cap; the other forms at the sizes in between.
BUDGETS = {"f32": [1, 2, 6, 16, 32]}
OTHER_BUDGETS = [2, 6, 16]
slow = pytest.mark.slow
# The fast tier keeps float32 where a test runs every form, beside the oracle column of the matrix (every form).
SLOW_FORMS = [form if form == "f32" else pytest.param(form, marks=slow) for form in FORMS]

_targets, _references = {}, {}


def cpu_bf16_moe(family, form):
    return family == "qwen3_5_moe" and form == "bf16" and mx.default_device() == mx.cpu


def runnable(family, form):
    if cpu_bf16_moe(family, form):
        pytest.skip("MLX's CPU GatherMM supports only float32: mlx-lm itself cannot run a bf16 MoE here")


def target(family, form="f32"):
    if (family, form) not in _targets:
        _targets[family, form] = make_target(family, seed=2, form=form)  # text that wanders in every form (a guard)
    return _targets[family, form]


def reference(family, form="f32"):
    if (family, form) not in _references:
        _references[family, form] = mlx_lm_greedy(target(family, form), PROMPT, NEW_TOKENS)
    return _references[family, form]


def oracle(family, form="f32", seed=0):
    return OracleDrafter(PROMPT + reference(family, form).tokens, seed=seed)


def generate(family, drafter, form="f32", **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("stop_token_ids", [])
    return generate_ddtree_once(target_model=target(family, form), draft_model=drafter, prompt_tokens=PROMPT,
                                **kwargs)


def drafter(kind, family, form, budget):
    if kind == "oracle":
        return oracle(family, form, seed=budget)
    if kind == "dflash":
        return make_dflash(target(family, form), seed=budget)
    return PromptLookupDrafter()


# --- the matrix ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["oracle", pytest.param("dflash", marks=slow), pytest.param("lookup", marks=slow)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_mlx_lm(family, form, kind):
    """The fast tier keeps the oracle column: every family in every form, its branches taken."""
    runnable(family, form)
    cycles = []
    for budget in BUDGETS.get(form, OTHER_BUDGETS):
        result = generate(family, drafter(kind, family, form, budget), form, tree_budget=budget)
        assert_lossless(result["generated_token_ids"], reference(family, form), exact=form == "f32",
                        label=f"{family}/{form}/{kind}/budget {budget}")
        cycles.append(result["cycles"])
        if kind == "oracle":
            assert result["cycles"] < NEW_TOKENS, "the oracle must get drafts accepted"
            if budget >= 6:
                assert result["fast_path_ratio"] < 1.0, "no cycle accepted a non-first branch: the test lost its teeth"
    if kind == "oracle":
        assert cycles[-1] < NEW_TOKENS / 2, "the oracle must get deep drafts accepted"


@pytest.mark.parametrize("form", SLOW_FORMS)
def test_plain_decoding_and_the_single_path_match_mlx_lm(form):
    """method="ar" (plain steps, queued one ahead as mlx-lm does) and method="dflash" (a chain of the drafter's
    first choices: with the oracle, every cycle on the fast path; with a random DFlash drafter, mostly misses)."""
    for family in FAMILIES:
        if cpu_bf16_moe(family, form):
            continue
        want, exact = reference(family, form), form == "f32"
        plain = generate(family, None, form, method="ar")
        assert_lossless(plain["generated_token_ids"], want, exact, label=f"{family}/{form}/ar")
        single = generate(family, oracle(family, form), form, method="dflash")
        assert_lossless(single["generated_token_ids"], want, exact, label=f"{family}/{form}/dflash oracle")
        assert single["fast_path_ratio"] == 1.0 and single["cycles"] < NEW_TOKENS
        single = generate(family, make_dflash(target(family, form)), form, method="dflash")
        assert_lossless(single["generated_token_ids"], want, exact, label=f"{family}/{form}/dflash drafter")


# --- the guards: the near-tie bound must have teeth -----------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_test_models_have_clear_margins_and_wander(family, form):
    """A bound is only meaningful if ties are rare: the tiny models' median top-2 margin is >= 10x NEAR_TIE. And
    the text must wander: a model repeating one token would give the same output from a wrong context (a leaked
    sibling, a stale cache)."""
    runnable(family, form)
    assert np.median(reference(family, form).margins) >= 10 * NEAR_TIE
    assert len(set(reference(family, form).tokens)) >= NEW_TOKENS // 3


@pytest.mark.parametrize("form", ["bf16", "q4"])
def test_a_deliberate_non_tie_error_fails_the_check(monkeypatch, form):
    """The engine made to pick the runner-up at a token with a clear margin: the check must fail."""
    family = "qwen3_5"
    ref = reference(family, form)
    clear = next(i for i, margin in enumerate(ref.margins) if margin > 10 * NEAR_TIE)

    class RunnerUp(generate_module.TokenChooser):
        calls = 0

        def __call__(self, logits, now=False):
            tokens = super().__call__(logits, now)
            RunnerUp.calls += 1
            if RunnerUp.calls == clear + 1:  # plain decoding: call i chooses token i (prefill is call 0)
                tokens = mx.argsort(logits, axis=-1)[:, -2]
            return tokens

    monkeypatch.setattr(generate_module, "TokenChooser", RunnerUp)
    result = generate(family, None, form, method="ar")
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_lossless(result["generated_token_ids"], ref, exact=False, label="injected")


# --- every other path through the engine (float32: token for token) -------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3"])
@pytest.mark.parametrize("setting", [{"exact_commit": True}, {"tree_aware_linear": False}])
def test_engine_variants_match_mlx_lm(family, setting):
    result = generate(family, oracle(family, seed=1), config=DDTreeConfig(tree_budget=8, **setting))
    assert_lossless(result["generated_token_ids"], reference(family), exact=True, label=f"{family}/{setting}")
    assert result["fast_path_ratio"] < 1.0


@pytest.mark.parametrize("family", ["qwen3_5_moe", "llama"])
def test_split_tree_attention_matches_mlx_lm(family):
    config = DDTreeConfig(tree_budget=8, exact_tree_attention=True, exact_tree_attention_min_prefix=8)
    result = generate(family, oracle(family, seed=1), config=config)
    assert_lossless(result["generated_token_ids"], reference(family), exact=True, label=f"{family}/split attention")
    assert result["fast_path_ratio"] < 1.0


def cycle_ends(family, method):
    """Token counts at which each cycle of an unconstrained run ends."""
    steps = stream_generate(target_model=target(family), draft_model=oracle(family), prompt_tokens=PROMPT,
                            max_new_tokens=NEW_TOKENS, stop_token_ids=[], tree_budget=8, method=method)
    ends, total = [], 0
    for step in steps:
        total += len(step.tokens)
        ends.append(total)
    return ends


def inside_a_cycle(ends, tokens):
    """A token count that falls strictly inside a multi-token cycle, at a token seen there first (as a stop token,
    it ends the generation inside that cycle)."""
    return next(end - 1 for previous, end in zip(ends, ends[1:])
                if end - previous >= 2 and tokens.index(tokens[end - 2]) == end - 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ddtree", "dflash"])
def test_stop_token_and_length_limit_mid_cycle(family, method):
    expected = reference(family).tokens
    cut = inside_a_cycle(cycle_ends(family, method), expected)
    result = generate(family, oracle(family), method=method, tree_budget=8, stop_token_ids=[expected[cut - 1]])
    assert result["generated_token_ids"] == expected[:cut]
    assert result["finish_reason"] == "stop"
    assert result["avg_acceptance"] == (cut - 1) / result["cycles"]  # tokens cut after the stop are not counted
    result = generate(family, oracle(family), method=method, tree_budget=8, max_new_tokens=cut)
    assert result["generated_token_ids"] == expected[:cut]
    assert result["finish_reason"] == "length"
    assert result["avg_acceptance"] == (cut - 1) / result["cycles"]


def test_stream_yields_what_generate_returns():
    family = "qwen3_5"
    steps = list(stream_generate(target_model=target(family), draft_model=oracle(family), prompt_tokens=PROMPT,
                                 max_new_tokens=NEW_TOKENS, stop_token_ids=[]))
    assert [t for step in steps for t in step.tokens] == reference(family).tokens
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])
    assert any(len(step.tokens) > 2 for step in steps)


def test_result_fields_are_consistent():
    result = generate("qwen3_5", oracle("qwen3_5"), tree_budget=8)
    assert set(result["phase_timings"]) == {"draft", "build", "verify", "walk", "commit"}
    assert result["avg_acceptance"] == pytest.approx((NEW_TOKENS - 1) / result["cycles"], abs=8 / result["cycles"])
    assert result["tokens_per_second"] > 0 and result["prefill_seconds"] > 0
    assert 0.0 <= result["fast_path_ratio"] <= 1.0


def test_profile_verify_reports_layer_parts_without_changing_tokens():
    config = DDTreeConfig(tree_budget=8, profile_verify=True)
    result = generate("qwen3_5", oracle("qwen3_5"), config=config)
    assert result["generated_token_ids"] == reference("qwen3_5").tokens
    assert {"attention", "linear", "mlp", "head"} == set(result["verify_profile"]) - {"embed"}
    detail = generate("qwen3_5", oracle("qwen3_5"), config=config.replace(profile_detail=True))
    assert detail["generated_token_ids"] == reference("qwen3_5").tokens
    assert {"linear.proj", "linear.conv", "linear.recurrence", "attention.sdpa"} <= set(detail["verify_profile"])
    assert sum(result["verify_profile"].values()) <= result["phase_timings"]["verify"]


# --- automatic tree sizes, on a fake clock (what auto decides from the cycles' times is then the same every run) --


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "llama"])
def test_auto_sized_trees_match_mlx_lm(family, monkeypatch):
    target_time(monkeypatch, target(family))
    result = generate(family, oracle(family), tree_budget="auto")
    assert_lossless(result["generated_token_ids"], reference(family), exact=True, label=f"{family}/auto")
    assert len(result["tree_sizes"]) >= 2, "every cycle got the same size: nothing was chosen"
    assert max(result["tree_sizes"]) > 1 and result["fast_path_ratio"] < 1.0  # branches were verified and taken
    assert result["calibration"]["seconds"] and result["calibration"]["scale"] > 0


class SlowAndWrong:
    """A drafter that takes two target steps (on the fake clock) and is sure (0.9) of a token the target never
    picks; it records the context it is handed."""

    target_layer_ids: list[int] = []
    block_size = 8

    def __init__(self, clock):
        self.clock = clock

    def reset(self, target, prompt_tokens):
        self.vocab, self.seen = target.vocab_size, []

    def draft(self, root, tokens, hidden):
        self.seen += tokens
        self.clock.advance(2 * STEP)
        rows = np.full((self.block_size - 1, self.vocab), np.log(0.1 / self.vocab), dtype=np.float32)
        rows[:, (root + 1) % self.vocab] = np.log(0.9)
        return mx.array(rows)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_auto_stops_drafting_when_it_does_not_pay_and_the_drafter_misses_nothing(family, monkeypatch):
    """Plain steps in between (probing) drafts: lossless, and the drafter is still handed every token once, in
    order. (Its draft costs two steps, which would space probes past this generation's end: here probing may take
    all the time it likes, so probes come every 8 cycles.)"""
    monkeypatch.setattr(sizing, "PROBE_EVERY", 8)
    monkeypatch.setattr(sizing, "PROBE_SHARE", 100.0)
    monkeypatch.setattr(sizing, "PROBE_BACKOFF", 1)
    drafter = SlowAndWrong(target_time(monkeypatch, target(family)))
    result = generate(family, drafter, tree_budget="auto")
    tokens = result["generated_token_ids"]
    assert_lossless(tokens, reference(family), exact=True, label=f"{family}/auto, a drafter that never pays")
    assert result["method_cycles"]["ar"] > NEW_TOKENS // 2 and result["method_cycles"]["ddtree"] >= 2
    assert drafter.seen == (PROMPT + tokens)[: len(drafter.seen)] and len(drafter.seen) >= len(PROMPT) + NEW_TOKENS // 2


# --- long contexts: split attention on the CPU, in every form ----------------------------------------------------


@pytest.mark.parametrize("form", SLOW_FORMS)
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_a_long_context_matches_mlx_lm(monkeypatch, family, form):
    """Past DDTREE_EXACT_TREE_ATTENTION_MIN_PREFIX the default attention on the CPU is split, its softmax on
    cpu_exp's exp, in tree verifies and plain steps alike: still mlx-lm's greedy output, every branch of a deep
    tree taken as the oracle leads, and every plain step's token."""
    from ddtree_mlx.models import attention as base

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
