"""Side by side with dflash-mlx (0.1.8) on one random hybrid Qwen 3.5 target and one random DFlash drafter, float32,
in one process: decode tokens/s, tokens per cycle and draft milliseconds per cycle at each tree budget and on the
single path, every generation checked against mlx-lm's greedy tokens. Runs interleave per prompt.

    python -m benchmarks.vs_dflash_mlx --budgets 4,8,15 --prompts 3 --max-tokens 48 --repeats 3

What dflash-mlx 0.1.8 needs here: linear_num_value_heads == linear_num_key_heads (its recurrent rollback fails
otherwise: both are 8), and tied embeddings (it reads a qwen3_5 target's LM head as tied whatever the model says).
How it runs: its DDTree mode (verify mode `ddtree`, verify_len_cap B + 1) drafts B + 1 positions and seeds its tree
with the drafter's first-choice chain, which at B nodes is the whole tree (a chain of B, verified as a tree); its
prompt lookup (copyspec) stays on, as its users run it (random prompts hardly repeat). Draft times are each
engine's own accounting: dflash-mlx projects the new context into its drafter in its commit, and on its single path
counts only the launch of a draft it runs asynchronously. `whole block` rows: our drafter filling its whole block
whatever the tree can reach (the engine before it drafted only as deep as the tree).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field

from ddtree_mlx.blas import blas_name, use_openblas


@dataclass
class Row:
    label: str
    tokens: int = 0
    seconds: float = 0.0
    cycles: int = 0
    draft_seconds: float = 0.0
    lossless: bool = True
    rates: list[float] = field(default_factory=list)  # tokens/s of each generation

    def add(self, tokens: list[int], want: list[int], decode: float, cycles: int, draft: float) -> None:
        self.lossless &= tokens == want
        self.tokens += len(tokens) - 1  # the first comes from prefill
        self.seconds += decode
        self.cycles += cycles
        self.draft_seconds += draft
        self.rates.append((len(tokens) - 1) / decode)


def shapes():
    hybrid = dict(model_type="qwen3_5", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=8192,
                  linear_num_value_heads=8, linear_num_key_heads=8, linear_key_head_dim=64,
                  linear_value_head_dim=64, linear_conv_kernel_dim=4, full_attention_interval=4,
                  rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True,
                  rope_parameters={"type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
    drafter = dict(model_type="qwen3", hidden_size=512, num_hidden_layers=2, intermediate_size=1408,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, vocab_size=8192,
                   max_position_embeddings=8192, rope_theta=1e6, tie_word_embeddings=False, num_target_layers=8,
                   block_size=16)
    return hybrid, drafter


def build(seed: int):
    """The target (its final norm scaled so random logits have clear margins) and the drafter, same weights for a
    given seed: each engine gets its own pair (dflash-mlx binds its drafter to its target)."""
    import mlx.core as mx
    from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs, build_target_layer_ids
    from mlx_lm.models import qwen3_5

    hybrid, drafter = shapes()
    mx.random.seed(seed)
    target = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(hybrid))
    text = target.language_model.model
    text.norm.weight = text.norm.weight * 4.0
    mx.random.seed(seed + 1)
    layers = build_target_layer_ids(hybrid["num_hidden_layers"], drafter["num_hidden_layers"])
    draft = DFlashDraftModel(DFlashDraftModelArgs(**drafter, dflash_config={
        "target_layer_ids": layers, "mask_token_id": hybrid["vocab_size"] - 1}))
    mx.eval(target.parameters(), draft.parameters())
    return target, draft


class Peer:
    """dflash-mlx's engine on its own copy of the target and drafter."""

    def __init__(self, seed: int):
        from dflash_mlx.draft_backend import EagerDraftBackend
        from dflash_mlx.engine.target_ops import bind_draft_to_target, resolve_target_ops

        self.target, self.drafter = build(seed)
        self.ops = resolve_target_ops(self.target)
        self.ops.install_speculative_hooks(self.target)
        bind_draft_to_target(self.drafter, self.target, target_ops=self.ops)
        self.backend = EagerDraftBackend()

    def run(self, prompt: list[int], max_tokens: int, mode: str, cap: int | None):
        from dflash_mlx.engine.events import SummaryEvent, TokenEvent
        from dflash_mlx.runtime import stream_dflash_generate
        from dflash_mlx.runtime.context import build_offline_runtime_context

        context = build_offline_runtime_context(verify_mode=mode, verify_len_cap=cap)
        tokens, summary = [], None
        for event in stream_dflash_generate(target_model=self.target, target_ops=self.ops, draft_model=self.drafter,
                                            draft_backend=self.backend, max_new_tokens=max_tokens,
                                            stop_token_ids=[], prompt_tokens_override=prompt,
                                            runtime_context=context):
            if isinstance(event, TokenEvent):
                tokens.append(int(event.token_id))
            elif isinstance(event, SummaryEvent):
                summary = event
        phases = summary.phase_timings_us
        decode = (summary.elapsed_us - phases["prefill"]) / 1e6
        return tokens, decode, summary.cycles_completed, phases["draft"] / 1e6


class WholeBlock:
    """A drafter behind the protocol's original `candidates` signature: the session cannot pass it a depth, so it
    fills its whole block whatever the tree can reach, as every drafter did before drafting stopped at that depth."""

    def __init__(self, drafter):
        self.drafter = drafter

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def candidates(self, root_token, context_tokens, context_hidden, width):
        return self.drafter.candidates(root_token, context_tokens, context_hidden, width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="4,15", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    use_openblas(True)

    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from ddtree_mlx import generate_ddtree_once
    from ddtree_mlx.drafting.dflash import DFlashDrafter

    target, draft_model = build(args.seed)
    peer = Peer(args.seed)
    ours = DFlashDrafter(draft_model)
    whole = WholeBlock(ours)

    def run_ours(prompt, drafter, method, budget):
        result = generate_ddtree_once(target_model=target, draft_model=drafter, prompt_tokens=prompt,
                                      max_new_tokens=args.max_tokens, stop_token_ids=[], method=method,
                                      tree_budget=budget)
        return (result["generated_token_ids"], result["decode_seconds"], result["cycles"],
                result["phase_timings"]["draft"])

    plan = {}
    for budget in args.budgets:
        plan[f"dflash-mlx ddtree@{budget}"] = lambda p, b=budget: peer.run(p, args.max_tokens, "ddtree", b + 1)
        plan[f"ours ddtree@{budget}"] = lambda p, b=budget: run_ours(p, ours, "ddtree", b)
        if budget < draft_model.block_size - 1:  # deeper trees use the whole block anyway
            plan[f"ours ddtree@{budget} whole block"] = lambda p, b=budget: run_ours(p, whole, "ddtree", b)
    plan["dflash-mlx single path"] = lambda p: peer.run(p, args.max_tokens, "dflash", None)
    plan["ours single path"] = lambda p: run_ours(p, ours, "dflash", None)

    rng = random.Random(args.seed)
    vocab = shapes()[0]["vocab_size"]
    prompts = [[rng.randrange(vocab - 1) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    print(f"# python -m benchmarks.vs_dflash_mlx {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# BLAS: {blas_name()}; mlx {mx.__version__}")
    for run in plan.values():  # warm-up: first-use compilation and allocation
        run(prompts[0][:16])
    rows = {label: Row(label) for label in plan}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for prompt in prompts:
            want = [int(t) for t, _ in generate_step(mx.array(prompt), target, max_tokens=args.max_tokens)]
            for label, run in plan.items():
                tokens, decode, cycles, draft = run(prompt)
                rows[label].add(tokens, want, decode, cycles, draft)
    print(f"# {args.repeats} x {args.prompts} prompts, {time.perf_counter() - started:.0f} s\n")
    print("| run | tok/s | tok/cyc | draft ms/cyc | vs dflash-mlx: all / median pair (range) | lossless |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        peer = rows[label.replace("ours", "dflash-mlx").removesuffix(" whole block")]
        pairs = sorted(mine / theirs for mine, theirs in zip(row.rates, peer.rates))  # same prompt, back to back
        overall = row.tokens / row.seconds / (peer.tokens / peer.seconds)
        print(f"| {label} | {row.tokens / row.seconds:.2f} | {row.tokens / row.cycles:.2f} | "
              f"{row.draft_seconds / row.cycles * 1e3:.1f} | {overall:.3f} / {pairs[len(pairs) // 2]:.3f} "
              f"({pairs[0]:.2f}-{pairs[-1]:.2f}) | {'yes' if row.lossless else 'NO'} |")
    return 0 if all(row.lossless for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
