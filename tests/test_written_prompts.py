"""Prompts a target writes for itself (written_prompts): seeded, resumable to the same file, never a benchmark's."""

import json
from pathlib import Path

import pytest
from tiny import make_target, make_tokenizer

from ddtree_mlx.cli.main import main
from ddtree_mlx.training.written_prompts import (
    excluded_runs,
    keep,
    user_turn_start,
    write_prompts,
)


@pytest.fixture(scope="module")
def llama():
    return make_target("llama")


def test_the_request_starts_where_a_users_message_would(llama):
    tokenizer = make_tokenizer()
    assert tokenizer.decode(user_turn_start(tokenizer)).strip() == "<|user|>"


def test_an_interrupted_run_resumes_to_the_same_file(llama, tmp_path):
    tokenizer = make_tokenizer()
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    held = write_prompts(llama, tokenizer, whole, 12, batch_size=8, max_tokens=48, progress=False)
    assert 12 <= held < 12 + 8  # whole batches
    write_prompts(llama, tokenizer, parts, 5, batch_size=8, max_tokens=48, progress=False)
    write_prompts(llama, tokenizer, parts, 12, batch_size=8, max_tokens=48, progress=False)
    assert parts.read_text() == whole.read_text()
    lines = whole.read_text().splitlines(keepends=True)
    last = [json.loads(line)["batch"] for line in lines]
    assert last.count(last[-1]) >= 2  # the cut below falls inside the last batch
    torn = tmp_path / "torn.jsonl"  # interrupted inside the last batch's write: its first row kept, half a line more
    torn.write_text("".join(lines[: last.index(last[-1]) + 1]) + lines[last.index(last[-1]) + 1][:20])
    write_prompts(llama, tokenizer, torn, 12, batch_size=8, max_tokens=48, progress=False)
    assert torn.read_text() == whole.read_text()
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len({row["prompt"] for row in rows}) == held and len({row["batch"] for row in rows}) > 1
    assert all(row["prompt"].split()[0].startswith(("w", "ж")) for row in rows)  # the model's words, no template


BENCHMARK_SETS = sorted((Path(__file__).parents[1] / "benchmarks" / "prompts").glob("*.jsonl"))


def test_nothing_sharing_eight_words_with_a_benchmark_prompt_is_kept(tmp_path):
    alpaca = next(path for path in BENCHMARK_SETS if path.name == "alpaca_eval.jsonl")
    instruction = json.loads(alpaca.read_text().splitlines()[0])["instruction"]
    runs = excluded_runs(BENCHMARK_SETS)
    assert len(instruction.split()) >= 8 and not keep(f"Please help: {instruction.upper()}", set(), runs)
    assert keep("Write a short poem about the colour of the sea at night.", set(), runs)
    assert not keep("Write a short poem about the colour of the sea at night.",
                    {"write a short poem about the colour of the sea at night."}, runs)  # seen before
    assert not keep("Hi", set(), runs)  # a fragment


def test_bad_input_fails_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["write-prompts", "--out", str(tmp_path / "p.jsonl"), "--count", "3", "--exclude", "missing.jsonl"])
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\nnot json\n')
    with pytest.raises(SystemExit):
        main(["write-prompts", "--out", str(tmp_path / "p.jsonl"), "--count", "3", "--exclude",
              str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl:2 is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["write-prompts", "--out", str(tmp_path / "p.jsonl"), "--count", "0"])
    with pytest.raises(SystemExit):
        main(["write-prompts", "--out", str(tmp_path / "p.jsonl"), "--count", "3", "--temperature", "0"])
    assert "--temperature must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
