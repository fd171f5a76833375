"""--context: a long prompt's body is prefilled once per engine, and every method's run starts after it, so what is
measured is decode."""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from ddtree_mlx.engine.prompt_cache import PromptCache

CACHE_BYTES = 4 * 2**30  # room for a few long bodies: more than a server's default, as every prompt has one


class Prefills:
    """Our runs share a prompt cache (the engine's own, as a server uses it); mlx-lm's start from a copy of its own
    cache after the same body, prefilled in its own chunks."""

    def __init__(self, cache_bytes: int = CACHE_BYTES):
        self.ours = PromptCache(cache_bytes)
        self.mlx_lm: tuple[list[int], list[Any]] | None = None  # the current prompt's body and its cache

    def mlx_lm_cache(self, model: Any, prompt: list[int], chunk: int = 2048) -> list[Any]:
        """A copy of mlx-lm's cache after all of `prompt` but its last token, prefilled in chunks of mlx-lm's
        default prefill_step_size."""
        body = prompt[:-1]
        if self.mlx_lm is None or self.mlx_lm[0] != body:  # prompts run one after another: keep only the last
            done, cache = self.shared_part(model, body)
            for start in range(done, len(body), chunk):
                model(mx.array(body[start : start + chunk])[None], cache=cache)
                mx.eval([entry.state for entry in cache])
            self.mlx_lm = (body, cache)
        return copy.deepcopy(self.mlx_lm[1])

    def shared_part(self, model: Any, body: list[int]) -> tuple[int, list[Any]]:
        """The last body's cache cut back to what this body shares with it (the --context text), where mlx-lm can
        cut it (attention-only models): the shared text is prefilled once for mlx-lm as for us (from the prompt
        cache), not once per prompt (a 6K-token context: ~150 s each on this CPU)."""
        if self.mlx_lm is not None and can_trim_prompt_cache(self.mlx_lm[1]):
            last, cache = self.mlx_lm
            shared = next((i for i, (a, b) in enumerate(zip(last, body)) if a != b), min(len(last), len(body)))
            trim_prompt_cache(cache, len(last) - shared)
            return shared, cache
        return 0, make_prompt_cache(model)
