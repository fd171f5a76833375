"""Per cycle, run whichever way of decoding commits more tokens per second here. All are lossless, so switching
changes speed only.

- DDTREE_AR_FALLBACK (on by default): the tree or a plain AR step. A drafter that is right too rarely on this
  text (prompt lookup on text with nothing to copy, a drafter trained on other data) makes every verify pay for
  nodes that are rejected; then a plain step is faster, and DDTree must never be slower than not drafting.
- DDTREE_DFLASH_CONTROLLER: the tree or the single DFlash path (on a CPU the verify cost grows with the tree; on a
  GPU it barely does).

The controller measures instead of guessing: it tries each, then exploits the fastest by a moving average of
tokens per second, and re-tries the others now and then because the text can change character.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MethodController:
    methods: tuple[str, ...] = ("ddtree", "dflash")
    warmup: int = 3  # cycles of each method before exploiting
    probe_every: int = 8  # after warm-up, one cycle of another method every this many cycles, in turn
    smoothing: float = 0.3  # weight of the newest cycle in the moving average
    rates: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    cycle: int = 0
    probes: int = 0

    def pick(self) -> str:
        self.cycle += 1
        for method in self.methods:
            if self.counts.get(method, 0) < self.warmup:
                return method
        best = max(self.rates, key=self.rates.get)
        if self.cycle % self.probe_every:
            return best
        others = [method for method in self.methods if method != best]
        self.probes += 1
        return others[self.probes % len(others)]

    def record(self, method: str, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-9)
        previous = self.rates.get(method)
        self.rates[method] = rate if previous is None else (1 - self.smoothing) * previous + self.smoothing * rate
        self.counts[method] = self.counts.get(method, 0) + 1
