"""ddtree-mlx: lossless tree speculative decoding (DDTree over DFlash drafters) for MLX language models."""

from .config import DDTreeConfig
from .drafters import DFlashDrafter, Drafter
from .generate import DecodeStep, generate_ddtree_once, stream_generate

__all__ = ["DDTreeConfig", "DFlashDrafter", "DecodeStep", "Drafter", "generate_ddtree_once", "stream_generate"]
__version__ = "0.1.0"
