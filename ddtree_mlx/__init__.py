"""ddtree-mlx: lossless tree speculative decoding (DDTree over DFlash drafters) for MLX language models."""

from .config import DDTreeConfig
from .drafters import DFlashDrafter, Drafter
from .generate import DecodeStep, generate_ddtree_once, stream_generate
from .loading import load
from .prompt_lookup import PromptLookupDrafter

__all__ = ["DDTreeConfig", "DFlashDrafter", "DecodeStep", "Drafter", "PromptLookupDrafter", "generate_ddtree_once",
           "load", "stream_generate"]
__version__ = "0.1.0"
