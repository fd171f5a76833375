"""The `ddtree-mlx` command: `generate` streams a completion to stdout, `serve` runs the HTTP server,
`train-drafter` trains a DFlash drafter (`write-prompts` has the model write prompts for it), `doctor` checks the
machine. Options are spelled as mlx-lm spells them where it has the same one.

    ddtree-mlx generate -p "Write a haiku about trees"               # the embedded SmolLM2 and its drafter
    ddtree-mlx generate --model mlx-community/Qwen3.5-27B-4bit --tree-budget 16 -p "..."
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from typing import Any, Iterator, Sequence

from ..blas import HINT, slow_blas, use_openblas
from ..config import DDTreeConfig
from ..engine.generate import DecodeStep, stream_generate
from ..engine.ranks import silence_other_ranks
from ..engine.sampling import SamplingParams
from ..loading.load import encode_prompt, load, stop_token_ids
from . import serve, train
from .arguments import (
    add_engine_arguments,
    deprecated,
    engine_config,
    kv_options,
    positive_int,
)
from .doctor import run_doctor as doctor


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the real command line (not a call from Python): fast BLAS first
        use_openblas(DDTreeConfig.from_env().openblas)
    logging.basicConfig(format="ddtree-mlx: %(message)s")  # the package's diagnostics, on stderr
    logging.getLogger("ddtree_mlx").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input found past argparse (the engine, the loader): a usage error too
        parser.error(str(err))
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's code for it
        print("\ninterrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddtree-mlx", description="Lossless tree speculative decoding for MLX.")
    parser.add_argument("--version", action="version", version=f"ddtree-mlx {version('ddtree-mlx')}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{generate,serve,train-drafter,write-prompts,doctor}")
    generate = commands.add_parser("generate", help="stream a completion of one prompt to stdout")
    add_generate_arguments(generate)
    generate.set_defaults(run=run_generate)
    served = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    serve.add_serve_arguments(served)
    served.set_defaults(run=serve.run_server)
    trained = commands.add_parser("train-drafter", help="train a DFlash drafter for a model on a prompt file")
    train.add_train_arguments(trained)
    trained.set_defaults(run=train.run_train_drafter)
    write = commands.add_parser("write-prompts", help="the model writes user requests: a prompt file for "
                                                      "train-drafter when you have none")
    train.add_write_arguments(write)
    write.set_defaults(run=train.run_write_prompts)
    checkup = commands.add_parser("doctor", help="check this machine: versions, BLAS, Metal kernels, lossless "
                                                 "self-test")
    checkup.add_argument("--model", help="model for the self-test (default: the embedded SmolLM2)")
    checkup.add_argument("--draft-model", help="drafter for the self-test, as for generate")
    deprecated(checkup, "--draft", "--draft-model")
    checkup.add_argument("--json", action="store_true", help="one JSON object, for bug reports")
    checkup.set_defaults(run=lambda args: doctor(args.model, args.draft_model, args.json, DDTreeConfig.from_env()))
    return parser


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --prompt)")
    parser.add_argument("--prompt", "-p", dest="prompt_option", metavar="PROMPT",
                        help="the prompt ('-' reads it from stdin)")
    parser.add_argument("--system-prompt", help="a system message before the prompt (with the chat template)")
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", "-m", type=positive_int, default=256,
                        help="tokens to generate (default: 256)")
    parser.add_argument("--ignore-chat-template", action="store_true", help="encode the prompt as is")
    deprecated(parser, "--no-chat-template", "--ignore-chat-template", nargs=0, const=True)
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    deprecated(parser, "--temperature", "--temp", type=float)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, off)")
    parser.add_argument("--seed", type=int, help="seed for sampling")


def run_generate(args: argparse.Namespace) -> int:
    prompt = pick_prompt(args)
    sampling = dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    config = engine_config(args)  # checked before the model loads, so a typo fails at once
    SamplingParams(**sampling)
    # `ar` drafts nothing; prompt lookup is the drafter that costs nothing to build.
    target, tokenizer, drafter = load(args.model, "prompt-lookup" if args.method == "ar" else args.draft_model,
                                      config=config, sharding=args.sharding)
    if args.sharding:
        silence_other_ranks()
    stops = stop_token_ids(tokenizer, args.model)  # a local --model directory may add generation_config ids
    messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else []) + [
        {"role": "user", "content": prompt}]
    tokens = encode_prompt(tokenizer, messages if args.system_prompt else prompt, chat=not args.ignore_chat_template)
    steps = stream_generate(
        target_model=target, draft_model=None if args.method == "ar" else drafter, tokenizer=tokenizer,
        prompt_tokens=tokens, max_new_tokens=args.max_tokens, stop_token_ids=stops, method=args.method,
        config=config, **sampling, **kv_options(args),
    )
    count, last = print_stream(steps, tokenizer, set(stops))
    print(stats_line(count, last), file=sys.stderr)
    if slow_blas():
        print(f"hint: {HINT}", file=sys.stderr)
    return 0


def pick_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_option is not None:
        raise ValueError("give the prompt once: as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise ValueError('a prompt is required: ddtree-mlx generate -p "your prompt"')
    return prompt


def print_stream(steps: Iterator[DecodeStep], tokenizer: Any, stops: set[int]) -> tuple[int, DecodeStep]:
    """Write text to stdout as cycles commit it; stop tokens end the text and are not shown."""
    detokenizer = tokenizer.detokenizer
    count = 0
    for step in steps:
        count += len(step.tokens)
        for token in step.tokens:
            if token not in stops:
                detokenizer.add_token(token)
        sys.stdout.write(detokenizer.last_segment)
        sys.stdout.flush()
    detokenizer.finalize()
    sys.stdout.write(detokenizer.last_segment + "\n")
    sys.stdout.flush()
    return count, step


def stats_line(tokens: int, last: DecodeStep) -> str:
    stats = last.stats.summary(tokens)
    return (f"decode {stats['tokens_per_second']:.1f} tokens/s | prefill {stats['prompt_tokens']} tokens in "
            f"{stats['prefill_seconds']:.3f}s | {stats['avg_acceptance']:.2f} tokens/cycle | "
            f"fast path {stats['fast_path_ratio']:.0%} | {stats['cycles']} cycles | {tokens} tokens, "
            f"finish: {last.finish_reason}")


if __name__ == "__main__":
    sys.exit(main())
