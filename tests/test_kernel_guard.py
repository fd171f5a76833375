"""A Mac user's first run cannot die in a kernel: a fake kernel builder put where the engine chooses kernels (one
that cannot build a chosen variant, one whose launch raises at evaluation, one that returns wrong numbers) leaves
generation complete and equal to mlx-lm's greedy decoding, with one warning, and the doctor names the variant."""

import mlx.core as mx
import pytest
from metal_harness import harness as H
from tiny import OracleDrafter, greedy_reference, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.cli import doctor
from ddtree_mlx.kernels import dispatch, guard, metal
from ddtree_mlx.kernels.check import ConvShape, DeltaShape, Verdicts, check

pytestmark = pytest.mark.skipif(not H.harness_available(), reason=f"no C++ compiler ({H.CXX}) for the harness")
PROMPT = [3, 17, 42, 9, 100, 5]
TOKENS = 20


@pytest.fixture(scope="module")
def target():
    return make_target("qwen3_5", seed=2, linear_key_head_dim=32)  # the kernel needs Dk % 32 == 0


@pytest.fixture(scope="module")
def expected(target):
    return greedy_reference(target, PROMPT, TOKENS)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process that has built no kernel yet: a new guard, nothing prepared, verdicts kept under tmp_path."""
    state = guard.Guard()
    for module in (dispatch, doctor):
        monkeypatch.setattr(module, "GUARD", state)
    monkeypatch.setattr(dispatch, "_PREPARED", set())
    metal._built.cache_clear()
    yield DDTreeConfig(tree_budget=8, cache_dir=str(tmp_path))
    metal._built.cache_clear()


def harness_with(monkeypatch, change):
    """The CPU harness as the kernel maker, its launches passed through `change(variant, run, kwargs)`."""
    variants = []

    def maker(**spec):
        run = H.cpu_metal_kernel(**spec)

        def launch(**kwargs):
            variant = metal.Variant.of(dict(kwargs, name=spec["name"]))
            variants.append(variant)
            return change(variant, run, kwargs)

        return launch

    monkeypatch.setattr(dispatch, "kernel_maker", lambda: maker)
    return variants


def generate(target, expected, config):
    return generate_ddtree_once(target_model=target, draft_model=OracleDrafter(PROMPT + expected, seed=3),
                                prompt_tokens=PROMPT, max_new_tokens=TOKENS, stop_token_ids=[], config=config)


BROKEN = "slots=4"  # the variant the fakes break: trees whose widest level holds three nodes or more


def breaks(variant) -> bool:
    return variant.kernel == "ddtree_tree_gated_delta" and str(variant).endswith(f"{BROKEN})")


def cannot_build(variant, run, kwargs):
    if breaks(variant):
        raise RuntimeError("unable to build metal library: program_source:12: error")
    return run(**kwargs)


def raises_when_evaluated(variant, run, kwargs):
    outputs = run(**kwargs)
    if not breaks(variant):
        return outputs
    failing = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu).sum()  # lazy: raises only when evaluated
    return [out + (0 * failing).astype(out.dtype) for out in outputs]


def wrong_numbers(variant, run, kwargs):
    outputs = run(**kwargs)
    return [out * 1.5 for out in outputs] if breaks(variant) else outputs


@pytest.mark.slow
@pytest.mark.parametrize("met_by", ["self-check", "first launch"])
@pytest.mark.parametrize("fake", [cannot_build, raises_when_evaluated, wrong_numbers])
def test_a_failing_kernel_variant_never_fails_a_generation(monkeypatch, fresh, target, expected, fake, met_by):
    variants = harness_with(monkeypatch, fake)
    if met_by == "first launch":  # no self-check before: the first real launch of the variant meets the fault
        monkeypatch.setattr(dispatch, "prepare", lambda shapes, config: None)
    with pytest.warns(RuntimeWarning, match="ddtree_tree_gated_delta failed") as warned:
        result = generate(target, expected, fresh)
    assert result["generated_token_ids"] == expected
    assert len([w for w in warned if "failed" in str(w.message)]) == 1  # one warning, then the twin runs quietly
    assert any(breaks(v) for v in variants) and result["kernels"] == "metal+twin"
    failed = dispatch.GUARD.off["ddtree_tree_gated_delta"]
    assert BROKEN in failed
    monkeypatch.setattr(doctor, "self_test", lambda model, draft, config: {"ok": True, "runs": []})
    monkeypatch.setattr(doctor, "hybrid_self_test", lambda config: {"ok": True, "runs": []})
    report = doctor.report(None, None, fresh)
    assert not report["ok"] and BROKEN in report["kernels"]["failed"]["ddtree_tree_gated_delta"]
    assert any(not v["ok"] and BROKEN in v["variant"] for v in report["kernels"]["variants"])


@pytest.mark.slow
def test_the_self_check_runs_at_the_targets_shapes_once_per_machine(monkeypatch, fresh, target, expected):
    variants = harness_with(monkeypatch, lambda variant, run, kwargs: run(**kwargs))
    result = generate(target, expected, fresh)
    assert result["generated_token_ids"] == expected and result["kernels"] == "metal"
    checked = {str(v) for v in variants}
    assert {f"slots={n})" for n in (1, 2, 4)} <= {name[name.rfind("slots="):] for name in checked}
    assert all("Dk=32" in name or "ddtree_tree_conv1d" in name for name in checked)  # the target's own sizes
    files = list((fresh.cache_path / "kernels").glob("*.json"))
    assert len(files) == 1
    before = len(variants)
    monkeypatch.setattr(dispatch, "_PREPARED", set())  # a new process on the same machine: built, not compared
    monkeypatch.setattr(dispatch, "check", lambda *a, compare=True: pytest.fail("checked again") if compare
                        else check(*a, compare=False))
    generate(target, expected, fresh)
    assert len(variants) > before


def test_verdicts_are_kept_per_shape_set(tmp_path):
    one, other = (DeltaShape(2, 4, 32, 16, "float32"),), (ConvShape(96, 4, "bfloat16"),)
    Verdicts(tmp_path, one).write([])
    assert Verdicts(tmp_path, one).read() == [] and Verdicts(tmp_path, other).read() is None
