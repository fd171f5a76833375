"""ddtree-mlx: lossless tree speculative decoding (DDTree over DFlash drafters) for MLX language models.

The public API lives here; the sub-packages, from the bottom of the stack up: tree (draft trees), kernels (the
tree recurrence's Metal kernels and pure-MLX twin), models (target adapters), drafting (drafters), loading,
engine (the generation loop), serving (HTTP), training (drafter training), cli."""

from .config import DDTreeConfig
from .drafting.dflash import DFlashDrafter
from .drafting.mixed import LookupDFlashDrafter
from .drafting.oracle import ScriptedDrafter
from .drafting.prompt_lookup import PromptLookupDrafter
from .drafting.protocol import Drafter
from .engine.batch import BatchGenerator, batch_generate
from .engine.generate import generate_ddtree_once, stream_generate
from .engine.prompt_cache import PromptCache
from .engine.session import DecodeStep
from .loading.load import load

__all__ = ["BatchGenerator", "DDTreeConfig", "DFlashDrafter", "DecodeStep", "Drafter", "LookupDFlashDrafter",
           "PromptCache", "PromptLookupDrafter", "ScriptedDrafter", "batch_generate", "generate_ddtree_once", "load",
           "stream_generate"]
__version__ = "0.1.0"
