"""The shipped drafter's training prompts share nothing with a benchmark prompt set."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
BENCHMARKS = ["humaneval.jsonl", "mbpp_sanitized.jsonl", "mt_bench.jsonl", "alpaca_eval.jsonl", "gsm8k_heldout.jsonl"]


def texts(row):
    values = [row.get(key) for key in ("prompt", "instruction", "input", "text", "code")] + row.get("turns", [])
    return [v for v in values if isinstance(v, str) and v.strip()]


def shingles(text, n=8):
    """Runs of n words (numbers aside: "[1.0, 2.0, 3.0, 4.0]" is no shared prompt)."""
    words = re.findall(r"[a-z]+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_no_training_prompt_is_a_benchmark_prompt():
    """The instructions written for the drafter (the standard-library stubs and the requests SmolLM2 wrote itself
    included) share no run of eight words with any benchmark prompt; the GSM8K questions (whose phrasing is
    formulaic: "how many ... are in the") are none of the held-out ones; the requests SmolLM2 wrote share none with
    the held-out code and chat prompts either."""
    benchmark, exact = set(), set()
    for name in BENCHMARKS:
        for line in (ROOT / "ddtree_mlx" / "prompts" / name).read_text().splitlines():
            for text in texts(json.loads(line)):
                benchmark |= shingles(text)
                exact.add(text.strip())
    phases = (("general_prompts.jsonl", 1248), ("broad_prompts.jsonl", 500), ("self_prompts.jsonl", 500),
              ("wide_prompts.jsonl", 500), ("written_prompts.jsonl", 0))  # every request written so far
    for name, gsm8k in phases:
        rows = [json.loads(line) for line in (ROOT / "drafters/smollm2-135m" / name).read_text().splitlines()]
        written = [r for r in rows if not r["id"].startswith("gsm8k-")]
        assert len(written) > 500 and len(rows) - len(written) == gsm8k
        assert not {r["id"]: shingles(r["prompt"]) & benchmark for r in written if shingles(r["prompt"]) & benchmark}
        assert not [r["id"] for r in rows if r["prompt"].strip() in exact]
    held_out = [json.loads(line) for line in (ROOT / "drafters/smollm2-135m/heldout_general.jsonl").read_text().splitlines()]
    assert len(held_out) == 24 and not [r["id"] for r in held_out if shingles(r["prompt"]) & benchmark]
    evaluated = set().union(*(shingles(r["prompt"]) for r in held_out))
    requests = [json.loads(line) for line in (ROOT / "drafters/smollm2-135m/written_prompts.jsonl").read_text().splitlines()]
    assert not [r["id"] for r in requests if shingles(r["prompt"]) & evaluated]
    assert benchmark and len(exact) > 1000, "the benchmark prompts were not read: the test would pass vacuously"
