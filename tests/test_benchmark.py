"""benchmark.py runs end to end, checks losslessness per row and writes the JSON it promises."""

import json
import platform
import sys
from pathlib import Path

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import benchmark  # noqa: E402


def test_synthetic_preset_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "synthetic", "--limit", "1", "--repeats", "2", "--max-tokens", "12",
                           "--budgets", "auto,2,8", "--synthetic-size", "tiny", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0
    assert {r["label"] for r in rows} == {"mlx-lm", "ar", "dflash", "ddtree@auto", "ddtree@2", "ddtree@8"}
    by_label = {r["label"]: r for r in rows}
    assert set(by_label["ddtree@8"]["tree_sizes"]) == {"8"} and by_label["ddtree@8"]["calibration"] is None
    auto = by_label["ddtree@auto"]
    assert sum(auto["tree_sizes"].values()) > 0 and auto["calibration"]["seconds"]  # the sizes it chose, and from what
    for row in rows:
        assert row["lossless"] is True and row["repeats"] == 2  # every method's tokens == mlx-lm's own
        assert row["speedup_vs_mlx_lm"]["median"] > 0 and row["speedup_vs_ar"]["median"] > 0
        assert row["tokens_per_second"]["min"] <= row["tokens_per_second"]["median"] <= row["tokens_per_second"]["max"]
        assert row["blas"]
        if row["method"] != "mlx-lm":  # a loop we only time has no phases or host share
            assert abs(sum(row["phase_shares"].values()) - 1) < 0.05
            assert 0 <= row["host_overhead_share"] < 1
    assert "BLAS:" in capsys.readouterr().out


def test_prompt_sets_load_seeded():
    first = benchmark.load_prompts(["humaneval", "mt_bench", "alpaca", "mbpp"], limit=3, seed=1)
    again = benchmark.load_prompts(["humaneval", "mt_bench", "alpaca", "mbpp"], limit=3, seed=1)
    assert first == again and all(len(v) == 3 and all(isinstance(t, str) and t for t in v) for v in first.values())


def test_prompt_files_are_benchmarked_as_sets(tmp_path):
    file = tmp_path / "mine.jsonl"
    file.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n{"prompt": "c"}\n')
    sets = benchmark.load_prompts(["gsm8k"], limit=2, seed=0, files=[str(file)])
    assert set(sets) == {"mine", "gsm8k"} and len(sets["mine"]) == 2 and len(sets["gsm8k"]) == 2
    assert benchmark.parse_args(["--sets", "", "--prompts", str(file)]).sets == []


def test_sampled_runs_are_not_compared_token_for_token(tmp_path):
    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "synthetic", "--limit", "1", "--repeats", "1", "--max-tokens", "8",
                           "--budgets", "4", "--synthetic-size", "tiny", "--temperature", "0.7", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0 and all(r["lossless"] is None and r["temperature"] == 0.7 for r in rows)


def test_self_drafter_proposes_the_greedy_continuation():
    from tiny import greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once

    model, prompt = make_target("llama"), [5, 6, 7]
    expected = greedy_reference(model, prompt, 21)  # the prefill's token, then four cycles of five
    result = generate_ddtree_once(target_model=model, draft_model=benchmark.SelfDrafter(model, block_size=5),
                                  prompt_tokens=prompt, max_new_tokens=21, stop_token_ids=[], method="dflash")
    assert result["generated_token_ids"] == expected
    assert result["avg_acceptance"] == 5  # every draft accepted: 4 nodes and the bonus, every cycle


def test_verify_and_twin_measurements_run(tmp_path, monkeypatch):
    from ddtree_mlx.models.adapter import TargetAdapter

    contexts, verify = [], TargetAdapter.verify
    monkeypatch.setattr(TargetAdapter, "verify", lambda self, tree, cache, *rest: (
        contexts.append(self.prefix_length(cache)), verify(self, tree, cache, *rest))[1])
    args = benchmark.parse_args(["--measure", "verify", "--synthetic-size", "tiny", "--repeats", "1", "--context",
                                 "2000"])
    benchmark.measure_verify(benchmark.make_setup(args), args)
    assert len(set(contexts)) == 1 and contexts[0] >= 2000  # every verify after the context asked for, steps too
    monkeypatch.undo()
    out = tmp_path / "verify.json"
    assert benchmark.main(["--measure", "verify", "--synthetic-size", "tiny", "--repeats", "1", "--limit", "1",
                           "--json", str(out)]) == 0
    assert [r["nodes"] for r in json.loads(out.read_text())] == [1, 4, 16, 32]
    rows = benchmark.measure_twin(benchmark.parse_args(["--measure", "twin", "--repeats", "1"]))
    assert {(r["tree"], r["nodes"]) for r in rows} == {(t, n) for t in ("chain", "wide") for n in (1, 4, 16, 64)}


def test_scratch_and_prefill_memory_measurements_run():
    rows = benchmark.measure_scratch(benchmark.parse_args(["--measure", "scratch"]))
    for row in rows:
        assert row["now_kept_mib"] < row["before_kept_mib"] / 50
        assert row["scratch_rows"] <= 2 * row["widest_level"]
    assert {r["scratch_rows"] for r in rows if r["tree"] == "chain"} == {2}  # independent of the tree's depth
    args = benchmark.parse_args(["--measure", "prefill-memory", "--synthetic-size", "tiny", "--context", "300"])
    rows = benchmark.measure_prefill_memory(benchmark.make_setup(args), args)
    assert [r["context"] for r in rows] == [300] * 3 and rows[0]["vs_mlx_lm"] == 1.0
    assert all(r["peak_above_weights_mib"] > 0 for r in rows)


def test_mlx_lm_speculative_peer_is_timed_and_lossless():
    from tiny import greedy_reference, make_target

    model, prompt = make_target("llama"), [5, 6, 7]
    setup = benchmark.Setup("t", model, None, {}, stop_token_ids=[], peer_draft=model)
    result = benchmark.run_mlx_lm_speculative(setup, prompt, 16)
    assert result["generated_token_ids"] == greedy_reference(model, prompt, 16)
    assert result["avg_acceptance"] > 2 and result["decode_seconds"] > 0  # a model drafting for itself


@pytest.mark.skipif(platform.system() != "Linux", reason="a preloaded BLAS replacing MLX's is a Linux matter")
def test_blas_report_is_not_fooled_by_numpys_own_openblas(monkeypatch):
    import numpy  # noqa: F401  (numpy maps its bundled OpenBLAS into the process; MLX never calls it)

    from ddtree_mlx.blas import blas_name, slow_blas

    monkeypatch.setenv("LD_PRELOAD", "")
    assert "reference BLAS" in blas_name() and slow_blas()


class Characters:
    """A tokenizer of one token per character."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, tokens):
        return "".join(map(chr, tokens))


def test_context_puts_real_text_before_each_prompt():
    texts = benchmark.load_prompts(["alpaca"], limit=2, seed=0)
    texts["chat"] = [[{"role": "user", "content": "hi"}]]
    long = benchmark.with_context(texts, Characters(), 6000)
    for original, prompt in zip(texts["alpaca"], long["alpaca"]):
        context, ask = prompt[:6000], prompt[6000:]
        assert ask == "\n\n" + original and original not in context  # no measured prompt in its own context
    assert long["chat"] == [[{"role": "system", "content": context}, {"role": "user", "content": "hi"}]]
    with pytest.raises(SystemExit, match="only"):
        benchmark.with_context(texts, Characters(), 10**8)
    args = benchmark.parse_args(["--measure", "serving"])
    assert args.context == 8192 and benchmark.parse_args([]).context is None  # generation: no context unless asked


def test_long_contexts_are_prefilled_once_and_stay_lossless(tmp_path):
    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "synthetic", "--synthetic-size", "tiny", "--limit", "1", "--repeats", "1",
                           "--max-tokens", "12", "--budgets", "auto,4", "--context", "300", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0 and all(r["lossless"] and r["context"] == 300 for r in rows)  # mlx-lm's tokens, every method


def test_mlx_lms_long_prompts_share_their_context_prefill(monkeypatch):
    """Prompts behind the same --context text: mlx-lm's cache for the next one is the last one's cut back to what
    they share, then the rest; equal to prefilling it whole (the reference), and only the new part is computed."""
    from tiny import make_target

    model = make_target("qwen3")
    context = [(5 * i + 1) % 100 for i in range(40)]
    first, second = context + [7, 8, 9, 10], context + [11, 12, 13]
    prefills, fresh = benchmark.Prefills(), benchmark.Prefills()
    prefills.mlx_lm_cache(model, first, chunk=16)
    fed = []
    call = type(model).__call__
    monkeypatch.setattr(type(model), "__call__", lambda self, tokens, cache: fed.append(tokens.shape[1]) or
                        call(self, tokens, cache=cache))
    shared = prefills.mlx_lm_cache(model, second, chunk=16)
    assert fed == [2]  # [11, 12]: the last token is the generation's own
    reference = fresh.mlx_lm_cache(model, second, chunk=16)
    assert fed == [2, 16, 16, 10]
    for got, want in zip(shared, reference):
        assert got.offset == want.offset == len(second) - 1
        for a, b in zip(got.state[:2], want.state[:2]):  # keys, values
            assert mx.allclose(a[..., : got.offset, :], b[..., : want.offset, :], atol=1e-5).item()


def test_time_blocked_handing_the_graph_over_is_the_devices(monkeypatch):
    """MLX returns from async_eval only once few enough operations are left in flight, so the first early start of
    a verify can block while the device computes: that is device time, not host time the device waits for."""
    import time

    import mlx.core as mx
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once

    model, prompt = make_target("llama", num_hidden_layers=8), [3, 17, 42, 9]
    truth = prompt + greedy_reference(model, prompt, 16)
    dispatch = mx.async_eval

    def held(*arrays):  # a device that takes 20 ms to accept the first layers
        time.sleep(0.02)
        dispatch(*arrays)

    monkeypatch.setattr(mx, "async_eval", held)
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=prompt,
                                  max_new_tokens=16, stop_token_ids=[], tree_budget=4)
    assert result["tree_sizes"] == {4: result["cycles"]}  # verified trees, each handed over early
    assert result["host_overhead_share"] < 0.5  # 20 of every cycle's ~25 ms were the device's


def test_a_tree_cycle_waits_for_the_device_once_after_its_draft(monkeypatch):
    """The walk runs on the device and the commit is built on its padded path before anything is read, so after
    the draft a tree cycle evaluates once: the verify with the walk and the commit (twice before)."""
    import mlx.core as mx
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.engine.generate import Session

    model, prompt = make_target("qwen3_5"), [3, 17, 42, 9]
    truth = prompt + greedy_reference(model, prompt, 16)
    evals, per_cycle = [0], []
    evaluate, draft, cycle = mx.eval, Session.draft, Session.cycle

    def counted(*arrays):
        evals[0] += 1
        return evaluate(*arrays)

    def drafted(self, method):
        candidates = draft(self, method)
        evals[0] = 0  # count from here to the cycle's end
        return candidates

    def counting_cycle(self):
        new = cycle(self)
        per_cycle.append(evals[0])
        return new

    monkeypatch.setattr(mx, "eval", counted)
    monkeypatch.setattr(Session, "draft", drafted)
    monkeypatch.setattr(Session, "cycle", counting_cycle)
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=prompt,
                                  max_new_tokens=16, stop_token_ids=[], tree_budget=4)
    assert result["generated_token_ids"] == truth[len(prompt):] and result["avg_acceptance"] > 2
    assert per_cycle == [1] * result["cycles"]
