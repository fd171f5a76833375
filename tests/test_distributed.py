"""Tensor parallelism: tiny targets sharded over two processes (mlx.launch, ring backend over loopback) generate
what mlx-lm's greedy decoding of the whole model gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import Reference, assert_lossless

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    out = tmp_path_factory.mktemp("ranks") / "rows.json"
    run = subprocess.run([launcher, "--backend", "ring", "-n", "2", sys.executable, str(WORKER), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    return dict(ranks[0], other=ranks[1])


def test_every_rank_ran_every_case_alike(launched):
    """The same tokens and the same tree sizes on both ranks: automatic sizes read rank 0's clock everywhere."""
    assert launched["ranks"] == 2 and launched["finished"] == [len(launched["rows"])] * 2
    for mine, theirs in zip(launched["rows"], launched["other"]["rows"]):
        assert (mine["tokens"], mine["tree_sizes"]) == (theirs["tokens"], theirs["tree_sizes"])


@pytest.mark.parametrize("family", ["qwen3_5", "llama", "qwen3", "qwen3_5_moe"])
def test_sharded_targets_generate_what_mlx_lm_does(launched, family):
    """float32, but an all-reduce adds the ranks' partial sums in its own order: only a near-tie may differ."""
    rows = [r for r in launched["rows"] if r["family"] == family]
    assert {r["budget"] for r in rows} >= {4, "auto"}
    for row in rows:
        assert_lossless(row["tokens"], Reference(row["reference"], row["margins"]), exact=False,
                        label=f"{family} sharded over 2 ranks, budget {row['budget']}")
        assert row["layer_share"] == pytest.approx(0.5, abs=0.05)  # each rank holds half of every layer
        assert row["all_sums"] >= 2 * row["cycles"]  # verify communicates: a reduce per sharded block at least
    deep = max(rows, key=lambda r: r["budget"] if r["budget"] != "auto" else 0)
    assert deep["cycles"] < len(deep["tokens"]) // 2 and deep["fast_path_ratio"] < 1  # deep trees, branches taken


def test_heads_that_do_not_divide_are_refused_before_any_weights_load():
    from ddtree_mlx import load
    from ddtree_mlx.distributed import check_shardable

    check_shardable({"num_attention_heads": 4, "num_key_value_heads": 2}, 2)
    check_shardable({"text_config": {"model_type": "qwen3_5", "num_attention_heads": 16, "num_key_value_heads": 2,
                                     "linear_num_key_heads": 16, "linear_num_value_heads": 32}}, 4)  # KV repeated
    with pytest.raises(ValueError, match=r"divisible by 2, but \{'num_attention_heads': 9, 'num_key_value_heads': 3"):
        check_shardable({"num_attention_heads": 9, "num_key_value_heads": 3}, 2)  # SmolLM2-135M on two Macs
    with pytest.raises(ValueError, match="unknown sharding 'pipeline'"):
        load(sharding="pipeline")
