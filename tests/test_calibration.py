"""Verify cost per tree size measured on this machine: the measurement, its time bound, and its cache on disk."""

import json

import pytest
from tiny import OracleDrafter, greedy_reference, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.engine import calibration
from ddtree_mlx.engine.calibration import VerifyCosts
from ddtree_mlx.models.registry import adapter_for

PROMPT = [3, 17, 42, 9, 100, 5]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A configuration whose disk cache is empty (never the user's own), and no costs remembered in memory."""
    monkeypatch.setattr(calibration, "_MEMORY", {})
    return DDTreeConfig(cache_dir=str(tmp_path))


def saved(config):
    """The curves on disk."""
    return list((config.cache_path / "calibration").glob("*.json"))


def test_measuring_a_real_target(monkeypatch):
    target = adapter_for(make_target("qwen3_5"))
    monkeypatch.setattr(calibration, "TIME_BUDGET", float("inf"))  # the whole grid, however busy the machine
    costs = calibration.measure(target, sizes=(1, 4, 16))
    assert costs.sizes == (1, 4, 16) and all(s > 0 for s in costs.seconds)
    monkeypatch.setattr(calibration, "TIME_BUDGET", 0.0)  # a slow machine: the grid stops after two sizes
    assert calibration.measure(target).sizes == calibration.SIZES[:2]


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_the_long_context_measures_what_each_context_token_adds(monkeypatch, family):
    """Verify timings that grow with the context as (step, tree, per node) seconds per token: the calibration
    recovers them after growing the caches to the long context (from one tree size: all per node)."""
    target = adapter_for(make_target(family))
    seen = set()

    def timer(target, config, rng):
        def run(size, cache):
            context = target.prefix_length(cache)
            first_long = context > 32 and context not in seen
            seen.add(context)
            spike = 4.0 if first_long else 0.0  # the first run there stalls once (seen: 4.3 s for 0.095 s)
            return spike + 0.01 + 0.001 * size + (context - 32) * (2e-6 if size == 1 else 3e-6 + 1e-6 * size)
        return run

    monkeypatch.setattr(calibration, "timer", timer)
    monkeypatch.setattr(calibration, "LONG_CONTEXT", 600)
    monkeypatch.setattr(calibration, "LONG_BUDGET", 0.0)  # a slow machine: one counted round at the long context
    costs = calibration.measure(target)
    assert seen == {32, 600}
    assert costs.per_token == pytest.approx((2e-6, 3e-6, 1e-6))
    assert costs.at(5, 2032) == pytest.approx(0.015 + 2000 * 8e-6)
    # A slow machine's grid stops at two sizes (the reference BLAS): one tree size at the long context, whose
    # per-token cost is then all per node (each attends over the context), so bigger trees pay more of it.
    monkeypatch.setattr(calibration, "TIME_BUDGET", 0.0)
    slow = calibration.measure(target)
    assert slow.sizes == (1, 2) and slow.per_token == pytest.approx((2e-6, 0.0, (3e-6 + 2e-6) / 2))
    cheap_trees = VerifyCosts((1, 2), (0.01, 0.01), (1e-5, 0.0, 1e-6))
    assert cheap_trees.at(2, 1032) == pytest.approx(0.01 + 1000 * 1e-5)  # a tree costs at least its root's step


def test_measured_once_then_read_from_disk(fresh, monkeypatch):
    target = adapter_for(make_target("llama"))
    monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2), (1.0, 1.5), (1e-6, 0, 0)))
    assert calibration.verify_costs(target, fresh).seconds == (1.0, 1.5)
    [curve] = saved(fresh)
    monkeypatch.setattr(calibration, "_MEMORY", {})
    monkeypatch.setattr(calibration, "measure", lambda target, config: pytest.fail("measured again"))
    assert calibration.verify_costs(target, fresh) == VerifyCosts((1, 2), (1.0, 1.5), (1e-6, 0, 0))
    for broken in ("{not json", json.dumps({"format": 99, "sizes": [1, 2], "seconds": [1.0, 2.0]}),
                   json.dumps({"format": calibration.FORMAT, "sizes": [1], "seconds": [1.0]}),
                   json.dumps({"format": calibration.FORMAT, "sizes": [2, 1], "seconds": [1.0, 2.0]}),
                   json.dumps({"format": calibration.FORMAT, "sizes": [1, 2], "seconds": [0.0, 1.0]}),
                   json.dumps({"format": calibration.FORMAT, "sizes": [1, 2], "seconds": [1.0, 2.0]}),
                   json.dumps({"format": calibration.FORMAT, "sizes": [1, 2], "seconds": [1.0, 2.0],
                               "per_token": [1e-6, -1e-6, 0.0]})):
        curve.write_text(broken)
        monkeypatch.setattr(calibration, "_MEMORY", {})
        monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2), (1.0, 1.2)))
        assert calibration.verify_costs(target, fresh).seconds == (1.0, 1.2)  # measured again, no error


def test_a_curve_measured_on_a_busy_machine_is_not_kept(fresh, monkeypatch, caplog):
    """A tree verified faster than a plain step (another job slowed the plain steps) is used for this process
    only, with a warning, and measured again by the next; such a file on disk counts as broken."""
    target = adapter_for(make_target("llama"))
    busy = VerifyCosts((1, 2, 3), (0.125, 0.115, 0.1))
    monkeypatch.setattr(calibration, "measure", lambda target, config: busy)
    assert calibration.verify_costs(target, fresh) == busy
    assert "busy" in caplog.text and not saved(fresh)
    monkeypatch.setattr(calibration, "_MEMORY", {})
    monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2, 3), (0.1, 0.115, 0.125)))
    assert calibration.verify_costs(target, fresh).seconds == (0.1, 0.115, 0.125)
    [curve] = saved(fresh)
    for busy_at_length in ([0.125, 0.115, 0.1], [0.0, 0.0, 0.0]), ([0.1, 0.115, 0.125], [1e-3, 2e-5, 1e-6]):
        # Busy after the grid's prompt; or after the long context, where a plain step cost more per context token
        # than a tree of 2 or 3 nodes (seen: 1.05 ms per token for a plain step, 0.02 ms for a tree).
        seconds, per_token = busy_at_length
        curve.write_text(json.dumps({"format": calibration.FORMAT, "sizes": [1, 2, 3], "seconds": seconds,
                                     "per_token": per_token}))
        monkeypatch.setattr(calibration, "_MEMORY", {})
        monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2, 3), (0.1, 0.115, 0.125)))
        assert calibration.verify_costs(target, fresh).per_token == (0.0, 0.0, 0.0)  # the busy file: measured again


def test_the_key_follows_what_the_cost_depends_on(monkeypatch):
    keys = {calibration.machine_key(adapter_for(make_target("llama", form=form))) for form in ("f32", "bf16", "q4")}
    assert len(keys) == 3
    target = adapter_for(make_target("llama"))
    before = calibration.machine_key(target)
    monkeypatch.setattr(calibration, "blas_name", lambda: "another BLAS")
    assert calibration.machine_key(target) != before
    # Verify attention split or not costs differently per context token: a curve measured one way is not the other's.
    assert calibration.machine_key(target, DDTreeConfig(exact_tree_attention=False)) != calibration.machine_key(target)


def test_auto_uses_the_measured_costs_and_stays_lossless(fresh, monkeypatch):
    model = make_target("qwen3_5")
    expected = greedy_reference(model, PROMPT, 24)
    sizes = {}
    for name, node in (("dear", 0.8), ("cheap", 0.01)):  # what one more node costs, in one-token verifies
        monkeypatch.setattr(calibration, "_MEMORY", {})
        monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2), (1.0, 1.0 + node)))
        config = fresh.replace(tree_budget="auto", max_tree_budget=16, cache_dir=str(fresh.cache_path / name))
        result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + expected),
                                      prompt_tokens=PROMPT, max_new_tokens=24, stop_token_ids=[], config=config)
        assert result["generated_token_ids"] == expected
        assert result["calibration"]["seconds"] == [1.0, 1.0 + node]
        sizes[name] = max(result["tree_sizes"])
    assert sizes["dear"] < sizes["cheap"]  # dear nodes: smaller trees


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_padding_a_tree_changes_none_of_its_nodes(family):
    """The leaves a tree is padded with attend to the root alone and are nobody's ancestors: every real node's
    logits are what the unpadded tree gives (to float32 rounding: the matmuls see more rows)."""
    import mlx.core as mx
    import numpy as np

    target = adapter_for(make_target(family))
    cache = target.make_cache()
    target.forward(mx.array(PROMPT), cache, [])
    tree = calibration.random_tree(5, np.random.default_rng(0), target.vocab_size)
    plain = target.verify(tree, cache, [], DDTreeConfig()).logits
    padded = target.verify(tree.padded(8), cache, [], DDTreeConfig()).logits
    assert padded.shape[0] == 8 and np.abs(np.array(padded[:5] - plain)).max() < 1e-4
    assert np.abs(np.array(padded[5:] - plain[:1])).max() > 1e-2  # the padding is a node of its own


@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_trees_verified_at_a_cheaper_bigger_size_stay_lossless(fresh, monkeypatch, family):
    """A machine where 8 nodes verify faster than 2 (as OpenBLAS multiplies 4 rows faster than 3): every tree
    (at most 5 nodes: the cap) is verified as 8, and the output is still mlx-lm's."""
    model = make_target(family)
    expected = greedy_reference(model, PROMPT, 24)
    adapter = type(adapter_for(model))
    rows, verify = [], adapter.verify
    monkeypatch.setattr(adapter, "verify", lambda self, tree, *a: rows.append(len(tree)) or verify(self, tree, *a))
    monkeypatch.setattr(calibration, "measure", lambda target, config: VerifyCosts((1, 2, 8), (1.0, 1.5, 1.2)))
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + expected),
                                  prompt_tokens=PROMPT, max_new_tokens=24, stop_token_ids=[],
                                  config=fresh.replace(tree_budget="auto", max_tree_budget=4))
    assert result["generated_token_ids"] == expected
    assert set(rows) <= {1, 8} and 8 in rows and max(result["tree_sizes"]) == 4
