"""The prompts a benchmark runs: a seeded sample of the bundled sets (benchmarks/prompts; their licenses in
LICENSES.md there) and of --prompts files, optionally behind a long context of real text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ddtree_mlx.training.data import read_prompts

PROMPT_DIR = Path(__file__).parent / "prompts"
PROMPT_SETS = {
    "humaneval": ("humaneval.jsonl", lambda row: row["prompt"]),
    "mbpp": ("mbpp_sanitized.jsonl", lambda row: row["prompt"]),
    "mt_bench": ("mt_bench.jsonl", lambda row: row["turns"][0]),
    "alpaca": ("alpaca_eval.jsonl", lambda row: row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")),
    "gsm8k": ("gsm8k_heldout.jsonl", lambda row: row["prompt"]),  # the last 500 of GSM8K train: never trained on
}
CONTEXT_SETS = ("mt_bench", "alpaca")  # the real text --context puts before each prompt


def load_prompts(sets: list[str], limit: int, seed: int, files: list[str] = ()) -> dict[str, list[Any]]:
    """A seeded sample of `limit` prompts per bundled set, and per --prompts file (named by its stem): text, or
    chat messages for files whose rows have `messages`."""
    prompts = {}
    for file in files:
        rows = [prompt for _, prompt in read_prompts(file)]
        prompts[Path(file).stem] = sample(rows, limit, seed)
    for name in sets:
        file, text = PROMPT_SETS[name]
        rows = [json.loads(line) for line in (PROMPT_DIR / file).read_text().splitlines() if line.strip()]
        prompts[name] = [text(row) for row in sample(rows, limit, seed)]
    return prompts


def sample(rows: list[Any], limit: int, seed: int) -> list[Any]:
    return random.Random(seed).sample(rows, min(limit, len(rows)))


def with_context(texts: dict[str, list[Any]], tokenizer: Any, length: int) -> dict[str, list[Any]]:
    """Each prompt after `length` tokens of real text, as in an agent's long prompt: MT-Bench and Alpaca
    instructions (none of the prompts measured), then the prompt; chat rows get it as a system message."""
    measured = {t for rows in texts.values() for t in rows if isinstance(t, str)}
    pool = [text for rows in load_prompts(list(CONTEXT_SETS), 10**6, 0).values() for text in rows
            if text not in measured]
    tokens = []
    for text in pool:  # piece by piece: only as much as needed goes through the tokenizer
        tokens += tokenizer.encode(text + "\n\n")
        if len(tokens) >= length:
            break
    if len(tokens) < length:
        raise SystemExit(f"--context {length}: only {len(tokens)} tokens of context text are bundled")
    context = tokenizer.decode(tokens[:length])
    return {name: [f"{context}\n\n{t}" if isinstance(t, str) else [{"role": "system", "content": context}, *t]
                   for t in rows] for name, rows in texts.items()}


def long_prompt(prompts: dict[str, list[list[int]]], length: int) -> list[int]:
    """`length` tokens of the preset's prompts (token ids), concatenated (repeated if they are shorter)."""
    tokens = [t for rows in prompts.values() for prompt in rows for t in prompt]
    return (tokens * (length // len(tokens) + 1))[:length]
