"""Sampling through the draft tree has exactly the target's own sampling distribution."""

import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import apply_top_p
from tiny import OracleDrafter, greedy_reference, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.engine.sampling import settled_greedy
from ddtree_mlx.engine.session import Session
from ddtree_mlx.tree.draft_tree import Walk

PROMPT = [3, 17, 42, 9]
RUNS = 1500
ALPHA_Z = 3.09  # one-sided normal quantile for a false-alarm rate of 1e-3 per test


def peaked_target(family):
    """Peaked next-token distributions: few joint outcomes, each seen many times."""
    return make_target(family, seed=3, logit_scale=6.0)


class ProbeDrafter:
    """Proposes the target's own three most likely tokens at depth 1 and, under the best, at depth 2,
    so that sampled paths go through first, second and third branches."""

    target_layer_ids: list[int] = []
    block_size = 3

    def __init__(self, model, prompt):
        self.model, self.prompt, self.memo = model, prompt, {}

    def reset(self, target, prompt_tokens):
        self.history = list(prompt_tokens)

    def draft(self, root_token, context_tokens, context_hidden):
        key = tuple(self.history) + (root_token,)
        if key not in self.memo:
            first = self._next_log_probs(list(key))
            second = self._next_log_probs(list(key) + [int(mx.argmax(first))])
            self.memo[key] = mx.stack([first, second])
        self.history += [root_token]
        return self.memo[key]

    def _next_log_probs(self, tokens):
        logits = self.model(mx.array([tokens]))[0, -1]
        return logits - mx.logsumexp(logits)


def next_distribution(model, prefixes, temperature, top_p):
    """Plain target sampling distribution (mlx-lm's filtering) of the next token after each prefix."""
    logits = model(mx.array(prefixes))[:, -1].astype(mx.float32)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if top_p < 1:
        log_probs = apply_top_p(log_probs, top_p)
    return np.array(mx.softmax(log_probs / temperature, axis=-1))


def exact_joint(model, temperature, top_p, length=3, floor=1e-7):
    joint = {(): 1.0}
    for _ in range(length):
        keys = list(joint)
        probs = next_distribution(model, [PROMPT + list(k) for k in keys], temperature, top_p)
        joint = {k + (int(t),): joint[k] * probs[i, t] for i, k in enumerate(keys)
                 for t in np.flatnonzero(probs[i] * joint[k] > floor)}
    return joint


def chi_square_rejects(counts, joint, runs):
    """Pearson chi-square against the exact joint; rare outcomes pooled so each bin expects >= 5."""
    observed, expected, rare_obs, rare_exp = [], [], 0, 0.0
    for outcome, p in joint.items():
        if p * runs >= 5:
            observed.append(counts.get(outcome, 0))
            expected.append(p * runs)
        else:
            rare_obs += counts.get(outcome, 0)
            rare_exp += p * runs
    rare_obs += sum(c for o, c in counts.items() if o not in joint)
    observed.append(rare_obs)
    expected.append(max(rare_exp, 1e-9))
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    critical = dof * (1 - 2 / (9 * dof) + ALPHA_Z * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty
    return statistic > critical, statistic, critical, dof


def sample_counts(model, temperature, top_p, runs=RUNS):
    drafter = ProbeDrafter(model, PROMPT)
    counts, branches = Counter(), 0
    for seed in range(runs):
        result = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=PROMPT,
                                      max_new_tokens=3, stop_token_ids=[], tree_budget=4,
                                      temperature=temperature, top_p=top_p, seed=seed)
        counts[tuple(result["generated_token_ids"])] += 1
        branches += result["fast_path_ratio"] < 1
    return counts, branches


@pytest.mark.slow  # 1,500 sampled generations
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_joint_distribution_of_first_tokens_matches_target(family, temperature, top_p):
    model = peaked_target(family)
    counts, branches = sample_counts(model, temperature, top_p)
    assert branches > RUNS // 20, "sampled paths never left the first branch: the test lost its teeth"
    rejects, statistic, critical, dof = chi_square_rejects(counts, exact_joint(model, temperature, top_p), RUNS)
    assert not rejects, f"chi-square {statistic:.1f} > {critical:.1f} (dof {dof})"


@pytest.mark.slow  # 600 sampled generations
def test_a_biased_walk_is_detected(monkeypatch):
    """The same test with a walk that takes the drafter's first child whenever the draw misses: must reject."""
    def biased_walk(tree, target_tokens):
        path, target_tokens = [0], np.array(target_tokens)
        while tree.children[path[-1]]:
            drawn = tree.children[path[-1]].get(int(target_tokens[path[-1]]))
            path.append(drawn if drawn is not None else min(tree.children[path[-1]].values()))
        padded = path + [path[-1]] * (max(tree.depths) + 1 - len(path))
        return Walk(mx.array(padded, dtype=mx.int32), mx.array(len(path), dtype=mx.int32))

    monkeypatch.setattr(Session, "walk", staticmethod(biased_walk))
    model = peaked_target("qwen3_5")
    counts, _ = sample_counts(model, 1.0, 1.0, runs=600)
    assert chi_square_rejects(counts, exact_joint(model, 1.0, 1.0), 600)[0]


def test_seed_reproduces_and_temperature_zero_is_greedy():
    model = make_target("qwen3_5")
    truth = PROMPT + greedy_reference(model, PROMPT, 24)
    run = lambda **kw: generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=PROMPT,
                                            max_new_tokens=24, stop_token_ids=[], tree_budget=8, **kw)
    assert run(temperature=0.0, seed=5)["generated_token_ids"] == truth[len(PROMPT):]
    first, again, other = run(temperature=1.0, seed=7), run(temperature=1.0, seed=7), run(temperature=1.0, seed=8)
    assert first["generated_token_ids"] == again["generated_token_ids"]
    assert first["generated_token_ids"] != other["generated_token_ids"]


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.1}, "temperature must be a number >= 0"),
    ({"temperature": "hot"}, "temperature must be a number >= 0"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"seed": "x"}, "seed must be an integer"),
])
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_ddtree_once(target_model=make_target("qwen3"), draft_model=None, method="ar",
                             prompt_tokens=PROMPT, max_new_tokens=2, **kwargs)


def greedy_of_log_probs(logits):
    """mlx-lm's greedy choice, written out: the argmax of logits - logsumexp(logits) in the logits' dtype."""
    return mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_settled_greedy_is_mlx_lms_greedy(dtype):
    rng = np.random.default_rng(0)
    for scale in (0.5, 4.0, 30.0):
        logits = mx.array(rng.normal(size=(16, 5000)) * scale).astype(dtype)
        assert settled_greedy(logits).tolist() == greedy_of_log_probs(logits).tolist()


def test_settled_greedy_defers_to_mlx_lm_at_a_tie_its_rounding_makes():
    # Two bf16 logits one ulp apart after ~1,000 zeros: less the logsumexp (~6.9) they round to one log-prob, so
    # mlx-lm takes the first of them where the raw argmax takes the larger.
    logits = mx.zeros((2, 1000), dtype=mx.bfloat16)
    logits[0, 3], logits[0, 7] = 0.5, 0.5 + 2**-8
    logits[1, 9] = 3.0  # a clear row beside it
    want = greedy_of_log_probs(logits).tolist()
    assert want == [3, 9] and mx.argmax(logits, axis=-1).tolist() == [7, 9]  # the case is a real merge
    assert settled_greedy(logits).tolist() == want


@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan])
def test_settled_greedy_with_infinities_and_nans(special):
    logits = mx.array(np.random.default_rng(1).normal(size=(3, 300)).astype(np.float32))
    logits[1, 5] = special
    assert settled_greedy(logits).tolist() == greedy_of_log_probs(logits).tolist()
