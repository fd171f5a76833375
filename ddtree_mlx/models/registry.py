"""Target adapters, one file per model family. `adapter_for` picks one from the mlx-lm model type."""

from __future__ import annotations

from typing import Any

from .adapter import TargetAdapter
from .llama import LlamaAdapter
from .qwen3 import Qwen3Adapter
from .qwen3_5 import Qwen3_5Adapter

ADAPTERS = {
    "qwen3_5": Qwen3_5Adapter,
    "qwen3_5_moe": Qwen3_5Adapter,
    "qwen3": Qwen3Adapter,
    "llama": LlamaAdapter,
}


def adapter_for(model: Any) -> TargetAdapter:
    model_type = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported target model type {model_type!r}; DDTree supports {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)
