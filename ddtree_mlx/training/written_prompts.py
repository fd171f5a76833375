"""Prompts a target writes for itself, for training its drafter when no prompt set is at hand.

A chat model asked for nothing, given only the start of a user turn (the chat template up to where the user's
words would go), writes a user's request: sampled, such requests cover what the model has seen people ask
(questions, tasks, code, writing) with no dataset behind them. The drafter then trains on the target's own answers
to them (training/data.py, regenerate), which is what it must predict.

Requests are sampled in seeded batches and appended to a JSON Lines file (`{"id", "prompt", "batch", "kept"}`),
so an interrupted run resumes and gives the same file; duplicates, fragments and anything sharing a run of words
with an excluded prompt file (a benchmark set: never train on it) are dropped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterable

import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from ..loading.load import has_chat_template
from .data import drop_torn_tail
from .progress import show

SHARED_WORDS = 8  # a request sharing this many words in a row with an excluded prompt is dropped
MIN_WORDS, MAX_WORDS = 4, 120
MARK = "\x00request\x00"


def user_turn_start(tokenizer: Any) -> list[int]:
    """The chat template rendered up to where a user's message begins."""
    if not has_chat_template(tokenizer):
        raise ValueError("this model's tokenizer has no chat template, so it cannot be asked to write a user's "
                         "request; pass --prompts with a prompt file instead")
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=False)
    if MARK not in text:
        raise ValueError("the chat template does not place the user's message verbatim; pass a prompt file instead")
    return list(tokenizer.encode(text[: text.index(MARK)], add_special_tokens=False))


def word_runs(text: str, n: int = SHARED_WORDS) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def strings(value: Any) -> Iterable[str]:
    """Every string in a JSON value: a prompt file's rows name their text in many ways (prompt, turns, messages)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def excluded_runs(files: Iterable[str | Path]) -> set[str]:
    """Every run of words in the excluded JSON Lines files, whatever their rows' fields."""
    runs: set[str] = set()
    for file in files:
        if not Path(file).is_file():
            raise ValueError(f"excluded prompt file {file} does not exist")
        for number, line in enumerate(Path(file).read_text().splitlines(), start=1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number} is not valid JSON ({error.msg}); one JSON object per line") from None
            for text in strings(row):
                runs |= word_runs(text)
    return runs


def keep(text: str, seen: set[str], excluded: set[str]) -> bool:
    """A request of a sensible length, not written before, sharing no run of words with an excluded prompt."""
    words = len(re.findall(r"\w+", text))
    return MIN_WORDS <= words <= MAX_WORDS and text.lower() not in seen and not (word_runs(text) & excluded)


def write_prompts(model: Any, tokenizer: Any, out: str | Path, count: int, *, exclude: Iterable[str | Path] = (),
                  batch_size: int = 32, max_tokens: int = 96, temperature: float = 1.0, top_p: float = 0.95,
                  seed: int = 0, progress: bool = True) -> int:
    """Append requests the model writes to `out`, a whole batch at a time, until it holds at least `count`;
    returns how many it holds. Nothing that shares words with the `exclude` files (the
    benchmark sets you will measure on) is kept. Batch b is sampled with seed `seed + b` and kept whole, so a resumed run writes what an
    uninterrupted one would have."""
    if count < 1:
        raise ValueError(f"count must be a positive number of prompts, got {count}")
    start_tokens = user_turn_start(tokenizer)
    excluded = excluded_runs(exclude)
    out = Path(out)
    drop_torn_tail(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    batch = max((row["batch"] for row in rows), default=-1)
    last = [row for row in rows if row["batch"] == batch]
    if last and len(last) < last[0]["kept"]:
        # An interrupt cut the last batch's write short: it is drawn again, whole.
        rows = [row for row in rows if row["batch"] < batch]
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        batch += 1
    seen = {row["prompt"].lower() for row in rows}
    sampler = make_sampler(temp=temperature, top_p=top_p)
    started = time.perf_counter()
    while len(rows) < count:
        mx.random.seed(seed + batch)
        response = batch_generate(model, tokenizer, [start_tokens] * batch_size, max_tokens=max_tokens,
                                  sampler=sampler, return_token_ids=True)
        new = []
        for text, tokens in zip(response.texts, response.token_ids):
            text = text.strip()
            ended = len(tokens) < max_tokens  # the model ended its turn (a stop token is not returned)
            if ended and keep(text, seen, excluded):
                seen.add(text.lower())
                new.append({"id": f"written-{batch}-{len(new)}", "prompt": text, "batch": batch})
        for row in new:
            row["kept"] = len(new)  # how many rows the batch wrote: a resumed run sees whether all are there
        with open(out, "a") as file:
            file.write("".join(json.dumps(row) + "\n" for row in new))
        rows += new
        batch += 1
        mx.clear_cache()
        if progress:
            show(len(rows), count, f"prompts written (batch {batch})", time.perf_counter() - started)
    return len(rows)

