"""The target's own token choice at every tree node: greedy, or a seeded draw from the processed distribution.

Sample-and-match verification draws the target's token independently at each node and walks while the draw is
a child; the draw at the last accepted node is the bonus. Every committed token is then a draw from the target
given the true prefix, so the output has exactly the target's sampling distribution. Filtering follows mlx-lm's
`make_sampler`: top-p and top-k on the log-probabilities, then the temperature.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from ..config import is_int, is_number
from ..models.cpu_exp import on_cpu

TIE_EPS = 32  # settled_greedy's margin: twice the 16 eps two roundings can close


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Picks the target's token for each row of logits. Draws use their own key chain, so a seed reproduces
    the output whatever else uses MLX's global random state."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.key = mx.random.key(seed)

    def __call__(self, logits: mx.array, now: bool = False) -> mx.array:
        """logits [T, V] -> tokens [T]; rows are independent draws. `now`: the caller reads the tokens next anyway,
        so greedy may wait for the logits here (on a CPU: `settled_greedy`)."""
        if self.params.greedy:
            return settled_greedy(logits) if now and on_cpu() else greedy(logits)
        log_probs = log_probs_of(logits)
        if self.params.top_p < 1:
            log_probs = apply_top_p(log_probs, self.params.top_p)
        if 0 < self.params.top_k < log_probs.shape[-1]:
            log_probs = apply_top_k(log_probs, self.params.top_k)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(log_probs * (1.0 / self.params.temperature), key=draw)


def log_probs_of(logits: mx.array) -> mx.array:
    # As mlx-lm: choose from log-probs in the model's dtype. In bf16 their rounding, not the raw logits', decides
    # near-ties, so greedy must be the argmax of these to match mlx-lm's greedy token for token.
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(log_probs_of(logits), axis=-1)


def settled_greedy(logits: mx.array) -> mx.array:
    """mlx-lm's greedy tokens, argmax(logits - logsumexp(logits)), evaluated now, without the logsumexp where it
    cannot change them: MLX's CPU exp costs ~12 ns an element, 0.6 ms a row of SmolLM2's 49,152 logits (a 16-node
    verify: 9 ms), the argmax and runner-up below ~1 ns.

    Subtracting one c from every logit and rounding is monotone, so only a logit the rounding can merge with the
    largest could take its place. mlx-lm's c lies in [max, max + ln V] (V < 2 ** 22: under 16 above the max), so
    the largest log-prob and, when the gap is under 16, the runner-up's are under 32 in magnitude, where rounding
    moves a value by at most 8 eps of the dtype: a gap above TIE_EPS eps keeps the largest logit first. Where a row
    is nearer a tie than that (or holds inf or NaN), all rows take mlx-lm's own computation."""
    vocab = logits.shape[-1]
    if vocab >= 2**22:
        return greedy(logits)
    top = mx.argmax(logits, axis=-1)
    best = mx.take_along_axis(logits, top[:, None], axis=-1)
    runner_up = mx.max(mx.where(mx.arange(vocab) == top[:, None], -mx.inf, logits), axis=-1, keepdims=True)
    gap = best.astype(mx.float32) - runner_up.astype(mx.float32)
    clear = mx.all(gap > TIE_EPS * mx.finfo(logits.dtype).eps) & mx.all(mx.isfinite(best)) & ~mx.any(mx.isnan(logits))
    mx.eval(top, clear)
    return top if clear.item() else greedy(logits)
