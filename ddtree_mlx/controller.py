"""DDTREE_DFLASH_CONTROLLER: per cycle, run the tree or the single DFlash path, whichever commits more tokens
per second here. Both are lossless, so switching changes speed only.

A tree accepts more tokens per cycle but costs more to verify; which wins depends on the drafter's confidence
on this text and on the hardware (on a CPU verify cost grows with the tree; on a GPU it barely does). The
controller measures instead of guessing: it tries both, then exploits the faster one by a moving average of
tokens per second, and re-tries the other now and then because the text can change character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MethodController:
    warmup: int = 3  # cycles of each method before exploiting
    probe_every: int = 8  # after warm-up, one cycle of the slower method every this many cycles
    smoothing: float = 0.3  # weight of the newest cycle in the moving average
    rates: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"ddtree": 0, "dflash": 0})
    cycle: int = 0

    def pick(self) -> str:
        self.cycle += 1
        for method in ("ddtree", "dflash"):
            if self.counts[method] < self.warmup:
                return method
        best = max(self.rates, key=self.rates.get)
        other = "dflash" if best == "ddtree" else "ddtree"
        return other if self.cycle % self.probe_every == 0 else best

    def record(self, method: str, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        previous = self.rates.get(method)
        self.rates[method] = rate if previous is None else (1 - self.smoothing) * previous + self.smoothing * rate
        self.counts[method] += 1
