"""Drafting only as deep as the tree can reach, measured two ways.

What one DFlash draft costs per block length (the root and `depth` positions), our drafter alone: the embedded
SmolLM2's shipped drafter (block 8) and the random block-16 drafter of benchmarks/vs_dflash_mlx.py on its random
hybrid. After a prompt, each draft reads 2 new context rows (a cycle's accepted tokens) and returns its top 32
candidates per depth, evaluated, as the session asks for them; block lengths interleave round by round.

    python -m benchmarks.draft_depth --rounds 60

With --generate: the embedded SmolLM2 and its default drafter (DFlash + prompt lookup) at fixed tree budgets,
drafting as deep as the tree reaches against the whole block (vs_dflash_mlx.WholeBlock), interleaved per prompt,
every generation checked against mlx-lm's greedy tokens: tokens per cycle (does the shorter block propose worse?)
and decode tokens/s.

    python -m benchmarks.draft_depth --generate --budgets 4 --limit 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import time

from ddtree_mlx.blas import blas_name, use_openblas


def timings(adapter, drafter, prompt: list[int], rounds: int) -> dict[int, list[float]]:
    import mlx.core as mx

    drafter.reset(adapter, prompt)
    hidden = adapter.forward(mx.array(prompt), adapter.make_cache(), drafter.target_layer_ids)[1]
    first = drafter.candidates(prompt[-1], prompt, hidden, 32)  # the prompt's context, read once
    mx.eval(first.tokens, first.log_probs)
    seconds: dict[int, list[float]] = {depth: [] for depth in range(1, drafter.block_size)}
    for _ in range(rounds):
        for depth, times in seconds.items():
            start = time.perf_counter()
            top = drafter.candidates(prompt[-1], prompt[-2:], hidden[-2:], 32, depth=depth)
            mx.eval(top.tokens, top.log_probs)
            times.append(time.perf_counter() - start)
    return seconds


def generate(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.loading.load import encode_prompt, load, stop_token_ids

    from .prompts import PROMPT_SETS, load_prompts
    from .vs_dflash_mlx import WholeBlock

    target, tokenizer, drafter = load()
    stops = stop_token_ids(tokenizer)
    variants = {"to the tree's depth": drafter, "whole block": WholeBlock(drafter)}
    texts = load_prompts(list(PROMPT_SETS), args.limit, 0)
    prompts = [encode_prompt(tokenizer, text) for rows in texts.values() for text in rows]
    for variant in variants.values():  # warm-up: first-use compilation and allocation
        generate_ddtree_once(target_model=target, draft_model=variant, prompt_tokens=prompts[0], max_new_tokens=8,
                             tree_budget=args.budgets[0])
    # Per budget and variant: tokens, decode seconds, cycles, draft seconds.
    totals = {(budget, name): [0, 0.0, 0, 0.0] for budget in args.budgets for name in variants}
    lossless = True
    for index, prompt in enumerate(prompts):
        want = []
        for token, _ in generate_step(mx.array(prompt), target, max_tokens=args.max_tokens):
            want.append(int(token))
            if want[-1] in stops:
                break
        for budget in args.budgets:
            for name, variant in variants.items():
                result = generate_ddtree_once(target_model=target, draft_model=variant, prompt_tokens=prompt,
                                              max_new_tokens=args.max_tokens, stop_token_ids=stops,
                                              tree_budget=budget)
                lossless &= result["generated_token_ids"] == want
                total = totals[budget, name]
                total[0] += len(result["generated_token_ids"]) - 1
                total[1] += result["decode_seconds"]
                total[2] += result["cycles"]
                total[3] += result["phase_timings"]["draft"]
        print(f"# prompt {index + 1}/{len(prompts)}", file=sys.stderr)
    print("| budget | drafted | tok/s | tok/cyc | draft ms/cyc | tok/s vs whole block |")
    print("|---|---|---|---|---|---|")
    for (budget, name), (tokens, seconds, cycles, draft) in totals.items():
        whole = totals[budget, "whole block"]
        print(f"| {budget} | {name} | {tokens / seconds:.2f} | {tokens / cycles:.2f} | {draft / cycles * 1e3:.1f} | "
              f"{tokens / seconds / (whole[0] / whole[1]):.3f} |")
    print(f"\nlossless: {'yes' if lossless else 'NO'}")
    return 0 if lossless else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--budgets", default="4", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--limit", type=int, default=3, help="prompts per bundled set")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    use_openblas(True)
    print(f"# python -m benchmarks.draft_depth {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# BLAS: {blas_name()}")
    if args.generate:
        return generate(args)

    import numpy as np

    from ddtree_mlx.drafting.dflash import DFlashDrafter
    from ddtree_mlx.loading.load import load, load_drafter
    from ddtree_mlx.models.registry import adapter_for

    from .vs_dflash_mlx import build

    smollm2 = load(None, "prompt-lookup")[0]
    hybrid, random_drafter = build(0)
    cases = {"SmolLM2 + shipped drafter": (adapter_for(smollm2), load_drafter(None, "dflash")),
             "random hybrid + random drafter": (adapter_for(hybrid), DFlashDrafter(random_drafter))}
    print(f"# ms per draft, median (10th percentile) of {args.rounds} rounds\n")
    for name, (adapter, drafter) in cases.items():
        seconds = timings(adapter, drafter, list(range(100, 400)), args.rounds)
        cells = [f"{np.median(s) * 1e3:.1f} ({np.percentile(s, 10) * 1e3:.1f})" for s in seconds.values()]
        print(f"| {name} | block " + " | ".join(str(depth + 1) for depth in seconds) + " |")
        print("| | " + " | ".join(cells) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
