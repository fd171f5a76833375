"""Exact log-probabilities of committed tokens. Every committed token was chosen from a row of the target's own
logits given the true prefix (prefill's last row, a plain step's row, or a verify row on the accepted path), so
its log-probability is that row's log-softmax, as mlx-lm's generate_step computes it (in the model's dtype, before
temperature, top-p and top-k). Only the committed rows are gathered; one log-softmax and one partial sort over
them run on the device, read with the cycle's own host sync."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..config import is_int

MAX_TOP = 20  # as OpenAI's top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One committed token's log-probability under the target, and the `top` most likely tokens with theirs,
    sorted descending (the chosen token first among equal values)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def check_logprobs(value: object) -> int | None:
    if value is not None and not (is_int(value) and 0 <= value <= MAX_TOP):
        raise ValueError(f"logprobs must be None (off) or the number of top alternatives to report per token, an "
                         f"integer in [0, {MAX_TOP}], got {value!r}")
    return None if value is None else int(value)


class Scores:
    """The log-probabilities of the chosen tokens at some logits rows, still lazy: `arrays` to evaluate (with the
    cycle's sync), then `read`."""

    def __init__(self, logits: mx.array, chosen: mx.array, top: int, rows: mx.array | None = None):
        """logits [T, V]; chosen [T] the token chosen at each row; `rows` (optional) the rows to keep, as indices."""
        if rows is not None:
            logits, chosen = logits[rows], chosen[rows]
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # mlx-lm's, in the model's dtype
        self.chosen = chosen.astype(mx.int32)
        self.values = mx.take_along_axis(log_probs, self.chosen[:, None], axis=-1)[:, 0].astype(mx.float32)
        self.top = min(top, log_probs.shape[-1])
        self.top_ids = self.top_values = None
        if self.top:
            ids = mx.argpartition(-log_probs.astype(mx.float32), self.top - 1, axis=-1)[:, : self.top]
            self.top_ids = ids.astype(mx.int32)
            self.top_values = mx.take_along_axis(log_probs, ids, axis=-1).astype(mx.float32)

    @property
    def arrays(self) -> list[mx.array]:
        return [a for a in (self.chosen, self.values, self.top_ids, self.top_values) if a is not None]

    def read(self, n: int) -> list[TokenLogprob]:
        """The first `n` rows, one entry per committed token. Evaluated arrays are read whole: slicing them on the
        device would be a new op, queued behind any step queued since."""
        chosen, values = np.array(self.chosen)[:n].tolist(), np.array(self.values)[:n].tolist()
        if not self.top:
            return [TokenLogprob(t, v, []) for t, v in zip(chosen, values)]
        ids, tops = np.array(self.top_ids)[:n].tolist(), np.array(self.top_values)[:n].tolist()
        return [TokenLogprob(t, v, _ranked(t, v, i, w)) for t, v, i, w in zip(chosen, values, ids, tops)]


def _ranked(token: int, value: float, ids: list[int], values: list[float]) -> list[tuple[int, float]]:
    """The top entries descending, ties broken by the chosen token first, then by token id. The partial sort may
    have kept another token tied at the last place instead of the chosen one: the chosen one is preferred."""
    top = list(zip(ids, values))
    if token not in ids and value >= min(values):
        top.remove(min(top, key=lambda e: (e[1], -e[0])))
        top.append((token, value))
    return sorted(top, key=lambda e: (-e[1], e[0] != token, e[0]))
