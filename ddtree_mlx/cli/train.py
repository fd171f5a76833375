"""`ddtree-mlx train-drafter` and `ddtree-mlx write-prompts`: a DFlash drafter for a model no one trained one for."""

from __future__ import annotations

import argparse
import sys

from ..config import DDTreeConfig
from ..loading.load import load
from ..training.drafter import DrafterShape
from ..training.trainer import TrainSettings, train_drafter
from ..training.written_prompts import excluded_runs, write_prompts
from .arguments import non_negative_int, positive_int


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    shape = DrafterShape(args.block_size, args.layers, args.taps)
    settings = TrainSettings(epochs=args.epochs, anchors=args.anchors, accumulate=args.accumulate, lr=args.lr,
                             max_len=args.max_len, seed=args.seed, vocab=args.vocab,
                             vocab_size=args.vocab_size)
    out = train_drafter(args.model, args.prompts, args.out, shape=shape, settings=settings,
                        mask_token_id=args.mask_token_id, max_prompts=args.max_prompts,
                        answer_tokens=args.answer_tokens, gen_batch=args.gen_batch, temperature=args.temperature,
                        max_steps=args.max_steps, eval_prompts=args.eval_prompts, eval_count=args.eval_count,
                        init=args.init, answers_only=args.answers_only, config=DDTreeConfig.from_env())
    if args.answers_only:
        print(f"answers: {out} (rerun without --answers-only to train on them)", file=sys.stderr)
    else:
        print(f"drafter: {out} (use it with --draft-model {out})", file=sys.stderr)
    return 0


def add_write_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the target: local directory or repo id (default: the embedded SmolLM2)")
    parser.add_argument("--out", required=True, help="JSON Lines file to append to (a rerun resumes)")
    parser.add_argument("--count", type=positive_int, required=True,
                        help="prompts the file should hold at least (whole batches)")
    parser.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="FILE.jsonl",
                        help="keep nothing sharing 8 words in a row with this file's prompts (your evaluation "
                             "sets, e.g. a checkout's benchmarks/prompts/*.jsonl); repeatable")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    parser.add_argument("--batch", type=positive_int, default=32, help="requests sampled per batch")
    parser.add_argument("--seed", type=int, default=0)


def run_write_prompts(args: argparse.Namespace) -> int:
    if args.temperature <= 0:
        raise ValueError("--temperature must be above 0: greedy would write the same request every time")
    excluded_runs(args.exclude)  # a missing file fails before the model loads
    target, tokenizer, _ = load(args.model, "prompt-lookup", config=DDTreeConfig.from_env())
    held = write_prompts(target, tokenizer, args.out, args.count, exclude=args.exclude, batch_size=args.batch,
                         temperature=args.temperature, seed=args.seed)
    print(f"{args.out}: {held} prompts (train on them with: ddtree-mlx train-drafter --prompts {args.out} ...)",
          file=sys.stderr)
    return 0
