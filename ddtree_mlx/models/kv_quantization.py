"""A quantized KV cache with mlx-lm's meaning of `kv_bits`, `kv_group_size` and `quantized_kv_start`.

mlx-lm converts each plain KV cache to a QuantizedKVCache after the model call (a prefill chunk or a decode step)
that leaves it holding `quantized_kv_start` tokens or more; from then on every token attends to quantized keys and
values, its own included. So the token at position o is computed on the plain cache exactly when o is below the
start. DDTree follows that to the token: prefill converts after the same chunks, a tree verified on the plain
cache stays below the start (its deeper nodes wait for the next cycle), and after the commit that reaches the
start the cache is converted. Tree verify then quantizes the nodes' keys and values as the cache would store them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache

from ..config import is_int

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVQuantization:
    bits: int | None = None  # None: plain KV cache
    group_size: int = 64
    start: int = DEFAULT_QUANTIZED_KV_START  # mlx-lm's default (5000)

    def check(self, head_dim: int) -> None:
        if self.bits is None:
            return
        if not is_int(self.bits) or self.bits not in BITS:
            raise ValueError(f"kv_bits must be one of {BITS} (or None for a plain KV cache), got {self.bits!r}")
        if not is_int(self.group_size) or self.group_size not in GROUP_SIZES or head_dim % self.group_size:
            raise ValueError(f"kv_group_size must be one of {GROUP_SIZES} and divide the model's head size "
                             f"{head_dim}, got {self.group_size!r}")
        if not is_int(self.start) or self.start < 0:
            raise ValueError(f"quantized_kv_start must be an integer >= 0, got {self.start!r}")

    def convert(self, cache: list[Any]) -> None:
        """After a model call: quantize the plain KV caches that reached the start (mlx-lm's own function)."""
        maybe_quantize_kv_cache(cache, self.start, self.group_size, self.bits)

    def depth_room(self, cache: list[Any], prefix_len: int) -> int | None:
        """How deep a tree may grow this cycle: nodes computed on a plain cache must lie below the start."""
        if self.bits is None or any(hasattr(entry, "bits") for entry in cache):
            return None
        return max(self.start - 1 - prefix_len, 0)
