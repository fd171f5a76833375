"""The `ddtree-mlx` command: `generate` streams a completion to stdout, `serve` runs the HTTP server,
`train-drafter` trains a DFlash drafter (`write-prompts` has the model write prompts for it), `doctor` checks the
machine.

    ddtree-mlx generate "Write a haiku about trees"                  # the embedded SmolLM2, prompt lookup
    ddtree-mlx generate --model mlx-community/Qwen3.5-27B-4bit --budget 16 "..."
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from typing import Any, Iterator, Sequence

from .blas import HINT, slow_blas, use_openblas
from .config import DDTreeConfig
from .distributed import silence_other_ranks
from .generate import METHODS, DecodeStep, stream_generate
from .kv_quantization import BITS, GROUP_SIZES, KVQuantization
from .loading import encode_prompt, load, stop_token_ids
from .sampling import SamplingParams


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the real command line (not a call from Python): fast BLAS first
        use_openblas(DDTreeConfig.from_env().openblas)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(serving=argv[:1] == ["serve"])
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # bad input found past argparse (the engine, the loader): a usage error too
        parser.error(str(err))
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, with the shell's code for it
        print("\ninterrupted", file=sys.stderr)
        return 130


def build_parser(serving: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddtree-mlx", description="Lossless tree speculative decoding for MLX.")
    parser.add_argument("--version", action="version", version=f"ddtree-mlx {version('ddtree-mlx')}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{generate,serve,train-drafter,write-prompts,doctor}")
    generate = commands.add_parser("generate", help="stream a completion of one prompt to stdout")
    add_generate_arguments(generate)
    generate.set_defaults(run=run_generate)
    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    if serving:  # the server's dependencies load only when it runs
        from .server import add_serve_arguments

        add_serve_arguments(serve)
    serve.set_defaults(run=run_serve)
    train = commands.add_parser("train-drafter", help="train a DFlash drafter for a model on a prompt file")
    add_train_arguments(train)
    train.set_defaults(run=run_train_drafter)
    write = commands.add_parser("write-prompts", help="the model writes user requests: a prompt file for "
                                                      "train-drafter when you have none")
    add_write_arguments(write)
    write.set_defaults(run=run_write_prompts)
    doctor = commands.add_parser("doctor", help="check this machine: versions, BLAS, Metal kernels, lossless self-test")
    doctor.add_argument("--model", help="model for the self-test (default: the embedded SmolLM2)")
    doctor.add_argument("--draft", help="drafter for the self-test, as for generate")
    doctor.add_argument("--json", action="store_true", help="one JSON object, for bug reports")
    doctor.set_defaults(run=run_doctor)
    return parser


def non_negative_int(text: str) -> int:
    return positive_int(text, minimum=0)


def budget(text: str) -> int | str:
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
    parser.add_argument("--draft", help="'prompt-lookup', 'dflash', or a DFlash checkpoint directory or repo id, "
                                        "with '+lookup' after either to mix prompt lookup in "
                                        "(default: the model's known DFlash drafter, else prompt lookup)")
    parser.add_argument("--method", choices=METHODS, default="ddtree",
                        help="ddtree: draft tree; dflash: single draft path; ar: plain decoding (default: ddtree)")
    parser.add_argument("--budget", type=budget, help="draft-tree nodes per cycle, or 'auto': sized per cycle for "
                                                      "this machine (default: DDTREE_BUDGET or auto)")
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


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt (or use --prompt)")
    parser.add_argument("--prompt", dest="prompt_option", metavar="PROMPT", help="the prompt")
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", type=positive_int, default=256, help="tokens to generate (default: 256)")
    parser.add_argument("--no-chat-template", action="store_true", help="encode the prompt as is")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, off)")
    parser.add_argument("--seed", type=int, help="seed for sampling")


def run_generate(args: argparse.Namespace) -> int:
    prompt = pick_prompt(args)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    # Settings are checked before the model loads, so a typo fails at once.
    config = DDTreeConfig.from_env(budget=args.budget)
    SamplingParams(**sampling)
    # `ar` drafts nothing; prompt lookup is the drafter that costs nothing to build.
    target, tokenizer, drafter = load(args.model, "prompt-lookup" if args.method == "ar" else args.draft,
                                      sharding=args.sharding)
    if args.sharding:
        silence_other_ranks()
    stops = stop_token_ids(tokenizer, args.model)  # a local --model directory may add generation_config ids
    steps = stream_generate(
        target_model=target, draft_model=None if args.method == "ar" else drafter, tokenizer=tokenizer,
        prompt_tokens=encode_prompt(tokenizer, prompt, chat=not args.no_chat_template), max_new_tokens=args.max_tokens,
        stop_token_ids=stops, method=args.method, config=config, **sampling, **kv_options(args),
    )
    tokens, last = print_stream(steps, tokenizer, set(stops))
    print(stats_line(tokens, last), file=sys.stderr)
    if slow_blas():
        print(f"hint: {HINT}", file=sys.stderr)
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .drafter_training import DrafterShape, TrainSettings

    shape, settings = DrafterShape(), TrainSettings()
    parser.add_argument("--model", help="the target: local directory or repo id (default: the embedded SmolLM2)")
    parser.add_argument("--prompts", required=True, help="JSON Lines file, one prompt per line ('prompt' text or "
                                                         "chat 'messages'); the target writes the answers itself")
    parser.add_argument("--out", required=True, help="directory for answers, checkpoints, curve and the drafter")
    parser.add_argument("--max-prompts", type=positive_int, help="use the first N prompts")
    parser.add_argument("--eval-prompts", nargs="+", default=[], metavar="FILE",
                        help="held-out prompt files: per-position acceptance on each after training")
    parser.add_argument("--eval-count", type=positive_int, default=40, help="held-out prompts used per file "
                                                                           "(default 40)")
    parser.add_argument("--answer-tokens", type=positive_int, default=256, help="longest answer regenerated")
    parser.add_argument("--gen-batch", type=positive_int, default=32, help="prompts per regeneration batch")
    parser.add_argument("--temperature", type=float, default=0.0, help="regeneration: 0 greedy, else sampled")
    parser.add_argument("--block-size", type=positive_int, default=shape.block_size)
    parser.add_argument("--layers", type=positive_int, default=shape.layers, help="draft decoder layers")
    parser.add_argument("--taps", type=positive_int, default=shape.taps, help="target layers the drafter reads")
    parser.add_argument("--mask-token-id", type=int, help="default: the tokenizer's mask token, else an unused "
                                                          "special token")
    parser.add_argument("--epochs", type=float, default=settings.epochs)
    parser.add_argument("--anchors", type=positive_int, default=settings.anchors, help="blocks per sequence")
    parser.add_argument("--accumulate", type=positive_int, default=settings.accumulate,
                        help="sequences per optimizer step (memory stays one sequence's)")
    parser.add_argument("--lr", type=float, default=settings.lr)
    parser.add_argument("--max-len", type=positive_int, default=settings.max_len, help="tokens per sequence")
    parser.add_argument("--max-steps", type=non_negative_int, help="stop after N more steps (resume later; 0: "
                                                                   "only evaluate and export)")
    parser.add_argument("--answers-only", action="store_true", help="regenerate the answers and stop (train later)")
    parser.add_argument("--vocab", choices=("full", "data"), default=settings.vocab,
                        help="training softmax over the whole vocabulary, or only the tokens in the data (faster; "
                             "evaluation always uses the whole vocabulary)")
    parser.add_argument("--vocab-size", type=non_negative_int, default=settings.vocab_size,
                        help="with --vocab data: only the N most frequent answer tokens (a smaller draft head; "
                             "0: every token of the data)")
    parser.add_argument("--init", help="start from an exported drafter of the same shape (fine-tune it)")
    parser.add_argument("--seed", type=int, default=settings.seed)


def run_train_drafter(args: argparse.Namespace) -> int:
    from .drafter_training import DrafterShape, TrainSettings, train_drafter

    shape = DrafterShape(args.block_size, args.layers, args.taps)
    settings = TrainSettings(epochs=args.epochs, anchors=args.anchors, accumulate=args.accumulate, lr=args.lr,
                             max_len=args.max_len, seed=args.seed, vocab=args.vocab,
                             vocab_size=args.vocab_size)
    out = train_drafter(args.model, args.prompts, args.out, shape=shape, settings=settings,
                        mask_token_id=args.mask_token_id, max_prompts=args.max_prompts,
                        answer_tokens=args.answer_tokens, gen_batch=args.gen_batch, temperature=args.temperature,
                        max_steps=args.max_steps, eval_prompts=args.eval_prompts, eval_count=args.eval_count,
                        init=args.init, answers_only=args.answers_only)
    if args.answers_only:
        print(f"answers: {out} (rerun without --answers-only to train on them)", file=sys.stderr)
    else:
        print(f"drafter: {out} (use it with --draft {out})", file=sys.stderr)
    return 0


def add_write_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the target: local directory or repo id (default: the embedded SmolLM2)")
    parser.add_argument("--out", required=True, help="JSON Lines file to append to (a rerun resumes)")
    parser.add_argument("--count", type=positive_int, required=True,
                        help="prompts the file should hold at least (whole batches)")
    parser.add_argument("--exclude", action="append", default=[], metavar="FILE.jsonl",
                        help="keep nothing sharing 8 words in a row with this file's prompts (your evaluation "
                             "set; benchmark.py's bundled sets are always excluded); repeatable")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    parser.add_argument("--batch", type=positive_int, default=32, help="requests sampled per batch")
    parser.add_argument("--seed", type=int, default=0)


def run_write_prompts(args: argparse.Namespace) -> int:
    from .written_prompts import excluded_runs, write_prompts

    if args.temperature <= 0:
        raise ValueError("--temperature must be above 0: greedy would write the same request every time")
    excluded_runs(args.exclude)  # a missing file fails before the model loads
    target, tokenizer, _ = load(args.model, "prompt-lookup")
    held = write_prompts(target, tokenizer, args.out, args.count, exclude=args.exclude, batch_size=args.batch,
                         temperature=args.temperature, seed=args.seed)
    print(f"{args.out}: {held} prompts (train on them with: ddtree-mlx train-drafter --prompts {args.out} ...)",
          file=sys.stderr)
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor as doctor

    return doctor(args.model, args.draft, args.json)


def run_serve(args: argparse.Namespace) -> int:
    from .server import run_server

    run_server(args)
    return 0


def pick_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_option is not None:
        raise ValueError("give the prompt once: as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if not prompt:
        raise ValueError('a prompt is required: ddtree-mlx generate "your prompt"')
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
