"""The Metal kernel bodies plugged into the engine through its own dispatch, executed by the CPU harness:
generation stays lossless, and the commit installs exactly what a sequential forward would."""

import mlx.core as mx
import pytest
from metal_harness import harness as H
from tiny import OracleDrafter, greedy_reference, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.kernels import dispatch as kernels
from ddtree_mlx.kernels.metal import LevelPlan
from ddtree_mlx.models.registry import adapter_for

pytestmark = pytest.mark.skipif(not H.harness_available(), reason=f"no C++ compiler ({H.CXX}) for the harness")
PROMPT = [3, 17, 42, 9, 100, 5]


@pytest.fixture
def launches(monkeypatch, fresh_kernels):
    """Route kernel_maker to the harness and count which kernels run."""
    seen = []

    def maker(**spec):
        seen.append(spec["name"])
        return H.cpu_metal_kernel(**spec)

    monkeypatch.setattr(kernels, "kernel_maker", lambda: maker)
    return seen


@pytest.fixture(scope="module")
def target():
    return make_target("qwen3_5", seed=2, linear_key_head_dim=32)  # the kernel needs Dk % 32 == 0


@pytest.mark.parametrize("budget", [1, 6, 16])
def test_engine_with_harness_kernels_matches_greedy(launches, fresh_kernels, target, budget, monkeypatch):
    config = fresh_kernels.replace(tree_budget=budget)
    kernels.prepare(adapter_for(target).kernel_shapes(), config)  # the self-checks first (they build plans too)
    assert kernels.kernel_path(config) == "metal"
    plans = []
    monkeypatch.setattr(LevelPlan, "of", lambda parents, of=LevelPlan.of: plans.append(1) or of(parents))
    expected = greedy_reference(target, PROMPT, 24)
    result = generate_ddtree_once(target_model=target, draft_model=OracleDrafter(PROMPT + expected, seed=budget),
                                  prompt_tokens=PROMPT, max_new_tokens=24, stop_token_ids=[], config=config)
    assert result["generated_token_ids"] == expected
    assert set(launches) == {"ddtree_tree_gated_delta", "ddtree_tree_conv1d"}
    assert result["cycles"] < 24
    assert len(plans) == result["cycles"]  # the level schedule is built once per verify, not once per layer


def test_kernel_switches_fall_back_to_the_twin(launches, fresh_kernels, target):
    expected = greedy_reference(target, PROMPT, 8)
    config = fresh_kernels.replace(tree_budget=4, tree_kernel=False, tree_conv_kernel=False)
    result = generate_ddtree_once(target_model=target, draft_model=OracleDrafter(PROMPT + expected), config=config,
                                  prompt_tokens=PROMPT, max_new_tokens=8, stop_token_ids=[])
    assert result["generated_token_ids"] == expected and launches == []


def test_kernel_verify_equals_twin_verify(launches, fresh_kernels, target):
    from ddtree_mlx.tree.draft_tree import DraftTree

    adapter = adapter_for(target)
    tree = DraftTree.root_only(7)
    for node, parent in enumerate([0, 0, 1, 1, 3, 0, 5], start=1):
        tree.add(parent, 10 + node, 0)
    outputs = []
    for use_kernels in (True, False):
        cache = adapter.make_cache()
        adapter.forward(mx.array(PROMPT), cache, [])
        config = fresh_kernels.replace(tree_kernel=use_kernels, tree_conv_kernel=use_kernels)
        out = adapter.verify(tree, cache, [1], config)
        for capture, entry in zip(out.captures, cache):
            capture.commit(entry, mx.array([0, 1, 3, 4]))
        states = [a for entry in cache if not hasattr(entry, "offset") for a in entry.cache]
        outputs.append([out.logits, out.hidden] + states)
    for with_kernel, with_twin in zip(*outputs):
        assert mx.allclose(with_kernel, with_twin, rtol=1e-5, atol=1e-5).item()


def _generate(target, config, budget=6, tokens=16):
    expected = greedy_reference(target, PROMPT, tokens)
    result = generate_ddtree_once(target_model=target, draft_model=OracleDrafter(PROMPT + expected, seed=budget),
                                  prompt_tokens=PROMPT, max_new_tokens=tokens, stop_token_ids=[],
                                  config=config.replace(tree_budget=budget))
    assert result["generated_token_ids"] == expected
    return result


def test_kernels_that_pass_their_self_check_run(launches, fresh_kernels, target, recwarn):
    result = _generate(target, fresh_kernels)
    assert result["kernels"] == "metal" and not [w for w in recwarn if "failed" in str(w.message)]
    assert kernels.GUARD.checks and all(check.ok for check in kernels.GUARD.checks.values())


def test_a_kernel_that_does_not_build_leaves_the_twin_running(fresh_kernels, target, monkeypatch):
    def maker(**spec):
        raise RuntimeError("[metal::Device] Unable to build metal library from source")

    monkeypatch.setattr(kernels, "kernel_maker", lambda: maker)
    with pytest.warns(RuntimeWarning, match="ddtree_tree_(gated_delta|conv1d) failed.*could not build"):
        result = _generate(target, fresh_kernels)
    assert result["kernels"] == "twin" and set(kernels.GUARD.off) == {"ddtree_tree_gated_delta", "ddtree_tree_conv1d"}


@pytest.mark.parametrize("kernel", ["ddtree_tree_gated_delta", "ddtree_tree_conv1d"])
def test_a_kernel_with_wrong_numbers_leaves_the_twin_running(fresh_kernels, target, monkeypatch, kernel):
    """The self-check really runs the kernel: one that is off by a little in its first output is caught (a check
    comparing the twin with itself would pass it), only that kernel is dropped, and the output stays exact."""
    runs = []

    def maker(**spec):
        built = H.cpu_metal_kernel(**spec)
        if spec["name"] != kernel:
            return built

        def wrong(**launch):
            runs.append(1)
            first, *rest = built(**launch)
            return [first + 0.01] + rest

        return wrong

    monkeypatch.setattr(kernels, "kernel_maker", lambda: maker)
    switch = "DDTREE_TREE_KERNEL" if kernel == "ddtree_tree_gated_delta" else "DDTREE_TREE_CONV_KERNEL"
    with pytest.warns(RuntimeWarning, match=f"{kernel} failed.*{switch}=0"):
        result = _generate(target, fresh_kernels)
    assert runs and result["kernels"] == "metal+twin"
    assert set(kernels.GUARD.off) == {kernel}  # only that kernel is dropped


def test_a_batch_with_harness_kernels_matches_greedy(launches, fresh_kernels, target, monkeypatch):
    """A batch's trees where the kernels run (each launch takes one tree from its own state, so per row, not the
    twin's one solve for all rows): every row is mlx-lm's greedy output."""
    from test_batch import PromptOracle

    from ddtree_mlx import BatchGenerator
    from ddtree_mlx.kernels import recurrence

    config = fresh_kernels.replace(tree_budget=6)
    kernels.prepare(adapter_for(target).kernel_shapes(), config)
    forests = []
    kernel = kernels.forest_gated_delta  # wrapped below to count the rows of each forest it runs
    monkeypatch.setattr(kernels, "forest_gated_delta", lambda *a: forests.append(len(a[-1].rows)) or kernel(*a))
    monkeypatch.setattr(recurrence, "forest_gated_delta", None)  # the twin's forest solve must not run
    prompts = [PROMPT, [55, 21, 33, 90], [7, 8]]
    wants = {tuple(prompt): greedy_reference(target, prompt, 16) for prompt in prompts}
    batch = BatchGenerator(target, PromptOracle(wants), max_batch=3, config=config)
    uids = [batch.insert(prompt, max_new_tokens=16, stop_token_ids=[]) for prompt in prompts]
    got, ran = {uid: [] for uid in uids}, set()
    while batch.has_work:
        for response in batch.next():
            got[response.uid] += response.tokens
            ran |= response.stats.kernels
    assert [got[uid] for uid in uids] == [wants[tuple(prompt)] for prompt in prompts]
    assert max(forests) > 1 and ran == {"metal"}
