"""benchmark.py runs end to end, checks losslessness per row, labels each row with what ran it, takes every ratio
from the same run, and writes the JSON it promises. Nothing here asserts how fast anything is."""

import json
import logging
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import benchmark  # noqa: E402
from benchmarks.generation import Runs, summarize  # noqa: E402
from benchmarks.measurements import (  # noqa: E402
    measure_prefill_memory,
    measure_scratch,
    measure_twin,
    measure_verify,
)
from benchmarks.prefills import Prefills  # noqa: E402
from benchmarks.presets import AR, MLX_LM, SelfDrafter, Setup, Variant, make_setup  # noqa: E402
from benchmarks.prompts import load_prompts, with_context  # noqa: E402
from benchmarks.runners import run_mlx_lm_speculative  # noqa: E402
from ddtree_mlx import DDTreeConfig  # noqa: E402

CONFIG = DDTreeConfig()


def run(tmp_path, *options):
    """benchmark.main on the tiny synthetic target: (exit code, JSON rows by label)."""
    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "synthetic", "--synthetic-size", "tiny", "--limit", "1", *options,
                           "--json", str(out)])
    return code, {row["label"]: row for row in json.loads(out.read_text())}


def test_synthetic_preset_writes_rows(tmp_path, capsys):
    code, rows = run(tmp_path, "--repeats", "2", "--max-tokens", "12", "--tree-budgets", "auto,2,8")
    assert code == 0
    assert set(rows) == {"mlx-lm", "ar", "dflash", "ddtree@auto", "ddtree@2", "ddtree@8"}
    assert set(rows["ddtree@8"]["tree_sizes"]) == {"8"} and rows["ddtree@8"]["calibration"] is None
    auto = rows["ddtree@auto"]
    assert sum(auto["tree_sizes"].values()) > 0 and auto["calibration"]["seconds"]  # the sizes it chose, and from what
    for label, row in rows.items():
        assert row["lossless"] is True and row["repeats"] == 2  # every method's tokens == mlx-lm's own
        assert row["draft"] == (None if label in ("mlx-lm", "ar") else "oracle (accuracy 0.8)")
        assert row["tree_budget"] == {"ddtree@auto": "auto", "ddtree@2": 2, "ddtree@8": 8}.get(label)
        assert row["tokens_per_second"]["min"] <= row["tokens_per_second"]["median"] <= row["tokens_per_second"]["max"]
        assert row["blas"]
        if row["method"] != "mlx-lm":  # a loop we only time has no phases or host share
            assert abs(sum(row["phase_shares"].values()) - 1) < 0.05
            assert 0 <= row["host_overhead_share"] < 1
    # Each repeat is divided by the baseline of the same repeat: a baseline against itself is exactly 1.
    assert rows["mlx-lm"]["speedup_vs_mlx_lm"] == rows["ar"]["speedup_vs_ar"] == {"median": 1, "min": 1, "max": 1}
    out = capsys.readouterr().out
    assert "BLAS:" in out and "# drafted by oracle (accuracy 0.8)\n" in out


def result(tokens, seconds):
    """An engine result of `tokens` tokens after the first, decoded in `seconds`, one token per cycle."""
    return {"generated_token_ids": [0] * (tokens + 1), "decode_seconds": seconds, "cycles": tokens,
            "avg_acceptance": 1.0, "fast_path_ratio": 1.0, "host_overhead_share": 0.0,
            "phase_timings": dict.fromkeys(("draft", "build", "verify", "walk", "commit"), seconds / 5),
            "peak_memory_bytes": 2**20}


def test_speedups_pair_each_repeat_with_the_baselines_of_the_same_repeat():
    """The machine was twice as slow in repeat 1: per-repeat ratios stay 2.0, a ratio of medians would not."""
    runs, tree = {}, Variant("ddtree", 4)
    for repeat, slow in enumerate((1, 2)):
        for variant, seconds in ((MLX_LM, 1.0), (AR, 1.0), (tree, 0.5)):
            runs.setdefault(("s", variant), Runs()).add(repeat, result(10, seconds * slow), True)
    setup = Setup("synthetic", None, None, {"s": [[1]]}, [], CONFIG, draft="oracle")
    args = SimpleNamespace(context=None, max_tokens=10, temp=0.0, peer_draft=None)
    rows = {row["label"]: row for row in summarize(runs, setup, args)}
    assert rows["ddtree@4"]["speedup_vs_mlx_lm"] == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert rows["ddtree@4"]["tokens_per_second"] == {"median": 15.0, "min": 10.0, "max": 20.0}
    assert rows["ddtree@4"]["draft"] == "oracle" and rows["ar"]["draft"] is None


def test_earlier_option_spellings_still_work(caplog):
    with caplog.at_level(logging.WARNING, logger="ddtree_mlx"):
        old = benchmark.parse_args(["--budgets", "auto,2", "--draft", "prompt-lookup", "--temperature", "0.5"])
    new = benchmark.parse_args(["--tree-budgets", "auto,2", "--draft-model", "prompt-lookup", "--temp", "0.5"])
    assert vars(old) == vars(new) and new.tree_budgets == ["auto", 2]
    assert "--budgets is deprecated; use --tree-budgets" in caplog.text
    assert benchmark.parse_args(["--drafter", "self"]).draft_model == "self"
    assert benchmark.parse_args(["--drafter", "default"]).draft_model is None  # the preset's own drafter
    for wrong in (["--tree-budgets", "0"], ["--methods", "nope"], ["--max-tokens", "0"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(wrong)


def test_prompt_sets_load_seeded():
    first = load_prompts(["humaneval", "mt_bench", "alpaca", "mbpp"], limit=3, seed=1)
    again = load_prompts(["humaneval", "mt_bench", "alpaca", "mbpp"], limit=3, seed=1)
    assert first == again and all(len(v) == 3 and all(isinstance(t, str) and t for t in v) for v in first.values())


def test_prompt_files_are_benchmarked_as_sets(tmp_path):
    file = tmp_path / "mine.jsonl"
    file.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n{"prompt": "c"}\n')
    sets = load_prompts(["gsm8k"], limit=2, seed=0, files=[str(file)])
    assert set(sets) == {"mine", "gsm8k"} and len(sets["mine"]) == 2 and len(sets["gsm8k"]) == 2
    assert benchmark.parse_args(["--sets", "", "--prompts", str(file)]).sets == []


def test_sampled_runs_are_not_compared_token_for_token(tmp_path):
    code, rows = run(tmp_path, "--repeats", "1", "--max-tokens", "8", "--tree-budgets", "4", "--temp", "0.7")
    assert code == 0 and all(r["lossless"] is None and r["temperature"] == 0.7 for r in rows.values())


def test_self_drafter_proposes_the_greedy_continuation():
    from tiny import greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once

    model, prompt = make_target("llama"), [5, 6, 7]
    expected = greedy_reference(model, prompt, 21)  # the prefill's token, then four cycles of five
    result = generate_ddtree_once(target_model=model, draft_model=SelfDrafter(model, block_size=5),
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
    measure_verify(make_setup(args, CONFIG), args)
    assert len(set(contexts)) == 1 and contexts[0] >= 2000  # every verify after the context asked for, steps too
    monkeypatch.undo()
    out = tmp_path / "verify.json"
    assert benchmark.main(["--measure", "verify", "--synthetic-size", "tiny", "--repeats", "1", "--limit", "1",
                           "--json", str(out)]) == 0
    assert [r["nodes"] for r in json.loads(out.read_text())] == [1, 4, 16, 32]
    rows = measure_twin(benchmark.parse_args(["--measure", "twin", "--repeats", "1"]))
    assert {(r["tree"], r["nodes"]) for r in rows} == {(t, n) for t in ("chain", "wide") for n in (1, 4, 16, 64)}


def test_scratch_and_prefill_memory_measurements_run():
    rows = measure_scratch(benchmark.parse_args(["--measure", "scratch"]))
    for row in rows:
        assert row["now_kept_mib"] < row["before_kept_mib"] / 50
        assert row["scratch_rows"] <= 2 * row["widest_level"]
    assert {r["scratch_rows"] for r in rows if r["tree"] == "chain"} == {2}  # independent of the tree's depth
    args = benchmark.parse_args(["--measure", "prefill-memory", "--synthetic-size", "tiny", "--context", "300"])
    rows = measure_prefill_memory(make_setup(args, CONFIG), args)
    assert [r["context"] for r in rows] == [300] * 3 and rows[0]["vs_mlx_lm"] == 1.0
    assert all(r["peak_above_weights_mib"] > 0 for r in rows)


def test_mlx_lm_speculative_peer_is_lossless_and_counts_its_cycles():
    from tiny import greedy_reference, make_target

    model, prompt = make_target("llama"), [5, 6, 7]
    setup = Setup("t", model, None, {}, [], CONFIG, peer_draft=model)
    result = run_mlx_lm_speculative(setup, prompt, 16)
    assert result["generated_token_ids"] == greedy_reference(model, prompt, 16)
    assert result["avg_acceptance"] > 2  # a model drafting for itself: most drafts accepted


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
    texts = load_prompts(["alpaca"], limit=2, seed=0)
    texts["chat"] = [[{"role": "user", "content": "hi"}]]
    long = with_context(texts, Characters(), 6000)
    for original, prompt in zip(texts["alpaca"], long["alpaca"]):
        context, ask = prompt[:6000], prompt[6000:]
        assert ask == "\n\n" + original and original not in context  # no measured prompt in its own context
    assert long["chat"] == [[{"role": "system", "content": context}, {"role": "user", "content": "hi"}]]
    with pytest.raises(SystemExit, match="only"):
        with_context(texts, Characters(), 10**8)
    args = benchmark.parse_args(["--measure", "serving"])
    assert args.context == 8192 and benchmark.parse_args([]).context is None  # generation: no context unless asked


def test_long_contexts_are_prefilled_once_and_stay_lossless(tmp_path):
    code, rows = run(tmp_path, "--repeats", "1", "--max-tokens", "12", "--tree-budgets", "auto,4", "--context", "300")
    assert code == 0 and all(r["lossless"] and r["context"] == 300 for r in rows.values())  # mlx-lm's tokens


def test_mlx_lms_long_prompts_share_their_context_prefill(monkeypatch):
    """Prompts behind the same --context text: mlx-lm's cache for the next one is the last one's cut back to what
    they share, then the rest; equal to prefilling it whole (the reference), and only the new part is computed."""
    from tiny import make_target

    model = make_target("qwen3")
    context = [(5 * i + 1) % 100 for i in range(40)]
    first, second = context + [7, 8, 9, 10], context + [11, 12, 13]
    prefills, fresh = Prefills(), Prefills()
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


class Clock:
    """A stand-in for time.perf_counter: each reading moves it on a microsecond (host work), and `block` moves it
    on as a call that blocked would; no test waits for real time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1e-6
        return self.now

    def block(self, seconds):
        self.now += seconds


def test_time_blocked_handing_the_graph_over_is_the_devices(monkeypatch):
    """MLX returns from async_eval only once few enough operations are left in flight, so the first early start of
    a verify can block while the device computes: that is device time, not host time the device waits for."""
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once

    model, prompt = make_target("llama", num_hidden_layers=8), [3, 17, 42, 9]
    truth = prompt + greedy_reference(model, prompt, 16)
    clock, dispatch = Clock(), mx.async_eval

    def held(*arrays):  # a device that takes 20 ms to accept each hand-over
        clock.block(0.02)
        dispatch(*arrays)

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(mx, "async_eval", held)
    result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(truth), prompt_tokens=prompt,
                                  max_new_tokens=16, stop_token_ids=[], tree_budget=4)
    assert result["tree_sizes"] == {4: result["cycles"]}  # verified trees, each handed over early
    # The blocked hand-overs (20 ms each, beside microseconds of host work) were counted as the device's.
    assert result["host_overhead_share"] < 0.1


@pytest.mark.parametrize("settled", [False, True])
def test_a_tree_cycle_waits_for_the_device_once_after_its_draft(monkeypatch, settled):
    """The walk runs on the device and the commit is built on its padded path before anything is read, so after
    the draft a tree cycle evaluates once: the verify with the walk and the commit (twice before). Where greedy
    settles its tokens first (sampling.settled_greedy, on a CPU), once more: the verify's tokens, then the rest."""
    from tiny import OracleDrafter, greedy_reference, make_target

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.engine import sampling
    from ddtree_mlx.engine.session import Session

    monkeypatch.setattr(sampling, "on_cpu", lambda: settled)

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
    assert per_cycle == [1 + settled] * result["cycles"]


def test_concurrency_serves_each_wave_four_ways_and_stays_lossless(tmp_path):
    """--concurrency: per c, our batch and our one-at-a-time serving (today's stream_generate for c = 1) beside
    mlx-lm's BatchGenerator and generate_step; ours equal mlx-lm's greedy tokens; a late request and memory per
    row are measured too."""
    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "synthetic", "--synthetic-size", "tiny", "--limit", "2", "--concurrency", "1,2",
                           "--max-tokens", "16", "--tree-budgets", "4", "--methods", "ddtree", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0
    served = {(r["concurrency"], r["kind"]): r for r in rows
              if r["measure"] == "concurrency" and r["arrival"] == "waves"}
    assert set(served) == {(c, kind) for c in (1, 2) for kind in ("mlx-stream", "mlx-batch", "ours-batched")} | {
        (1, "ours-stream"), (2, "ours-one")}
    for (c, kind), row in served.items():
        assert row["requests"] == 2 and row["waves"] == 2 // c  # every c serves the same prompts
        assert row["lossless"] is True if kind.startswith("ours") else "lossless" not in row
        assert row["draft"] == (None if kind.startswith("mlx") else "oracle (accuracy 0.8)")
    assert served[2, "ours-batched"]["rows_per_forward"] > 1  # two rows' trees verified in one forward
    queued = {r["kind"]: r for r in rows if r["measure"] == "concurrency" and r["arrival"] == "queue"}
    assert set(queued) == {"mlx-batch", "ours-batched"}  # sustained load: 4 x c requests, c at a time (c > 1)
    assert all(r["concurrency"] == 2 and r["requests"] == 8 for r in queued.values())
    assert queued["ours-batched"]["lossless"] is True and queued["ours-batched"]["rows_per_forward"] > 1
    joins = [r for r in rows if r["measure"] == "late-join"]
    assert [r["concurrency"] for r in joins] == [1, 2] and all(r["next_calls"] >= 1 for r in joins)
    memory, = [r for r in rows if r["measure"] == "row-memory"]
    assert memory["rows"] == 2 and memory["mib_per_row"]["kv"] > 0 and memory["mib_per_row"]["recurrent"] > 0
