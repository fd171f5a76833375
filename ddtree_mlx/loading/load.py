"""Load a target, its tokenizer and a drafter by name.

    target_model, tokenizer, drafter = load()                      # the embedded SmolLM2, its DFlash drafter
                                                                   # trained here with prompt lookup mixed in
    target_model, tokenizer, drafter = load(draft="dflash")        # ... that DFlash drafter alone
    target_model, tokenizer, drafter = load(draft="prompt-lookup") # ... prompt lookup alone
    target_model, tokenizer, drafter = load("Qwen/Qwen3.5-27B")    # its z-lab DFlash drafter, from REGISTRY
    target_model, tokenizer, drafter = load("path/to/model", draft="path/to/dflash")

Models and drafters are local directories or Hugging Face repo ids (downloaded with huggingface_hub).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from dflash_mlx.model import DFlashDraftModel, DFlashDraftModelArgs
from huggingface_hub import snapshot_download
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load_model, sharded_load

from ..config import DDTreeConfig
from ..drafting.dflash import DFlashDrafter, read_draft_vocab
from ..drafting.mixed import LookupDFlashDrafter
from ..drafting.prompt_lookup import PromptLookupDrafter
from .embedded import load_embedded
from .sharding import check_shardable, pipeline, shard

# z-lab's DFlash drafters, by the name of the target they were trained for.
REGISTRY = {
    "qwen3-4b": "z-lab/Qwen3-4B-DFlash-b16",
    "qwen3-8b": "z-lab/Qwen3-8B-DFlash-b16",
    "qwen3.5-4b": "z-lab/Qwen3.5-4B-DFlash",
    "qwen3.5-9b": "z-lab/Qwen3.5-9B-DFlash",
    "qwen3.5-27b": "z-lab/Qwen3.5-27B-DFlash",
    "qwen3.5-35b-a3b": "z-lab/Qwen3.5-35B-A3B-DFlash",
    "qwen3.5-397b-a17b": "z-lab/Qwen3.5-397B-A17B-DFlash",
    "qwen3.6-27b": "z-lab/Qwen3.6-27B-DFlash",
    "qwen3.6-35b-a3b": "z-lab/Qwen3.6-35B-A3B-DFlash",
}

# The embedded SmolLM2's drafter, trained on this project's CPU (its recipe: drafters/smollm2-135m/).
EMBEDDED_DRAFTER = Path(__file__).parents[1] / "smollm2_drafter"
LOOKUP = "+lookup"  # after a DFlash drafter's name in --draft: prompt lookup mixed into its drafts

# Conversions keep the target's name and add a precision: mlx-community/Qwen3.5-27B-4bit, ...-bf16, ...-8bit-DWQ.
_PRECISION_SUFFIX = re.compile(r"(-mlx)?-(\d+bit|bf16|fp16|mxfp\d|nvfp\d)(-\w+)?$", re.IGNORECASE)
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def load(model: str | None = None, draft: str | None = None, *, config: DDTreeConfig | None = None,
         sharding: str | None = None) -> tuple[nn.Module, Any, Any]:
    """`model`: a local directory or repo id; None is the embedded SmolLM2-135M-Instruct, converted once into
    `config.cache_dir` (default: DDTREE_CACHE_DIR or ~/.cache/ddtree-mlx). `draft`: None picks the target's DFlash drafter
    from REGISTRY, or prompt lookup when it has none (for the embedded model, its drafter EMBEDDED_DRAFTER with
    prompt lookup mixed in, "dflash+lookup"); "dflash" insists on the registered drafter;
    "prompt-lookup" forces prompt lookup; anything else is a DFlash checkpoint directory or repo id; "+lookup"
    after "dflash" or a checkpoint mixes prompt lookup into that drafter's drafts (LookupDFlashDrafter).
    Under mlx.launch, `sharding="tensor"` splits every layer over the processes (mlx-lm's sharded_load) and
    `sharding="pipeline"` gives each a run of whole layers; each rank reads only its own part of the weights."""
    if sharding not in (None, "tensor", "pipeline"):
        raise ValueError(f"unknown sharding {sharding!r}; use 'tensor' or 'pipeline'")
    config = config if config is not None else DDTreeConfig.from_env()
    drafter = load_drafter(model, draft)  # first: a wrong --draft fails before a large target loads
    if model is None:
        target_model, tokenizer = load_embedded(config.cache_path)
        if sharding:
            (shard if sharding == "tensor" else pipeline)(target_model)
    elif sharding == "pipeline":  # lazily: a rank reads only its own layers' weights
        target_model, tokenizer = mlx_lm.load(str(local_dir(model, "model")), lazy=True)
        pipeline(target_model)
    elif sharding:
        path, group = local_dir(model, "model"), mx.distributed.init()
        check_shardable(json.loads((path / "config.json").read_text()), group.size())  # before any weight loads
        target_model, tokenizer = sharded_load(str(path), tensor_group=group)
    else:
        target_model, tokenizer = mlx_lm.load(str(local_dir(model, "model")))
    return target_model, tokenizer, drafter


def load_drafter(model: str | None, draft: str | None) -> Any:
    # The embedded model's default mixes prompt lookup into its trained drafter's drafts: the fastest of the three
    # on code and math, close to the best elsewhere (BENCHMARKS.md, "The broad phase, and prompt lookup mixed in").
    if draft is None and model is None:
        draft = "dflash" + LOOKUP
    if draft is not None and draft.endswith(LOOKUP):  # a DFlash drafter with prompt lookup mixed in
        dflash = load_drafter(model, draft[: -len(LOOKUP)] or "dflash")
        if not isinstance(dflash, DFlashDrafter):
            raise ValueError(f"--draft {draft}: '{LOOKUP}' goes after a DFlash drafter ('dflash{LOOKUP}' or "
                             f"'PATH{LOOKUP}'); prompt lookup alone is --draft prompt-lookup")
        return LookupDFlashDrafter(dflash)
    if draft == "prompt-lookup":
        return PromptLookupDrafter()
    if draft is None or draft == "dflash":
        registered = registered_drafter(model)
        if registered is not None:
            return dflash_drafter(registered)
        if draft is None:
            return PromptLookupDrafter()  # no trained drafter is known; lookup needs none
        raise ValueError(
            f"no DFlash drafter is known for {model or 'the embedded SmolLM2'}; pass one with --draft PATH_OR_REPO "
            "(draft= in Python), or use --draft prompt-lookup"
        )
    return dflash_drafter(draft)


def dflash_drafter(ref: str) -> DFlashDrafter:
    """A DFlash checkpoint as a drafter, proposing from its draft vocabulary when it has one."""
    return DFlashDrafter(load_dflash(ref), read_draft_vocab(local_dir(ref, "draft")))


def registered_drafter(model: str | None) -> str | None:
    if model is None:
        return str(EMBEDDED_DRAFTER)
    name = _PRECISION_SUFFIX.sub("", Path(model.rstrip("/")).name)
    return REGISTRY.get(name.lower())


def load_dflash(ref: str) -> DFlashDraftModel:
    """A z-lab style DFlash checkpoint (config.json + model*.safetensors), built with dflash-mlx's model class."""
    path = local_dir(ref, "draft")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; --draft takes a DFlash checkpoint directory "
                         "(config.json + model*.safetensors)")
    overrides = dflash_args(json.loads(config_file.read_text()), ref)
    model, _ = load_model(path, model_config=overrides,
                          get_model_classes=lambda config: (DFlashDraftModel, DFlashDraftModelArgs))
    return model


def dflash_args(config: dict[str, Any], ref: str) -> dict[str, Any]:
    """What DFlashDraftModelArgs needs that z-lab configs put elsewhere: `rope_theta` (and scaling) under
    `rope_parameters` (transformers 5), `block_size`, `target_layer_ids` and `mask_token_id` at the top level
    or under `dflash_config`."""
    architectures = config.get("architectures") or ["DFlashDraftModel"]
    if architectures != ["DFlashDraftModel"]:
        raise ValueError(f"{ref} is a {', '.join(architectures)} checkpoint; --draft takes a DFlashDraftModel "
                         "checkpoint (z-lab's *-DFlash repos), or prompt-lookup")
    dflash = dict(config.get("dflash_config") or {})
    for key in ("target_layer_ids", "mask_token_id"):  # the model reads these from dflash_config only
        if key in config:
            dflash.setdefault(key, config[key])
    rope = config.get("rope_parameters") or {}
    overrides: dict[str, Any] = {"dflash_config": dflash}
    if "block_size" not in config and "block_size" in dflash:
        overrides["block_size"] = dflash["block_size"]
    if "rope_theta" not in config and "rope_theta" in rope:
        overrides["rope_theta"] = rope["rope_theta"]
    if config.get("rope_scaling") is None and rope.get("rope_type", rope.get("type", "default")) != "default":
        overrides["rope_scaling"] = rope
    required = [f.name for f in dataclasses.fields(DFlashDraftModelArgs)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in config and name not in overrides]
    if missing:
        raise ValueError(f"the DFlash config of {ref} lacks {', '.join(missing)}; is it a DFlash drafter checkpoint?")
    return overrides


def local_dir(ref: str, flag: str) -> Path:
    """A local directory as is; a repo id downloaded (or found in the Hugging Face cache)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.fullmatch(ref):
        raise ValueError(f"--{flag} {ref!r} is neither an existing directory nor a Hugging Face repo id (owner/name)")
    try:
        return Path(snapshot_download(ref, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as err:  # offline, missing repo, gated repo: the hub raises a different type for each
        raise ValueError(
            f"cannot fetch {ref!r} from the Hugging Face hub ({type(err).__name__}: {err}). If the hub is "
            f"unreachable from here, download the repo where it is (hf download {ref} --local-dir DIR), "
            f"copy DIR over and pass it: --{flag} DIR"
        ) from err


def encode_prompt(tokenizer: Any, prompt: str | list[dict], chat: bool = True,
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids for a text prompt or a list of chat messages, as mlx-lm's generate encodes them: the chat
    template renders text whose special tokens are already in place, so encoding adds none."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if chat and has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # templates reject message sequences they do not support by raising
            raise ValueError(f"the chat template rejected the messages: {error}") from None
        return list(tokenizer.encode(text, add_special_tokens=False))
    if not isinstance(prompt, str):
        raise ValueError("this model's tokenizer has no chat template, so chat messages cannot be encoded; send a "
                         "plain prompt (/v1/completions)")
    return list(tokenizer.encode(prompt))


def has_chat_template(tokenizer: Any) -> bool:
    # mlx-lm's TokenizerWrapper also counts its own renderers; a bare Hugging Face tokenizer has chat_template.
    flag = getattr(tokenizer, "has_chat_template", None)
    return bool(flag) if flag is not None else getattr(tokenizer, "chat_template", None) is not None


def stop_token_ids(tokenizer: Any, model_path: str | Path | None = None) -> list[int]:
    """The tokenizer's end-of-sequence ids, with generation_config.json's eos_token_id (an int or a list)."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    if model_path is not None and (config_file := Path(model_path) / "generation_config.json").is_file():
        eos = json.loads(config_file.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or ())
    return sorted(int(i) for i in ids)
