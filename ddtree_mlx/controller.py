"""Per cycle, run whichever way of decoding commits more tokens per second here. All are lossless, so switching
changes speed only.

- DDTREE_AR_FALLBACK: the tree or a plain AR step. A drafter that is right too rarely on this text (prompt
  lookup on text with nothing to copy, a drafter trained on other data) makes every verify pay for nodes that are
  rejected; then a plain step is faster. Measured rates lag bursty acceptance (prompt lookup copying a span now
  and then), which is why it is not the default: deciding from the draft's own probabilities is the cost
  model's job.
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
    smoothing: float = 0.2  # weight of the newest cycle in the moving averages
    rates: dict[str, float] = field(default_factory=dict)  # tokens per second, per method
    sums: dict[str, tuple[float, float]] = field(default_factory=dict)  # moving (tokens, seconds) per cycle
    counts: dict[str, int] = field(default_factory=dict)
    cycle: int = 0
    probes: int = 0

    def pick(self) -> str:
        method = self.upcoming()
        self.cycle += 1
        self.probes += self.cycle % self.probe_every == 0 and self.warmed_up
        return method

    @property
    def warmed_up(self) -> bool:
        return all(self.counts.get(method, 0) >= self.warmup for method in self.methods)

    def upcoming(self) -> str:
        """What pick() will return, if nothing is recorded before it."""
        for method in self.methods:
            if self.counts.get(method, 0) < self.warmup:
                return method
        best = max(self.rates, key=self.rates.get)
        if (self.cycle + 1) % self.probe_every:
            return best
        others = [method for method in self.methods if method != best]
        return others[(self.probes + 1) % len(others)]

    def record(self, method: str, tokens: int, seconds: float) -> None:
        """Moving averages of tokens and of seconds, whose ratio is the rate: a tree commits 1 token one cycle and
        6 the next, and the mean of such per-cycle rates would swing with every short cycle."""
        previous = self.sums.get(method)
        now = (float(tokens), max(seconds, 1e-9))
        self.sums[method] = now if previous is None else tuple(
            (1 - self.smoothing) * old + self.smoothing * new for old, new in zip(previous, now))
        self.rates[method] = self.sums[method][0] / self.sums[method][1]
        self.counts[method] = self.counts.get(method, 0) + 1
