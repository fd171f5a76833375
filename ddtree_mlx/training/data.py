"""Training data for a DFlash drafter: the target's own answers to a prompt file (on-policy data), regenerated in
batches with mlx-lm and saved as token ids.

A drafter learns to predict what its target will say, so the answers come from the target itself, greedy or
sampled, never from a dataset's reference answers. The output is a JSON Lines file with one example per line,
`{"id", "prompt", "answer"}` (token ids), appended batch by batch: an interrupted run resumes where it stopped
and a finished one is never regenerated.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from ..loading.load import encode_prompt
from .progress import show


@dataclass
class Example:
    id: str
    prompt: list[int]
    answer: list[int]


def read_prompts(path: str | Path) -> list[tuple[str, Any]]:
    """(id, prompt) from a JSON Lines file whose rows have `prompt` (text) or chat `messages`; `id` is optional
    (the line number stands in). Raises ValueError naming the line for anything else, before any model work."""
    if not Path(path).is_file():
        raise ValueError(f"prompt file {path} does not exist; pass a JSON Lines file of prompts")
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}); one JSON object per line") from None
        prompt = row.get("messages", row.get("prompt")) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise ValueError(f"{path}:{number} has no 'prompt' text or chat 'messages' list; give each row one")
        rows.append((str(row.get("id", number)), prompt))
    if not rows:
        raise ValueError(f"{path} has no prompts; one JSON object per line with a 'prompt' or 'messages' field")
    return rows


def read_examples(path: str | Path) -> Iterator[Example]:
    """The examples saved so far; a torn last line (an interrupted write) is skipped."""
    if not Path(path).exists():
        return
    for line in Path(path).read_text().splitlines():
        try:
            yield Example(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue


def read_answers(path: str | Path, prompts: list[tuple[str, Any]]) -> list[Example]:
    """The examples of `path` that answer `prompts` (by id): the file may hold an earlier phase's answers too."""
    wanted = {key for key, _ in prompts}
    return [example for example in read_examples(path) if example.id in wanted]


def regenerate(model: Any, tokenizer: Any, prompts: list[tuple[str, Any]], out: str | Path, *, batch_size: int = 32,
               max_tokens: int = 256, temperature: float = 0.0, chat: bool = True, progress: bool = True) -> int:
    """Append the target's answers to `out` for every prompt not there yet; returns how many were added."""
    drop_torn_tail(out)
    done = {example.id for example in read_examples(out)}
    todo = [(key, encode_prompt(tokenizer, prompt, chat)) for key, prompt in prompts if key not in done]
    sampler = make_sampler(temp=temperature)
    start, written = time.perf_counter(), 0
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        response = batch_generate(model, tokenizer, [prompt for _, prompt in batch], max_tokens=max_tokens,
                                  return_token_ids=True, sampler=sampler)
        with open(out, "a") as file:
            for (key, prompt), answer in zip(batch, response.token_ids):
                file.write(json.dumps({"id": key, "prompt": prompt, "answer": list(map(int, answer))}) + "\n")
                written += len(answer)
        mx.clear_cache()
        if progress:
            seconds = time.perf_counter() - start
            show(first + len(batch), len(todo), f"prompts, {written} tokens, {written / seconds:.0f} tok/s", seconds)
    return len(todo)


def drop_torn_tail(path: str | Path) -> None:
    """An interrupted write can leave a last line without its newline; appending after it would join the next
    example to it, and both would be lost. Cut it off before appending."""
    path = Path(path)
    if path.exists() and (data := path.read_bytes()) and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])
