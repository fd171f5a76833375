"""Options `generate` and `serve` share, spelled as mlx-lm spells them where it has the same option; earlier
spellings still work, with a warning and a note in --help."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config import DDTreeConfig
from ..engine.generate import METHODS
from ..models.kv_quantization import BITS, GROUP_SIZES, KVQuantization

log = logging.getLogger("ddtree_mlx")


class Deprecated(argparse.Action):
    """An earlier spelling of an option: still accepted, with a warning that names the current one."""

    def __init__(self, option_strings: list[str], dest: str, current: str, **kwargs: Any):
        self.current = current
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=f"deprecated spelling of {current}",
                         **kwargs)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        log.warning("%s is deprecated; use %s", option_string, self.current)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated(parser: argparse.ArgumentParser, old: str, current: str, **kwargs: Any) -> None:
    dest = current.lstrip("-").replace("-", "_")
    parser.add_argument(old, action=Deprecated, dest=dest, current=current, **kwargs)


def non_negative_int(text: str) -> int:
    return positive_int(text, minimum=0)


def tree_budget(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def positive_int(text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {value}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """What `generate` and `serve` share: the model, its drafter and the decoding method."""
    parser.add_argument("--model", help="local directory or Hugging Face repo id (default: the embedded SmolLM2)")
    parser.add_argument("--draft-model", help="'prompt-lookup', 'dflash', or a DFlash checkpoint directory or repo "
                                              "id, with '+lookup' after either to mix prompt lookup in "
                                              "(default: the model's known DFlash drafter, else prompt lookup)")
    deprecated(parser, "--draft", "--draft-model")
    parser.add_argument("--method", choices=METHODS, default="ddtree",
                        help="ddtree: draft tree; dflash: single draft path; ar: plain decoding (default: ddtree)")
    parser.add_argument("--tree-budget", type=tree_budget,
                        help="draft-tree nodes per cycle, or 'auto': sized per cycle for this machine "
                             "(default: DDTREE_TREE_BUDGET or auto)")
    deprecated(parser, "--budget", "--tree-budget", type=tree_budget)
    parser.add_argument("--prefill-step-size", type=positive_int,
                        help="prompt tokens per prefill step (default: DDTREE_PREFILL_STEP_SIZE or 2048)")
    parser.add_argument("--sharding", choices=("tensor", "pipeline"),
                        help="under mlx.launch: split the target over every process, each layer (tensor) or runs of "
                             "whole layers (pipeline); rank 0 prints or serves")
    kv = KVQuantization()
    parser.add_argument("--kv-bits", type=int, choices=BITS, help="quantize the KV cache to this many bits "
                                                                  "(as mlx-lm; default: not quantized)")
    parser.add_argument("--kv-group-size", type=int, choices=GROUP_SIZES, default=kv.group_size,
                        help=f"KV quantization group size (default: {kv.group_size})")
    parser.add_argument("--quantized-kv-start", type=non_negative_int, default=kv.start,
                        help=f"quantize the KV cache once it holds this many tokens (default: {kv.start}, as mlx-lm)")


def kv_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start)


def engine_config(args: argparse.Namespace) -> DDTreeConfig:
    """The run's one configuration: these options, then DDTREE_* variables, then defaults (checked now, before any
    model loads, so a typo fails at once)."""
    return DDTreeConfig.from_env(tree_budget=args.tree_budget, prefill_step_size=args.prefill_step_size,
                                 prompt_cache_bytes=getattr(args, "prompt_cache_bytes", None),
                                 max_batch=getattr(args, "max_batch", None))
