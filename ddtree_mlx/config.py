"""One configuration object, built where a run starts (the CLI, `serve`, an API call that was given none) from
explicit arguments, then DDTREE_* env vars, then defaults; validated there and passed down. Nothing below the
entry points reads the environment.

Every variable is parsed strictly: a value that is not understood is a ValueError naming the variable and what it
accepts. Each setting has one name everywhere: the field `tree_budget` is DDTREE_TREE_BUDGET, `--tree-budget` and
`tree_budget=`. Names from earlier releases (DDTREE_BUDGET, DDTREE_MAX_BUDGET, DDTREE_PREFILL_CHUNK,
DDTREE_PROMPT_CACHE_MB) still work, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("ddtree_mlx")

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

    tree_budget: int | str = "auto"
    """DDTREE_TREE_BUDGET: draft-tree nodes per cycle (the root not counted): "auto" (default) sizes each cycle's tree
    for the most tokens per second from this machine's verify costs (measured once per model, a few seconds, cached
    on disk) and the drafter's measured acceptance, down to a plain step when drafting does not pay; a number
    verifies a tree of that many nodes every cycle."""
    max_tree_budget: int = 32
    """DDTREE_MAX_TREE_BUDGET: the largest tree DDTREE_TREE_BUDGET=auto may choose."""
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
    prefill_step_size: int = 2048
    """DDTREE_PREFILL_STEP_SIZE: prompt tokens per prefill step (mlx-lm's prefill_step_size); bounds prefill
    memory."""
    profile_verify: bool = False
    """DDTREE_PROFILE_VERIFY: time verify per layer part (attention, linear, mlp, head); serializes, so slower."""
    profile_detail: bool = False
    """DDTREE_PROFILE_DETAIL: with DDTREE_PROFILE_VERIFY, also time the steps inside the token mixers."""
    prompt_cache_bytes: int = 2 * 2**30
    """DDTREE_PROMPT_CACHE_BYTES: the server's prompt cache bound in bytes (mlx-lm's --prompt-cache-bytes; a K, M
    or G suffix counts binary units); least recently used entries go first; 0 turns it off."""
    max_batch: int = 4
    """DDTREE_MAX_BATCH: the most requests decoded together (`serve --max-batch`, BatchGenerator's default): their
    trees are verified in one target forward, requests joining and leaving between cycles; 1 runs one request at a
    time. Sharded serving always runs one at a time."""
    rank_timeout: int = 120
    """DDTREE_RANK_TIMEOUT: sharded across processes (mx.distributed), the seconds a rank may go without progress
    (a cycle, a prefill chunk) before it stops with an error: MLX's collectives would wait forever for a rank that
    died or hung."""
    openblas: bool = True
    """DDTREE_OPENBLAS: on Linux, `ddtree-mlx` and `benchmark.py` re-run themselves with Debian's OpenBLAS
    (libopenblas0-pthread) preloaded when it is installed, ~25x faster matmuls than MLX's bundled BLAS; 0 keeps it."""
    cache_dir: str = "~/.cache/ddtree-mlx"
    """DDTREE_CACHE_DIR: where the embedded model is converted once and verify-cost curves are kept."""
    api_key: str = field(default="", repr=False)
    """DDTREE_API_KEY: the server's API key (`serve --api-key`); when set, every route but /health needs it as
    `Authorization: Bearer KEY` or `x-api-key: KEY`; empty (default): none needed."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "DDTreeConfig":
        """Explicit `overrides` (None means "not given"), then DDTREE_* variables in `env` (default: this process's
        environment), then the defaults; validated."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = "DDTREE_" + f.name.upper()
            if overrides.get(f.name) is not None:  # an explicit argument wins, even over a bad variable
                continue
            if name in env:
                values[f.name] = _parse_field(f, name, env[name])
            elif (old := _OLD_NAMES.get(f.name)) and old[0] in env:
                log.warning("%s is deprecated; set %s instead", old[0], name)
                values[f.name] = old[1](_parse_field(f, old[0], env[old[0]]))
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    @property
    def tree_cap(self) -> int:
        """The most draft nodes a tree may have."""
        return self.max_tree_budget if self.tree_budget == "auto" else self.tree_budget

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    def validate(self) -> None:
        if self.tree_budget != "auto" and (not is_int(self.tree_budget) or self.tree_budget < 1):
            raise ValueError(f"tree_budget must be 'auto' or an integer >= 1, got {self.tree_budget!r}")
        if not is_int(self.max_tree_budget) or self.max_tree_budget < 1:
            raise ValueError(f"max_tree_budget must be an integer >= 1, got {self.max_tree_budget!r}")
        if not is_int(self.prefill_step_size) or self.prefill_step_size < 1:
            raise ValueError(f"prefill_step_size must be an integer >= 1, got {self.prefill_step_size!r}")
        if not is_int(self.prompt_cache_bytes) or self.prompt_cache_bytes < 0:
            raise ValueError("prompt_cache_bytes must be an integer >= 0 (0 turns the cache off), "
                             f"got {self.prompt_cache_bytes!r}")
        if not isinstance(self.api_key, str):
            raise ValueError("api_key must be a string")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
            raise ValueError(f"cache_dir must be a directory path, got {self.cache_dir!r}")
        if not is_int(self.max_batch) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1 (1: one request at a time), got {self.max_batch!r}")
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


def parse_bytes(name: str, text: str) -> int:
    """A size in bytes: digits, optionally followed by K, M or G (binary units; a trailing B or iB is allowed)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{name}={text!r} is not a size; use a whole number of bytes, optionally with K, M or G")
    return int(match[1]) * 1024 ** " kmg".index((match[2] or " ").lower())


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
    if f.name == "tree_budget":
        return parse_budget(name, text)
    if f.name == "exact_tree_attention":
        return parse_auto_bool(name, text)
    if f.name == "prompt_cache_bytes":
        return parse_bytes(name, text)
    if f.name == "api_key":
        return text.strip()
    if f.name == "cache_dir":
        if not text.strip():
            raise ValueError(f"{name} is empty; set it to a directory or unset it")
        return text
    if name == "DDTREE_PROMPT_CACHE_MB":  # the old name counted MiB
        return parse_int(name, text, minimum=0)
    may_be_zero = ("exact_tree_attention_min_prefix", "draft_window")
    return parse_int(name, text, minimum=0 if f.name in may_be_zero else 1)


# Field -> (its earlier variable, how that variable's value converts).
_OLD_NAMES = {
    "tree_budget": ("DDTREE_BUDGET", lambda v: v),
    "max_tree_budget": ("DDTREE_MAX_BUDGET", lambda v: v),
    "prefill_step_size": ("DDTREE_PREFILL_CHUNK", lambda v: v),
    "prompt_cache_bytes": ("DDTREE_PROMPT_CACHE_MB", lambda megabytes: megabytes * 2**20),
}
