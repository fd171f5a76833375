"""A prompt cache shared by requests: a prompt that starts like an earlier one skips prefilling the shared part.

Agents and chat clients resend the whole conversation every turn. Each entry holds a copy of the target's cache
(and the drafter's captured hidden states) after some token sequence: the body of a prompt (all but its last
token, which every request runs itself for its logits) and the end of a generation (prompt + answer, so the next
turn of the same conversation hits). A new prompt reuses the entry that covers most of it:

- attention KV caches can be trimmed, so a dense target reuses any shared prefix;
- a recurrent (GatedDeltaNet) state cannot be rewound, so a hybrid target reuses an entry only when the whole
  entry is a prefix of the new prompt.

Entries are evicted least recently used first to stay under `max_bytes`.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


@dataclass
class Snapshot:
    tokens: tuple[int, ...]  # what the cache holds
    variant: Hashable  # what else must match: the captured layers (the drafter's taps), the KV quantization
    cache: list[Any]
    hidden: mx.array | None  # the captured hidden states of those tokens [n, F] (None without a DFlash drafter)
    nbytes: int


@dataclass
class Hit:
    length: int  # prompt tokens already in `cache`
    cache: list[Any]
    hidden: mx.array | None


def _nbytes(cache: list[Any], hidden: mx.array | None) -> int:
    return sum(entry.nbytes for entry in cache) + (hidden.nbytes if hidden is not None else 0)


class PromptCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prompt cache bound must be >= 0 bytes (0 turns it off), got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.hits = self.misses = self.reused_tokens = 0
        self.lock = threading.Lock()  # the server's request threads read the counters while the model thread works

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def lookup(self, prompt: list[int], variant: Hashable) -> Hit | None:
        """The longest usable cached prefix of prompt[:-1] (the last token always runs, for its logits) among
        entries of the same `variant`, as a cache of its own (a copy: generating must not change the entry)."""
        body = tuple(prompt[:-1])
        best, best_length = None, 0
        with self.lock:
            for key, entry in self.entries.items():
                if entry.variant != variant:
                    continue
                shared = _shared(key, body)
                usable = shared if can_trim_prompt_cache(entry.cache) else (shared if shared == len(key) else 0)
                if usable > best_length:
                    best, best_length = key, usable
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self.reused_tokens += best_length
            entry = self.entries[best]
            self.entries.move_to_end(best)
            cache = copy.deepcopy(entry.cache)
        trim_prompt_cache(cache, len(entry.tokens) - best_length)
        hidden = entry.hidden[:best_length] if entry.hidden is not None else None
        return Hit(best_length, cache, hidden)

    def store(self, tokens: list[int], cache: list[Any], variant: Hashable, hidden: mx.array | None) -> None:
        """Keep a copy of `cache` holding `tokens` (and their captured hidden states), evicting as needed."""
        nbytes = _nbytes(cache, hidden)
        if not tokens or nbytes > self.max_bytes:
            return
        snapshot = Snapshot(tuple(tokens), variant, copy.deepcopy(cache), hidden, nbytes)
        with self.lock:
            self.entries.pop(snapshot.tokens, None)
            self.entries[snapshot.tokens] = snapshot
            while self.nbytes > self.max_bytes:
                self.entries.popitem(last=False)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}


def _shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
