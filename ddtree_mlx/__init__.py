"""ddtree-mlx: lossless tree speculative decoding (DDTree over DFlash drafters) for MLX language models."""

from .config import DDTreeConfig
from .drafting.dflash import DFlashDrafter
from .drafting.prompt_lookup import PromptLookupDrafter
from .drafting.protocol import Drafter
from .engine.generate import DecodeStep, generate_ddtree_once, stream_generate
from .loading.load import load

__all__ = ["DDTreeConfig", "DFlashDrafter", "DecodeStep", "Drafter", "PromptLookupDrafter", "generate_ddtree_once",
           "load", "stream_generate"]
__version__ = "0.1.0"
