"""The drafter a run trains: its shape, a new one for a target (dflash-mlx's DFlashDraftModel, sharing the
target's embedding and LM head), the draft vocabulary a --vocab data run trains over, and its export in z-lab's
layout."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from dflash_mlx.model import (
    DFlashDraftModel,
    DFlashDraftModelArgs,
    build_target_layer_ids,
)
from mlx.utils import tree_flatten

from ..drafting.dflash import DRAFT_VOCAB
from ..models.adapter import TargetAdapter
from .data import Example


@dataclass(frozen=True)
class DrafterShape:
    """The drafter's architecture; the rest (width, heads, vocabulary) comes from the target's args."""

    block_size: int = 16
    layers: int = 1
    taps: int = 5
    mask_token_id: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size {self.block_size} leaves no draft positions; use 2 or more (8 or 16)")
        if self.layers < 1 or self.taps < 1:
            raise ValueError("a drafter needs layers >= 1 and taps >= 1")


def default_gamma(block_size: int) -> float:
    return 7.0 if block_size >= 16 else 4.0 if block_size >= 8 else block_size / 2


def check_shape(target: TargetAdapter, shape: DrafterShape) -> None:
    """What depends on the target fails here, before any training."""
    if shape.taps > len(target.layers):
        raise ValueError(f"taps {shape.taps} > the target's {len(target.layers)} layers; tap fewer layers")
    if not 0 <= shape.mask_token_id < target.vocab_size:
        raise ValueError(f"mask_token_id {shape.mask_token_id} is outside the target vocabulary "
                         f"[0, {target.vocab_size})")


def new_drafter(target: TargetAdapter, shape: DrafterShape, seed: int = 0) -> DFlashDraftModel:
    """A freshly initialised drafter of the target's width, float32."""
    check_shape(target, shape)
    args = target.args
    heads = args.num_attention_heads
    draft_args = DFlashDraftModelArgs(
        model_type="qwen3", hidden_size=args.hidden_size, num_hidden_layers=shape.layers,
        intermediate_size=args.intermediate_size, num_attention_heads=heads, rms_norm_eps=args.rms_norm_eps,
        vocab_size=target.vocab_size, num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=getattr(args, "max_position_embeddings", None) or 32768,
        rope_theta=getattr(args, "rope_theta", None) or 10000.0,
        head_dim=getattr(args, "head_dim", None) or args.hidden_size // heads, tie_word_embeddings=False,
        num_target_layers=len(target.layers), block_size=shape.block_size,
        dflash_config={"target_layer_ids": sorted(set(build_target_layer_ids(len(target.layers), shape.taps))),
                       "mask_token_id": shape.mask_token_id},
    )
    mx.random.seed(seed)
    model = DFlashDraftModel(draft_args)
    mx.eval(model.parameters())
    return model


def choose_mask_token(tokenizer: Any, examples: list[Example]) -> int:
    """The tokenizer's mask token, or else (SmolLM2 has none) the highest special or added token id that is no
    stop token and never occurs in the training data (SmolLM2: 16, `<empty_output>`): its frozen embedding is a
    fixed vector the drafter learns to read as "to be predicted"."""
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(tokenizer.get_added_vocab().values())
    seen = {t for example in examples for t in example.prompt + example.answer}
    unused = sorted(special - seen - set(getattr(tokenizer, "eos_token_ids", None) or []))
    if not unused:
        raise ValueError("the tokenizer has no mask token and every special token occurs in the data; pass "
                         "mask_token_id explicitly (an id the target never emits)")
    return unused[-1]


@dataclass(frozen=True)
class TrainVocab:
    """Part of the vocabulary for the training softmax: the LM head's rows for `ids` and each token's index among
    them (labels are remapped through it)."""

    ids: list[int]
    rows: mx.array  # [k, hidden] float32, frozen
    index: mx.array  # [V] int32, -1 for ids outside

    @classmethod
    def of(cls, target: TargetAdapter, examples: list[Example], size: int = 0) -> TrainVocab:
        if size:  # ranked over answer tokens, the only labels (uncapped, prompt tokens stay: the shipped recipe)
            counts = Counter(t for e in examples for t in e.answer)
            ids = sorted(t for t, _ in counts.most_common(size))
        else:
            ids = sorted({t for e in examples for t in e.prompt + e.answer})
        index = np.full(target.vocab_size, -1, np.int32)
        index[ids] = np.arange(len(ids), dtype=np.int32)
        rows = target.head_rows(mx.array(ids)).astype(mx.float32)
        mx.eval(rows)
        return cls(ids, rows, mx.array(index))


def start_from(drafter: DFlashDraftModel, exported: Path) -> None:
    """Initialise from an exported drafter of the same shape (a z-lab checkpoint or an earlier run's export): the
    run then fine-tunes it. A checkpoint in out_dir, when there is one, still wins (resume)."""
    config_file = exported / "config.json"
    if not config_file.exists():
        raise ValueError(f"--init {exported}: no config.json there; give a drafter directory (an export)")
    config = json.loads(config_file.read_text())
    mine = {"block_size": drafter.block_size, "num_hidden_layers": len(drafter.layers),
            "hidden_size": drafter.args.hidden_size, "dflash_config": drafter.args.dflash_config}
    theirs = {key: config.get(key) for key in mine}
    if theirs != mine:
        raise ValueError(f"--init {exported} has shape {theirs}, this run {mine}; pass matching --block-size, "
                         "--layers, --taps and --mask-token-id")
    weights = mx.load(str(exported / "model.safetensors"))
    drafter.load_weights([(name, value.astype(mx.float32)) for name, value in weights.items()])
    mx.eval(drafter.parameters())


def export(drafter: DFlashDraftModel, out_dir: str | Path, dtype: mx.Dtype = mx.bfloat16,
           vocab: list[int] | None = None) -> Path:
    """z-lab's checkpoint layout: config.json (with block_size, num_target_layers and
    dflash_config: {target_layer_ids, mask_token_id}) and model.safetensors, loadable by dflash-mlx's
    DFlashDraftModel and by ddtree_mlx.load(..., draft=out_dir). `vocab` (trained with --vocab data): the ids it
    was trained to propose, in draft_vocab.json beside them (other loaders ignore the file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab is not None:
        (out / DRAFT_VOCAB).write_text(json.dumps({"token_ids": sorted(vocab)}))
    config = {key: value for key, value in asdict(drafter.args).items() if key not in ("layer_types",)}
    config["architectures"] = ["DFlashDraftModel"]
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, "float32")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    weights = {name: value.astype(dtype) for name, value in tree_flatten(drafter.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out
