"""One progress line on stderr, redrawn in place, for long jobs (data regeneration, training, benchmarks)."""

from __future__ import annotations

import sys


def show(done: int, total: int, text: str, seconds: float | None = None) -> None:
    """[####----] done/total text, with an ETA when the elapsed `seconds` are given; a newline when done."""
    width = 30
    filled = width * done // max(total, 1)
    eta = f", ETA {(total - done) * seconds / done / 60:.0f} min" if seconds is not None and done else ""
    print(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {text}{eta}  ", end="\n" if done >= total else "",
          file=sys.stderr, flush=True)
