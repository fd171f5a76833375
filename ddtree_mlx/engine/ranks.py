"""What every rank of a sharded run must agree on, and a watchdog for the ranks that cannot.

Every rank runs the same loop on the same tokens: the drafter is replicated (same weights, same hidden states,
which the all-reduces make identical), so every rank builds the same tree and walks the same path. The one thing
that could differ is what is measured in seconds: the automatic tree size reads rank 0's clock on every rank
(`broadcast`), so all ranks verify the same trees and their collectives stay paired.

MLX's collectives wait forever for a rank that died or hung; `watched` bounds that wait (DDTREE_RANK_TIMEOUT).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import mlx.core as mx


def silence_other_ranks() -> None:
    """Every rank computes; only rank 0 prints (or serves)."""
    if mx.distributed.init().rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


def broadcast(values: list[float], group: Any) -> list[float]:
    """Rank 0's values, on every rank."""
    mine = mx.array([float(v) for v in values], dtype=mx.float32) * (group.rank() == 0)
    return mx.distributed.all_sum(mine, group=group).tolist()


STOPPED = 75  # the exit status of a rank the watchdog stops (EX_TEMPFAIL: run it again once every rank is up)


class Watchdog:
    """A thread that ends this process when sharded work makes no progress for `timeout` seconds: the main thread,
    blocked inside a collective whose peer is gone, cannot be interrupted any other way. Armed only while work
    runs (a prefill, a cycle, a calibration), never while a rank waits for its next request."""

    def __init__(self, rank: int):
        self.rank, self.timeout, self.armed, self.last = rank, 0.0, 0, time.monotonic()
        threading.Thread(target=self.watch, daemon=True, name="ddtree-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def watch(self) -> None:
        while True:
            time.sleep(0.25)
            if self.armed and time.monotonic() - self.last > self.timeout:
                print(f"ddtree-mlx: rank {self.rank} made no progress for {self.timeout:g} s: a rank has died or hung "
                      "(this one or another), so it stops (restart every rank; DDTREE_RANK_TIMEOUT sets the limit)",
                      file=sys.__stderr__, flush=True)  # a rank that does not print still says why it stops
                os._exit(STOPPED)


_WATCHDOG: Watchdog | None = None


@contextmanager
def watched(group: Any, timeout: float) -> Iterator[None]:
    """Run the block under the watchdog (nothing unsharded): it must finish, or `beat()`, within `timeout` s."""
    global _WATCHDOG
    if group is None:
        yield
        return
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(group.rank())
    _WATCHDOG.timeout = timeout
    _WATCHDOG.beat()
    _WATCHDOG.armed += 1
    try:
        yield
    finally:
        _WATCHDOG.armed -= 1


def beat() -> None:
    """Progress inside a long watched block (a prefill chunk)."""
    if _WATCHDOG is not None:
        _WATCHDOG.beat()
