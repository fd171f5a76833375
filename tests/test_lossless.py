"""Every generation path equals plain mlx-lm greedy decoding, token for token."""

import pytest
from tiny import OracleDrafter, greedy_reference, make_dflash, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once, stream_generate

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3", "llama"]
PROMPTS = {0: [3, 17, 42, 9, 100, 5], 1: [7, 7, 1, 64, 90, 33, 12, 5, 2, 88, 41]}
NEW_TOKENS = 64

_targets, _references = {}, {}


def target(family, seed=0):
    if (family, seed) not in _targets:
        _targets[family, seed] = make_target(family, seed)
    return _targets[family, seed]


def reference(family, seed, prompt_id):
    key = (family, seed, prompt_id)
    if key not in _references:
        _references[key] = greedy_reference(target(family, seed), PROMPTS[prompt_id], NEW_TOKENS)
    return _references[key]


def run(family, seed, prompt_id, drafter, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("stop_token_ids", [])
    return generate_ddtree_once(target_model=target(family, seed), draft_model=drafter,
                                prompt_tokens=PROMPTS[prompt_id], **kwargs)


def oracle(family, seed, prompt_id, **kwargs):
    return OracleDrafter(PROMPTS[prompt_id] + reference(family, seed, prompt_id), seed=seed + 10 * prompt_id, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [1, 2, 4, 8, 16, 32])
def test_ddtree_oracle_matches_greedy(family, budget):
    for seed, prompt_id in [(0, 0), (1, 1)]:
        drafter = oracle(family, seed, prompt_id)
        result = run(family, seed, prompt_id, drafter, tree_budget=budget)
        assert result["generated_token_ids"] == reference(family, seed, prompt_id)
        assert result["cycles"] < NEW_TOKENS  # the oracle must actually get drafts accepted
    if budget >= 4:
        assert result["fast_path_ratio"] < 1.0, "no cycle accepted a non-first branch: the test lost its teeth"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [1, 2, 4, 8, 16, 32])
def test_ddtree_dflash_drafter_matches_greedy(family, budget):
    for seed, prompt_id in [(0, 1), (1, 0)]:
        drafter = make_dflash(target(family, seed), seed=seed + 5)
        result = run(family, seed, prompt_id, drafter, tree_budget=budget)
        assert result["generated_token_ids"] == reference(family, seed, prompt_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_baselines_match_greedy(family):
    expected = reference(family, 0, 0)
    assert run(family, 0, 0, None, method="ar")["generated_token_ids"] == expected
    dflash = run(family, 0, 0, oracle(family, 0, 0), method="dflash")
    assert dflash["generated_token_ids"] == expected
    assert dflash["fast_path_ratio"] == 1.0 and dflash["cycles"] < NEW_TOKENS
    assert run(family, 0, 0, make_dflash(target(family)), method="dflash")["generated_token_ids"] == expected


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3"])
@pytest.mark.parametrize("setting", [{"exact_commit": True}, {"tree_aware_linear": False}])
def test_engine_variants_match_greedy(family, setting):
    config = DDTreeConfig(tree_budget=8, **setting)
    result = run(family, 1, 1, oracle(family, 1, 1), config=config)
    assert result["generated_token_ids"] == reference(family, 1, 1)


def cycle_ends(family, method):
    """Token counts at which each cycle of an unconstrained run ends."""
    drafter = oracle(family, 0, 0) if method != "ar" else None
    steps = stream_generate(target_model=target(family), draft_model=drafter, prompt_tokens=PROMPTS[0],
                            max_new_tokens=NEW_TOKENS, stop_token_ids=[], tree_budget=8, method=method)
    ends, total = [], 0
    for step in steps:
        total += len(step.tokens)
        ends.append(total)
    return ends


def inside_a_cycle(ends):
    """A token count that falls strictly inside a multi-token cycle."""
    return next(end - 1 for previous, end in zip(ends, ends[1:]) if end - previous >= 2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ddtree", "dflash"])
def test_stop_token_and_length_limit_mid_cycle(family, method):
    expected = reference(family, 0, 0)
    cut = inside_a_cycle(cycle_ends(family, method))
    stop = expected[cut - 1]
    first = expected.index(stop)
    result = run(family, 0, 0, oracle(family, 0, 0), method=method, tree_budget=8, stop_token_ids=[stop])
    assert result["generated_token_ids"] == expected[: first + 1]
    assert result["finish_reason"] == "stop"
    assert result["avg_acceptance"] == first / result["cycles"]  # tokens cut after the stop are not counted
    result = run(family, 0, 0, oracle(family, 0, 0), method=method, tree_budget=8, max_new_tokens=cut)
    assert result["generated_token_ids"] == expected[:cut]
    assert result["finish_reason"] == "length"
    assert result["avg_acceptance"] == (cut - 1) / result["cycles"]


def test_stream_yields_what_generate_returns():
    family = "qwen3_5"
    steps = list(stream_generate(target_model=target(family), draft_model=oracle(family, 0, 0),
                                 prompt_tokens=PROMPTS[0], max_new_tokens=NEW_TOKENS, stop_token_ids=[]))
    assert [t for step in steps for t in step.tokens] == reference(family, 0, 0)
    assert steps[-1].finish_reason == "length" and all(s.finish_reason is None for s in steps[:-1])
    assert any(len(step.tokens) > 2 for step in steps)


def test_result_fields_are_consistent():
    result = run("qwen3_5", 0, 0, oracle("qwen3_5", 0, 0), tree_budget=8)
    assert set(result["phase_timings"]) == {"draft", "build", "verify", "walk", "commit"}
    assert result["avg_acceptance"] == pytest.approx((NEW_TOKENS - 1) / result["cycles"], abs=8 / result["cycles"])
    assert result["tokens_per_second"] > 0 and result["prefill_seconds"] > 0
    assert 0.0 <= result["fast_path_ratio"] <= 1.0


def test_profile_verify_reports_layer_parts_without_changing_tokens():
    config = DDTreeConfig(tree_budget=8, profile_verify=True)
    result = run("qwen3_5", 0, 0, oracle("qwen3_5", 0, 0), config=config)
    assert result["generated_token_ids"] == reference("qwen3_5", 0, 0)
    assert {"attention", "linear", "mlp", "head"} == set(result["verify_profile"]) - {"embed"}
    detail = run("qwen3_5", 0, 0, oracle("qwen3_5", 0, 0), config=config.replace(profile_detail=True))
    assert {"linear.proj", "linear.conv", "linear.recurrence", "attention.sdpa"} <= set(detail["verify_profile"])
    assert sum(result["verify_profile"].values()) <= result["phase_timings"]["verify"]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3", "llama"])
def test_auto_sized_trees_match_greedy(family):
    result = run(family, 0, 1, oracle(family, 0, 1), tree_budget="auto")
    assert result["generated_token_ids"] == reference(family, 0, 1)
    assert len(result["tree_sizes"]) >= 2, "every cycle got the same size: nothing was chosen"
    assert max(result["tree_sizes"]) > 1 and result["fast_path_ratio"] < 1.0  # branches were verified and taken
    assert result["calibration"]["seconds"] and result["calibration"]["scale"] > 0


class SlowAndWrong:
    """A drafter that takes 20 ms and is sure (0.9) of a token the target never picks; it records the context it
    is handed."""

    target_layer_ids: list[int] = []
    block_size = 8

    def reset(self, target, prompt_tokens):
        self.vocab, self.seen = target.vocab_size, []

    def draft(self, root, tokens, hidden):
        import time

        import mlx.core as mx
        import numpy as np

        self.seen += tokens
        time.sleep(0.02)
        rows = np.full((self.block_size - 1, self.vocab), np.log(0.1 / self.vocab), dtype=np.float32)
        rows[:, (root + 1) % self.vocab] = np.log(0.9)
        return mx.array(rows)


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_auto_stops_drafting_when_it_does_not_pay_and_the_drafter_misses_nothing(family, monkeypatch):
    """Plain steps in between (probing) drafts: lossless, and the drafter is still handed every token once, in
    order. (Its 20 ms draft is many of a tiny model's steps, which would space probes past this generation's end:
    here probing may take all the time it likes, so probes come every PROBE_EVERY cycles, on a busy machine too.)"""
    from ddtree_mlx.engine import sizing as tree_size

    monkeypatch.setattr(tree_size, "PROBE_SHARE", 100.0)
    monkeypatch.setattr(tree_size, "PROBE_BACKOFF", 1)
    drafter = SlowAndWrong()
    result = run(family, 0, 1, drafter, tree_budget="auto")
    tokens = result["generated_token_ids"]
    assert tokens == reference(family, 0, 1)
    assert result["method_cycles"]["ar"] > NEW_TOKENS // 2 and result["method_cycles"]["ddtree"] >= 2
    prompt = PROMPTS[1]
    assert drafter.seen == (prompt + tokens)[: len(drafter.seen)] and len(drafter.seen) >= len(prompt) + NEW_TOKENS // 2


@pytest.mark.parametrize("family", ["qwen3_5_moe", "llama"])
def test_split_tree_attention_matches_greedy(family):
    config = DDTreeConfig(tree_budget=8, exact_tree_attention=True, exact_tree_attention_min_prefix=8)
    result = run(family, 1, 1, oracle(family, 1, 1), config=config)
    assert result["generated_token_ids"] == reference(family, 1, 1)
