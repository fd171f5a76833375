"""The doctor's second self-test: a tiny hybrid Qwen 3.5 target built in-process (no download), in float32,
bfloat16 and float16, decoded with DDTree under an oracle drafter (deep, branching trees, so the tree conv and
recurrence run at every launch layout) and compared with mlx-lm's own greedy decoding of the same model."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models import qwen3_5

from ..config import DDTreeConfig
from ..drafting.oracle import ScriptedDrafter
from ..engine.generate import generate_ddtree_once

# Head sizes the Metal tree recurrence takes (Dk a multiple of 32), two value heads per key head.
TINY_QWEN3_5 = dict(
    model_type="qwen3_5", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rms_norm_eps=1e-6, vocab_size=256, max_position_embeddings=1024, num_hidden_layers=4,
    full_attention_interval=2, tie_word_embeddings=False, linear_num_value_heads=4, linear_num_key_heads=2,
    linear_key_head_dim=32, linear_value_head_dim=16, linear_conv_kernel_dim=4,
    rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
DTYPES = ("float32", "bfloat16", "float16")
PROMPT = list(range(3, 35))
TOKENS = 24
# A difference in bfloat16 or float16 is rounding only at a near-tie: mlx-lm's own top two log-probs within
# this many steps of the dtype at the row's largest logit (the tree verify and mlx-lm's one-token steps may round
# such a tie apart). float32 must be identical.
NEAR_TIE_STEPS = 2
MANTISSA_BITS = {"bfloat16": 7, "float16": 10}


def step_at(dtype: str, magnitude: float) -> float:
    """The distance between neighbouring values of `dtype` around `magnitude`."""
    return 2.0 ** (np.floor(np.log2(max(magnitude, 2.0**-14))) - MANTISSA_BITS[dtype])


def tiny_hybrid(dtype: str) -> Any:
    mx.random.seed(0)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(TINY_QWEN3_5))
    text = model.language_model
    text.model.norm.weight = text.model.norm.weight * 4.0  # sharper than a random model's near-uniform logits
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def run(dtype: str, config: DDTreeConfig) -> dict[str, Any]:
    model = tiny_hybrid(dtype)
    logits = []  # each step's raw logits, as mlx-lm's step saw them
    steps = list(generate_step(mx.array(PROMPT), model, max_tokens=TOKENS,
                               logits_processors=[lambda tokens, row: logits.append(row) or row]))
    expected = [int(token) for token, _ in steps]
    drafter = ScriptedDrafter(PROMPT + expected, block_size=8, seed=1)  # an oracle: ranks 1st to 3rd, or absent
    ours = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=PROMPT, max_new_tokens=TOKENS,
                                stop_token_ids=[], config=config.replace(tree_budget=8))
    got = ours["generated_token_ids"]
    result = {"dtype": dtype, "tokens": len(expected), "identical": got == expected,
              "tokens_per_cycle": round(ours["avg_acceptance"], 2), "kernels": ours["kernels"]}
    result["ok"] = got == expected
    if got != expected:
        at = min(next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got)), len(steps) - 1)
        top2 = np.sort(np.array(steps[at][1].astype(mx.float32)))[-2:]
        bound = 0.0 if dtype == "float32" else NEAR_TIE_STEPS * float(step_at(
            dtype, float(mx.abs(logits[at].astype(mx.float32)).max())))
        result.update(first_difference=at, mlx_lm_top2_margin=float(top2[1] - top2[0]), near_tie_bound=bound)
        result["ok"] = bool(result["mlx_lm_top2_margin"] <= bound)
    return result


def hybrid_self_test(config: DDTreeConfig) -> dict[str, Any]:
    runs = [run(dtype, config) for dtype in DTYPES]
    return {"model": "tiny in-process qwen3_5 (hybrid)", "drafter": "oracle", "runs": runs,
            "ok": all(r["ok"] for r in runs)}
