"""Tiny random-weight targets and drafters built in-process, and the plain mlx-lm greedy reference."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs
from mlx_lm.models import llama, qwen3, qwen3_5, qwen3_5_moe
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ddtree_mlx.drafting.oracle import ScriptedDrafter

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


FORMS = ("f32", "bf16", "q8", "q4", "mixed")  # the model's own dtype / quantization, as Mac users run them


def make_target(family: str, seed: int = 0, form: str = "f32", logit_scale: float = 4.0, **overrides):
    """A tiny target of the given mlx-lm family with random weights (config fields overridable), in one of
    FORMS: float32, bfloat16, 8- or 4-bit weights (mlx's nn.quantize, group size 32, which divides every tiny
    dimension) or mixed per-layer bits (8-bit embedding and first layer, 4-bit elsewhere). The final norm is
    scaled by `logit_scale`: random models at init are nearly uniform, and sharper logits put the median top-2
    margin well above NEAR_TIE (asserted), so that a real divergence cannot pass for a near-tie."""
    mx.random.seed(seed)
    if family == "qwen3_5":
        model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(_QWEN3_5, **overrides)))
    elif family == "qwen3_5_moe":
        config = dict(_QWEN3_5, model_type="qwen3_5_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=32)
        model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict(dict(config, **overrides)))
    elif family == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs.from_dict(dict(_DENSE, model_type="qwen3", **overrides)))
    elif family == "llama":
        config = dict(_DENSE, model_type="llama", tie_word_embeddings=False)
        model = llama.Model(llama.ModelArgs.from_dict(dict(config, **overrides)))
    else:
        raise KeyError(family)
    if family in ("qwen3", "llama"):
        _stir(model)
    text = getattr(model, "language_model", model)
    text.model.norm.weight = text.model.norm.weight * logit_scale
    _convert(model, form)
    mx.eval(model.parameters())
    return model


def _convert(model, form: str) -> None:
    if form == "bf16":
        model.set_dtype(mx.bfloat16)
    elif form in ("q8", "q4"):
        nn.quantize(model, group_size=32, bits=int(form[1]))
    elif form == "mixed":
        def bits(path, module):
            wide = path.endswith("embed_tokens") or ".layers.0." in f".{path}."
            return hasattr(module, "to_quantized") and {"group_size": 32, "bits": 8 if wide else 4}

        nn.quantize(model, class_predicate=bits)
    elif form != "f32":
        raise KeyError(form)


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


NEAR_TIE = 2.0**-5
"""The one bound of the lossless standard, in absolute log-prob units: about one bf16 ulp of a logit of
magnitude 4-8. Where rounding legitimately differs (bf16, quantized weights), our output may leave mlx-lm's only
at a token whose top-2 margin in mlx-lm's own log-probs is below it."""


@dataclass
class Reference:
    """mlx-lm's own greedy decoding: its tokens and, at each, the top-2 margin of its own log-probs."""

    tokens: list[int]
    margins: list[float]


def mlx_lm_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids=(), **step_options) -> Reference:
    """Plain mlx-lm greedy decoding (generate_step's default sampler, with its `step_options` such as kv_bits),
    stopping after a stop token."""
    tokens, margins = [], []
    for token, log_probs in generate_module.generate_step(mx.array(prompt), model, max_tokens=max_new_tokens,
                                                          **step_options):
        top2 = mx.sort(log_probs.astype(mx.float32))[-2:]
        tokens.append(int(token))
        margins.append((top2[1] - top2[0]).item())
        if tokens[-1] in stop_ids:
            break
    return Reference(tokens, margins)


def greedy_reference(model, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    return mlx_lm_greedy(model, prompt, max_new_tokens, stop_ids).tokens


COMPARED: list[tuple[str, int | None, float | None]] = []  # (what ran, first divergence, margin there)


def assert_lossless(got: list[int], reference: Reference, exact: bool, label: str = "") -> None:
    """float32 (exact): token for token. Otherwise identical up to a first difference, which must be a near-tie
    of mlx-lm's own log-probs (margin < NEAR_TIE); every comparison is recorded for the run's summary."""
    want = reference.tokens
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None:
        assert len(got) == len(want), f"{label}: {len(got)} tokens, mlx-lm gave {len(want)}"
        COMPARED.append((label, None, None))
        return
    margin = reference.margins[first]
    detail = f"{label}: token {first} is {got[first]}, mlx-lm's is {want[first]} (its top-2 margin {margin:.4f})"
    assert not exact, f"{detail}; a float32 target must match exactly"
    assert margin < NEAR_TIE, f"{detail} is not a near-tie (bound {NEAR_TIE})"
    COMPARED.append((label, first, margin))


class FakeClock:
    """A clock for the engine instead of time.perf_counter (`install` puts it where cycles and verifies are timed):
    it moves only by what a test charges (`advance`, e.g. per target step), plus a microsecond per reading so that
    no interval is zero. What DDTREE_TREE_BUDGET=auto decides from the cycles' times is then the same on every run,
    whatever else the machine is doing."""

    TICK = 1e-6

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += self.TICK
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):  # anything else of the time module stays real
        import time

        return getattr(time, name)

    def install(self, monkeypatch) -> "FakeClock":
        from ddtree_mlx.engine import session
        from ddtree_mlx.models import verify

        for module in (session, verify):
            monkeypatch.setattr(module, "time", self)
        return self


STEP, NODE = 0.01, 0.0006  # a target step, and what each more tree node adds: the tests' fixed curve (conftest)


def target_time(monkeypatch, model) -> FakeClock:
    """A fake clock on which every target call takes what the tests' fixed calibration curve says it does."""
    from ddtree_mlx.models.registry import adapter_for

    clock = FakeClock().install(monkeypatch)
    adapter = type(adapter_for(model))
    step, verify = adapter.step, adapter.verify

    def timed_step(*args, **kwargs):
        clock.advance(STEP)
        return step(*args, **kwargs)

    def timed_verify(self, tree, *args, **kwargs):
        if len(tree) > 1:  # a one-node tree is a step
            clock.advance(STEP + NODE * (len(tree) - 1))
        return verify(self, tree, *args, **kwargs)

    monkeypatch.setattr(adapter, "step", timed_step)
    monkeypatch.setattr(adapter, "verify", timed_verify)
    return clock


def OracleDrafter(truth, block_size=8, seed=0, rank_weights=(0.55, 0.2, 0.1, 0.15)):
    """The scripted drafter with the tests' default ranks: true token 1st, 2nd, 3rd or absent."""
    return ScriptedDrafter(truth, block_size=block_size, rank_weights=rank_weights, seed=seed)


# A tokenizer for the tiny models: one word per id of the 128-token vocabulary (some non-ASCII, so JSON escaping is
# exercised) and a chat template.
SPECIAL = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = SPECIAL + [f"w{i}" if i % 7 else f"ж{i}" for i in range(len(SPECIAL), 128)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat_template=TEMPLATE):
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:], chat_template=chat_template,
                                   clean_up_tokenization_spaces=False)
    return TokenizerWrapper(fast)
