"""Loading drafters by name and from z-lab style checkpoints, without the network."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import HIDDEN, VOCAB, greedy_reference, make_dflash, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.drafting.dflash import SINK, DFlashDrafter
from ddtree_mlx.drafting.prompt_lookup import PromptLookupDrafter
from ddtree_mlx.loading import load as loading
from ddtree_mlx.loading.load import (
    EMBEDDED_DRAFTER,
    load_dflash,
    load_drafter,
    registered_drafter,
    stop_token_ids,
)
from ddtree_mlx.models.registry import adapter_for

TARGET = make_target("qwen3")

# As z-lab ships them: transformers 5 moved rope_theta under rope_parameters; older ones keep it at the top.
ZLAB_CONFIG = {
    "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "model_type": "qwen3", "dtype": "float32", "hidden_act": "silu", "attention_bias": False,
    "hidden_size": HIDDEN, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "num_target_layers": 3, "block_size": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "dflash_config": {"mask_token_id": VOCAB - 1, "target_layer_ids": [0, 2]},
}
OLD_STYLE = dict({k: v for k, v in ZLAB_CONFIG.items() if k != "rope_parameters"}, rope_theta=10000.0,
                 mask_token_id=VOCAB - 1, dflash_config={"target_layer_ids": [0, 2]})


def write_checkpoint(path, config, model):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


@pytest.mark.parametrize("config", [ZLAB_CONFIG, OLD_STYLE], ids=["rope_parameters", "top_level"])
def test_dflash_checkpoint_round_trip(tmp_path, config):
    original = make_dflash(TARGET)
    loaded = load_dflash(str(write_checkpoint(tmp_path / "drafter", config, original)))
    assert (loaded.block_size, loaded.target_layer_ids, loaded.mask_token_id) == (8, [0, 2], VOCAB - 1)
    assert loaded.args.rope_theta == 10000.0
    expected = dict(tree_flatten(original.parameters()))
    for name, value in tree_flatten(loaded.parameters()):
        np.testing.assert_array_equal(np.array(value), np.array(expected[name]))
    prompt = [3, 17, 42, 9, 100, 5]
    result = generate_ddtree_once(target_model=TARGET, draft_model=loaded, prompt_tokens=prompt,
                                  max_new_tokens=16, stop_token_ids=[], tree_budget=4)
    assert result["generated_token_ids"] == greedy_reference(TARGET, prompt, 16)


def test_a_bf16_checkpoint_drafts_in_the_targets_dtype(tmp_path):
    """A bf16 export beside a float32 target computes in float32 (no per-draft weight conversion, BLAS on a CPU),
    with the same values: bf16 weights are exact in float32."""
    original = make_dflash(TARGET)
    original.set_dtype(mx.bfloat16)
    drafter = load_drafter("any/model", str(write_checkpoint(tmp_path / "drafter", ZLAB_CONFIG, original)))
    assert drafter.model.fc.weight.dtype == mx.bfloat16
    drafter.reset(adapter_for(TARGET), [3, 17])
    expected = dict(tree_flatten(original.parameters()))
    for name, value in tree_flatten(drafter.model.parameters()):
        assert value.dtype == mx.float32
        np.testing.assert_array_equal(np.array(value), np.array(expected[name].astype(mx.float32)))


def test_a_drafter_reads_its_window_of_the_context_as_dflash_mlx_places_it():
    """DDTREE_DRAFT_WINDOW: the rows a window drops are never projected, and those it keeps sit where dflash-mlx's
    own windowed cache puts them after projecting every row (the reference): the same drafts chunk by chunk, a
    first read longer than the sink and window together, then reads shorter and longer than the window. (To float32
    rounding: OpenBLAS rounds a row of a 16-row product apart from the same row of a 100-row one; a row kept in
    the wrong place, or one the window drops, moves the log-probs by far more.)"""
    target = adapter_for(TARGET)
    fast, reference = DFlashDrafter(make_dflash(TARGET)), DFlashDrafter(make_dflash(TARGET))
    for drafter in (fast, reference):
        drafter.configure(DDTreeConfig(draft_window=16))
        drafter.reset(target, [])
    reference.within_window = lambda hidden: hidden  # dflash-mlx's cache drops what it does not keep itself
    projected = []
    project = fast.model.project_target_hidden
    fast.model.project_target_hidden = lambda rows: projected.append(rows.shape[1]) or project(rows)
    hidden = mx.random.normal((300, len(fast.target_layer_ids) * HIDDEN), key=mx.random.key(0))
    for start, end in [(0, 100), (100, 103), (103, 250), (250, 251), (251, 300)]:
        np.testing.assert_allclose(np.array(fast.log_probs(5, hidden[start:end])),
                                   np.array(reference.log_probs(5, hidden[start:end])), rtol=1e-5, atol=1e-5)
    assert projected == [SINK, 16, 3, 16, 1, 16]
    assert fast.cache[0].offset == 300 and fast.cache[0].keys.shape[2] == SINK + 16


@pytest.mark.parametrize("window", [0, 4])
def test_any_window_keeps_generation_lossless(window):
    """The window changes what the drafter sees, never the output; 0 reads the whole context."""
    prompt = [(7 * i + 3) % VOCAB for i in range(90)]
    result = generate_ddtree_once(target_model=TARGET, draft_model=make_dflash(TARGET), prompt_tokens=prompt,
                                  max_new_tokens=24, stop_token_ids=[], tree_budget=6,
                                  config=DDTreeConfig(draft_window=window))
    assert result["generated_token_ids"] == greedy_reference(TARGET, prompt, 24)


def test_a_draft_vocabulary_bounds_what_is_proposed(tmp_path):
    """draft_vocab.json beside the weights (a drafter trained over its data's tokens): the drafter proposes only
    those ids, its dense rows agree with its candidates, generation stays mlx-lm's greedy output."""
    path = write_checkpoint(tmp_path / "drafter", ZLAB_CONFIG, make_dflash(TARGET))
    allowed = list(range(1, VOCAB, 3))
    (path / "draft_vocab.json").write_text(json.dumps({"token_ids": allowed}))
    prompt = [3, 17, 42, 9, 100, 5]
    target = adapter_for(TARGET)
    dense_one, sparse_one = load_drafter("any/model", str(path)), load_drafter("any/model", str(path))
    _, hidden = target.forward(mx.array(prompt), target.make_cache(), dense_one.target_layer_ids)
    for one in (dense_one, sparse_one):
        one.reset(target, prompt)
    dense = np.array(dense_one.draft(prompt[-1], prompt, hidden))
    found = sparse_one.candidates(prompt[-1], prompt, hidden, 8)
    np.testing.assert_allclose(np.take_along_axis(dense, np.array(found.tokens), 1), np.array(found.log_probs),
                               rtol=1e-5, atol=1e-5)
    assert np.isinf(np.delete(dense, allowed, axis=1)).all() and np.isfinite(dense[:, allowed]).all()

    drafter, proposed = load_drafter("any/model", str(path)), []
    candidates = drafter.candidates
    drafter.candidates = lambda *args: proposed.append(candidates(*args)) or proposed[-1]
    result = generate_ddtree_once(target_model=TARGET, draft_model=drafter, prompt_tokens=prompt,
                                  max_new_tokens=16, stop_token_ids=[], tree_budget=8)
    assert result["generated_token_ids"] == greedy_reference(TARGET, prompt, 16)
    assert proposed and set(np.concatenate([np.array(c.tokens) for c in proposed]).ravel()) <= set(allowed)
    (path / "draft_vocab.json").write_text(json.dumps({"ids": allowed}))
    with pytest.raises(ValueError, match="is not a draft vocabulary"):
        load_drafter("any/model", str(path))


def test_checkpoint_of_another_architecture(tmp_path):
    config = dict(ZLAB_CONFIG, architectures=["DFlash2DraftModel"])
    with pytest.raises(ValueError, match="DFlash2DraftModel checkpoint; --draft takes a DFlashDraftModel"):
        load_dflash(str(write_checkpoint(tmp_path / "drafter", config, make_dflash(TARGET))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_dflash(str(tmp_path / "empty"))


def test_registry_names():
    assert registered_drafter("Qwen/Qwen3.5-27B") == "z-lab/Qwen3.5-27B-DFlash"
    assert registered_drafter("mlx-community/Qwen3.5-27B-4bit") == "z-lab/Qwen3.5-27B-DFlash"
    assert registered_drafter("/models/Qwen3.6-35B-A3B-8bit-DWQ/") == "z-lab/Qwen3.6-35B-A3B-DFlash"
    assert registered_drafter("mlx-community/Llama-3.2-1B-Instruct-4bit") is None
    assert Path(registered_drafter(None)) == EMBEDDED_DRAFTER  # the embedded SmolLM2's, shipped in the package


def test_drafter_choice_without_a_registered_drafter():
    assert isinstance(load_drafter("someone/unknown-model", None), PromptLookupDrafter)
    assert isinstance(load_drafter("Qwen/Qwen3.5-27B", "prompt-lookup"), PromptLookupDrafter)
    with pytest.raises(ValueError, match="no DFlash drafter is known for someone/unknown-model.*--draft"):
        load_drafter("someone/unknown-model", "dflash")
    with pytest.raises(ValueError, match="neither an existing directory nor a Hugging Face repo id"):
        load_drafter(None, "./no/such/dir")


def test_unreachable_hub_says_how_to_pass_a_path(monkeypatch):
    def offline(repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(loading, "snapshot_download", offline)
    with pytest.raises(ValueError, match="z-lab/Qwen3.5-27B-DFlash.*unreachable.*--draft DIR"):
        load_drafter("Qwen/Qwen3.5-27B", None)


def test_stop_ids_from_generation_config(tmp_path):
    tokenizer = SimpleNamespace(eos_token_ids={2}, eos_token_id=2)
    assert stop_token_ids(tokenizer) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 11]}))
    assert stop_token_ids(tokenizer, tmp_path) == [2, 7, 11]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert stop_token_ids(SimpleNamespace(eos_token_id=None), str(tmp_path)) == [5]
