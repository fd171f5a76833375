"""Tiny random-weight targets and drafters built in-process, and the plain mlx-lm greedy reference."""

from __future__ import annotations

import importlib

import mlx.core as mx
from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs
from ddtree_mlx.drafters import ScriptedDrafter
from mlx_lm.models import llama, qwen3, qwen3_5, qwen3_5_moe

generate_module = importlib.import_module("mlx_lm.generate")  # the package re-exports a function of that name

VOCAB = 128
HIDDEN = 64

_SHARED = dict(hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=4096)
_QWEN3_5 = dict(
    _SHARED, model_type="qwen3_5", num_hidden_layers=4, full_attention_interval=2, tie_word_embeddings=False,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
_DENSE = dict(_SHARED, num_hidden_layers=3, rope_theta=10000.0, tie_word_embeddings=True)


def make_target(family: str, seed: int = 0, **overrides):
    """A tiny float32 target of the given mlx-lm family with random weights (config fields overridable)."""
    mx.random.seed(seed)
    if family == "qwen3_5":
        model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(_QWEN3_5, **overrides)))
    elif family == "qwen3_5_moe":
        config = dict(_QWEN3_5, model_type="qwen3_5_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32)
        model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(config))
    elif family == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs.from_dict(dict(_DENSE, model_type="qwen3")))
    elif family == "llama":
        model = llama.Model(llama.ModelArgs.from_dict(dict(_DENSE, model_type="llama", tie_word_embeddings=False)))
    else:
        raise KeyError(family)
    if family in ("qwen3", "llama"):
        _stir(model)
    mx.eval(model.parameters())
    return model


def _stir(model) -> None:
    """Random dense models at init fall into repeating one token; stronger MLPs make them wander like text,
    so that a wrong context (a leaked sibling, a stale cache) changes the output."""
    for layer in model.model.layers:
        layer.mlp.down_proj.weight = layer.mlp.down_proj.weight * 6.0


def make_dflash(target, seed: int = 1, block_size: int = 8, layer_ids=(0, 2)) -> DFlashDraftModel:
    mx.random.seed(seed)
    args = DFlashDraftModelArgs(
        model_type="qwen3", hidden_size=HIDDEN, num_hidden_layers=1, intermediate_size=96, num_attention_heads=4,
        rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=4096,
        rope_theta=10000.0, head_dim=16, tie_word_embeddings=False, num_target_layers=len(target.layers),
        block_size=block_size, dflash_config={"target_layer_ids": list(layer_ids), "mask_token_id": VOCAB - 1},
    )
    model = DFlashDraftModel(args)
    mx.eval(model.parameters())
    return model


def greedy_reference(model, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Plain mlx-lm greedy decoding, stopping after (and including) a stop token."""
    out = []
    steps = generate_module.generate_step(
        mx.array(prompt), model, max_tokens=max_new_tokens, sampler=lambda logits: mx.argmax(logits, axis=-1)
    )
    for token, _ in steps:
        out.append(int(token))
        if out[-1] in stop_ids:
            break
    return out


def OracleDrafter(truth, block_size=8, seed=0, rank_weights=(0.55, 0.2, 0.1, 0.15)):
    """The scripted drafter with the tests' default ranks: true token 1st, 2nd, 3rd or absent."""
    return ScriptedDrafter(truth, block_size=block_size, rank_weights=rank_weights, seed=seed)
