"""One configuration object, read at call time from DDTREE_* env vars.

Explicit arguments win over the environment; the environment wins over the defaults. Every variable is parsed
strictly: a value that is not understood is a ValueError naming the variable and what it accepts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int to Python, never to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not a boolean; use one of 1/0, true/false, on/off, yes/no")


def parse_int(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer; set it to a whole number >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; set it to a whole number >= {minimum}")
    return value


@dataclass(frozen=True)
class DDTreeConfig:
    """Engine settings. Field docs double as the README's env-var table."""

    budget: int | str = "auto"
    """DDTREE_BUDGET: draft-tree nodes per cycle (the root not counted): "auto" (default) sizes each cycle's tree
    for the most tokens per second from this machine's verify costs (measured once per model, a few seconds, cached
    on disk) and the drafter's measured acceptance, down to a plain step when drafting does not pay; a number
    verifies a tree of that many nodes every cycle."""
    max_budget: int = 32
    """DDTREE_MAX_BUDGET: the largest tree DDTREE_BUDGET=auto may choose."""
    draft_window: int = 1024
    """DDTREE_DRAFT_WINDOW: the context tokens a DFlash drafter reads: the first 64 and the last this many
    (dflash-mlx's default); 0 reads all of them. Bounds what each draft attends to and what the first draft after a
    long prompt projects (a 6K-token prompt, the shipped drafter on this CPU: 30 -> 15 ms per draft, 300 -> 62 ms
    for the first)."""
    exact_commit: bool = False
    """DDTREE_EXACT_COMMIT: re-run accepted tokens through the plain model instead of installing captured state."""
    tree_aware_linear: bool = True
    """DDTREE_TREE_AWARE_LINEAR: 0 runs recurrent layers along the DFS order in chain segments, forking at branches."""
    tree_kernel: bool = True
    """DDTREE_TREE_KERNEL: use the Metal tree recurrence kernel where Metal is available."""
    tree_conv_kernel: bool = True
    """DDTREE_TREE_CONV_KERNEL: use the Metal tree conv kernel where Metal is available."""
    exact_tree_attention: bool | str = "auto"
    """DDTREE_EXACT_TREE_ATTENTION: verify attention as a prefix part and a tree part merged exactly (log-sum-exp),
    reading the cached prefix in place instead of concatenating it with the tree's keys under one mask: "auto"
    (default) on the CPU, where it and a faster exp (cpu_exp.py) make a tree at a 2K-token context ~25% cheaper to
    verify, and a plain step's attention uses that exp too (the cache read in place: ~13% at 6K); 1 on any device
    (plain steps on the CPU only); 0 never: every plain step is then mlx-lm's own."""
    exact_tree_attention_min_prefix: int = 1024
    """DDTREE_EXACT_TREE_ATTENTION_MIN_PREFIX: the split (and a step's own attention) is used once the prefix has
    at least this many tokens."""
    prefill_chunk: int = 2048
    """DDTREE_PREFILL_CHUNK: prompt tokens per prefill step (mlx-lm's prefill_step_size); bounds prefill memory."""
    profile_verify: bool = False
    """DDTREE_PROFILE_VERIFY: time verify per layer part (attention, linear, mlp, head); serializes, so slower."""
    profile_detail: bool = False
    """DDTREE_PROFILE_DETAIL: with DDTREE_PROFILE_VERIFY, also time the steps inside the token mixers."""
    prompt_cache_mb: int = 2048
    """DDTREE_PROMPT_CACHE_MB: the server's prompt cache bound in MiB (least recently used entries go first); 0 off."""
    rank_timeout: int = 120
    """DDTREE_RANK_TIMEOUT: sharded across processes (mx.distributed), the seconds a rank may go without progress
    (a cycle, a prefill chunk) before it stops with an error: MLX's collectives would wait forever for a rank that
    died or hung."""
    openblas: bool = True
    """DDTREE_OPENBLAS: on Linux, `ddtree-mlx` and `benchmark.py` re-run themselves with Debian's OpenBLAS
    (libopenblas0-pthread) preloaded when it is installed, ~25x faster matmuls than MLX's bundled BLAS; 0 keeps it."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "DDTreeConfig":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = "DDTREE_" + f.name.upper()
            if name in env and overrides.get(f.name) is None:  # an explicit argument wins, even over a bad var
                values[f.name] = _parse_field(f, name, env[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    @property
    def tree_cap(self) -> int:
        """The most draft nodes a tree may have."""
        return self.max_budget if self.budget == "auto" else self.budget

    def validate(self) -> None:
        if self.budget != "auto" and (not is_int(self.budget) or self.budget < 1):
            raise ValueError(f"tree budget must be 'auto' or an integer >= 1, got {self.budget!r}")
        if not is_int(self.max_budget) or self.max_budget < 1:
            raise ValueError(f"max_budget must be an integer >= 1, got {self.max_budget!r}")
        if not is_int(self.prefill_chunk) or self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")
        if not is_int(self.prompt_cache_mb) or self.prompt_cache_mb < 0:
            raise ValueError(f"prompt_cache_mb must be an integer >= 0 (0 turns the cache off), got {self.prompt_cache_mb!r}")
        if not is_int(self.rank_timeout) or self.rank_timeout < 1:
            raise ValueError(f"rank_timeout must be a whole number of seconds >= 1, got {self.rank_timeout!r}")
        if not is_int(self.draft_window) or self.draft_window < 0:
            raise ValueError(f"draft_window must be an integer >= 0 (0 reads the whole context), got {self.draft_window!r}")
        if self.exact_tree_attention not in (True, False, "auto"):
            raise ValueError(f"exact_tree_attention must be 'auto', True or False, got {self.exact_tree_attention!r}")
        prefix = self.exact_tree_attention_min_prefix
        if not is_int(prefix) or prefix < 0:
            raise ValueError(f"exact_tree_attention_min_prefix must be an integer >= 0, got {prefix!r}")

    def replace(self, **changes: Any) -> "DDTreeConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config


def parse_auto_bool(name: str, text: str) -> bool | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(name, text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not understood; use auto, 1/0, true/false, on/off or yes/no") from None


def parse_budget(name: str, text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_int(name, text, minimum=1)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a tree budget; set it to 'auto' or a whole number >= 1") from None


def _parse_field(f: dataclasses.Field, name: str, text: str) -> Any:
    if f.type in ("bool", bool):
        return parse_bool(name, text)
    if f.name == "budget":
        return parse_budget(name, text)
    if f.name == "exact_tree_attention":
        return parse_auto_bool(name, text)
    may_be_zero = ("exact_tree_attention_min_prefix", "prompt_cache_mb", "draft_window")
    return parse_int(name, text, minimum=0 if f.name in may_be_zero else 1)
