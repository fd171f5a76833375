"""Tensor parallelism: tiny targets sharded over two processes (mlx.launch, ring backend over loopback) generate
what mlx-lm's greedy decoding of the whole model gives."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import Reference, assert_lossless, make_tokenizer

from ddtree_mlx.engine.ranks import STOPPED

WORKER = Path(__file__).with_name("distributed_worker.py")


def launch(out: Path, *mode: str, **env: str) -> subprocess.CompletedProcess:
    """Two ranks of the worker over loopback (mlx.launch, ring backend). Ranks that never finish raise
    TimeoutExpired (mlx.launch and both ranks are killed), well before the per-test timeout would end the run."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    command = [launcher, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports()), sys.executable,
               str(WORKER), str(out), *mode]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=dict(os.environ, **env)) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_ports() -> int:
    """A port free on loopback with the next one free too (rank r listens on port + r): mlx.launch's fixed default
    may be held by another run on the machine. The system picks the first (no guessing at random)."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def written(run: subprocess.CompletedProcess, out: Path) -> list[dict]:
    """What each rank wrote. mlx.launch exits 0 whatever its ranks did: a rank that failed wrote nothing, and its
    error is in the output shown."""
    missing = [rank for rank in range(2) if not Path(f"{out}.{rank}").exists()]
    shown = run.stdout[-2000:] + run.stderr[-4000:]
    assert run.returncode == 0 and not missing, f"ranks {missing} wrote nothing\n{shown}"
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "rows.json"
    ranks = written(launch(out), out)
    return dict(ranks[0], other=ranks[1])


@pytest.mark.slow  # every test that launches ranks: subprocesses that build tiny models and generate
def test_every_rank_ran_every_case_alike(launched):
    """The same tokens and the same tree sizes on both ranks: automatic sizes read rank 0's clock everywhere."""
    assert launched["ranks"] == 2 and launched["finished"] == [len(launched["rows"])] * 2
    for mine, theirs in zip(launched["rows"], launched["other"]["rows"]):
        assert (mine["tokens"], mine["tree_sizes"]) == (theirs["tokens"], theirs["tree_sizes"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "llama", "qwen3", "qwen3_5_moe"])
def test_sharded_targets_generate_what_mlx_lm_does(launched, family):
    """float32, but an all-reduce adds the ranks' partial sums in its own order: only a near-tie may differ."""
    rows = [r for r in launched["rows"] if r["family"] == family and r["sharding"] == "tensor"]
    assert {r["budget"] for r in rows} >= {4, "auto"}
    for row in rows:
        assert_lossless(row["tokens"], Reference(row["reference"], row["margins"]), exact=False,
                        label=f"{family} sharded over 2 ranks, budget {row['budget']}")
        assert row["layer_share"] == pytest.approx(0.5, abs=0.05)  # each rank holds half of every layer
        assert row["all_sums"] >= 2 * row["cycles"]  # verify communicates: a reduce per sharded block at least
    deep = max(rows, key=lambda r: r["budget"] if r["budget"] != "auto" else 0)
    assert deep["cycles"] < len(deep["tokens"]) // 2 and deep["fast_path_ratio"] < 1  # deep trees, branches taken


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "llama", "qwen3"])
def test_pipelined_targets_generate_what_mlx_lm_does(launched, family):
    """Each rank runs half the layers (qwen3_5 split by mlx-lm's own model.pipeline, the others by ours), hands
    its hidden states on, and all commit the same path. A DFlash drafter tapping layers on both stages gets them
    gathered."""
    def mine(rank):
        return [r for r in rank["rows"] if r["family"] == family and r["sharding"] == "pipeline"]

    rows = mine(launched)
    assert rows
    for row, other in zip(rows, mine(launched["other"])):
        assert_lossless(row["tokens"], Reference(row["reference"], row["margins"]), exact=False,
                        label=f"{family} pipelined over 2 ranks, budget {row['budget']}, {row['drafter']} drafter")
        # Whole layers, split: 2 of 4 each (qwen3_5), 2 and 1 of 3 (the dense ones).
        assert 0 < other["layer_share"] <= row["layer_share"] < 1
        assert row["layer_share"] + other["layer_share"] == pytest.approx(1.0)
        assert row["all_gathers"] >= row["cycles"]  # every verify gathers rank 0's output
        assert other["sends"] >= row["cycles"]  # rank 1 (the first layers) hands its output on
    if family != "qwen3":
        deep = max(rows, key=lambda r: r["budget"] if r["budget"] != "auto" else 0)
        assert deep["cycles"] < len(deep["tokens"]) // 2 and deep["fast_path_ratio"] < 1


def test_heads_that_do_not_divide_are_refused_before_any_weights_load():
    from ddtree_mlx import load
    from ddtree_mlx.loading.sharding import check_shardable

    check_shardable({"num_attention_heads": 4, "num_key_value_heads": 2}, 2)
    check_shardable({"text_config": {"model_type": "qwen3_5", "num_attention_heads": 16, "num_key_value_heads": 2,
                                     "linear_num_key_heads": 16, "linear_num_value_heads": 32}}, 4)  # KV repeated
    with pytest.raises(ValueError, match=r"divisible by 2, but \{'num_attention_heads': 9, 'num_key_value_heads': 3"):
        check_shardable({"num_attention_heads": 9, "num_key_value_heads": 3}, 2)  # SmolLM2-135M on two Macs
    with pytest.raises(ValueError, match="unknown sharding 'diagonal'"):
        load(sharding="diagonal")


@pytest.mark.slow
def test_a_rank_whose_peer_hangs_stops_within_the_timeout(tmp_path):
    """Rank 1 stops answering mid-generation, alive with its sockets open (a peer that exits is seen by the ring
    backend itself: "connection to a peer was lost"); rank 0, waiting inside a collective that will never
    complete, is ended by the watchdog with an error naming the cause, and mlx.launch then stops rank 1."""
    run = launch(tmp_path / "rows.json", "hang", DDTREE_RANK_TIMEOUT="3")  # without the watchdog: TimeoutExpired
    assert "rank 0 made no progress for 3 s: a rank has died or hung" in run.stderr
    assert f"exited with code {STOPPED}" in run.stderr and "finished" not in run.stdout


@pytest.mark.slow
def test_the_server_under_mlx_launch(tmp_path):
    """Rank 0 serves, rank 1 follows: answers equal mlx-lm's greedy decoding of the whole model, through a client
    that left mid-stream, a second turn that hits the prompt cache, a stop string and an unseeded sampled request
    (any of which, mishandled, would leave the ranks' collectives unpaired: a hang, ended by the watchdog)."""
    out = tmp_path / "rows.json"
    served, followed = written(launch(out, "serve", DDTREE_RANK_TIMEOUT="30"), out)
    rows = served["rows"]
    tokenizer = make_tokenizer()
    greedy = [row for row in rows if "temperature" not in row]
    for row in greedy:
        got = tokenizer.encode(row["got"])
        if row.get("stop"):
            assert row["finish"] == "stop" and 0 < len(got) < row["max_tokens"]
            assert got == row["reference"][: len(got)]
        else:
            assert_lossless(got, Reference(row["reference"], row["margins"]), exact=False, label="served, 2 ranks")
    assert greedy[1]["reused"] > len(greedy[0]["prompt"]) // 2  # the second turn hit the prompt cache
    # Rank 1 generated what rank 0 served (the sampled request too: it drew with rank 0's seed), and stopped
    # where rank 0 did (the client that left: fewer than the 40 tokens it asked for).
    followed = followed["generations"]
    assert len(followed) == 6 and len(followed[1]) < 40
    for row, tokens in zip(rows, followed[:1] + followed[2:]):
        assert tokenizer.encode(row["got"]) == tokens[: len(tokenizer.encode(row["got"]))]
    # Unseeded at temperature 1, the draw may end in the stop token before its 12 tokens: rank 1 stops there too.
    sampled = followed[4]
    assert rows[3]["temperature"] == 1.0 and rows[3]["finish"] in ("length", "stop")
    assert len(sampled) == 12 if rows[3]["finish"] == "length" else sampled[-1] == tokenizer.eos_token_id
