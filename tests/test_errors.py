"""Bad input: a ValueError that names the fix, raised before any model work."""

import pytest
from mlx_lm.models.cache import RotatingKVCache
from tiny import OracleDrafter, make_dflash, make_target

from ddtree_mlx import DDTreeConfig, generate_ddtree_once, stream_generate
from ddtree_mlx.config import parse_bool

TARGET = make_target("qwen3_5")


def start(**kwargs):
    args = dict(target_model=TARGET, draft_model=OracleDrafter([1, 2, 3]), prompt_tokens=[1, 2, 3],
                max_new_tokens=4, stop_token_ids=[])
    args.update(kwargs)
    return stream_generate(**args)  # errors must come from the call itself, before iteration


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt_tokens": []}, "prompt_tokens is empty"),
    ({"prompt_tokens": [1, 500]}, "outside the target vocabulary"),
    ({"prompt_tokens": [-1]}, "outside the target vocabulary"),
    ({"prompt_tokens": [[1, 2], [3, 4]]}, "batch size 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
    ({"tree_budget": 0}, "tree_budget must be 'auto' or an integer >= 1"),
    ({"tree_budget": -2}, "tree_budget must be 'auto' or an integer >= 1"),
    ({"method": "beam"}, "unknown method"),
    ({"draft_model": None}, "needs a draft_model"),
    ({"draft_model": object()}, "drafter protocol"),
    ({"stop_token_ids": [10**9]}, r"stop_token_ids \[1000000000\] are not token ids"),
    ({"stop_token_ids": ["abc"]}, "are not token ids of this model"),
    ({"stop_token_ids": "abc"}, "must be a list of token ids"),
    ({"stop_token_ids": 5}, "must be a list of token ids"),
    ({"seed": -1, "temperature": 1.0}, r"seed must be an integer in \[0, 2\*\*64\)"),
    ({"seed": 2**70, "temperature": 1.0}, "seed must be an integer in"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a number >= 0"),
    ({"config": {"budget": 4}}, "config must be a DDTreeConfig"),
    ({"prompt_tokens": [1] * 4096}, "the prompt has 4096 tokens and the model's context is 4096"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        start(**kwargs)


def test_drafter_that_does_not_fit_the_target():
    wrong_layers = make_dflash(TARGET, layer_ids=(0, 9))
    with pytest.raises(ValueError, match="target_layer_ids .* outside"):
        start(draft_model=wrong_layers)
    other = make_target("qwen3_5", vocab_size=64)  # a target with another vocabulary
    with pytest.raises(ValueError, match="vocab size 128 does not match the target's 64"):
        start(target_model=other, draft_model=make_dflash(TARGET), prompt_tokens=[1])
    wider = make_target("qwen3_5", hidden_size=96)
    with pytest.raises(ValueError, match="hidden size 64 does not match the target's 96"):
        start(target_model=wider, draft_model=make_dflash(TARGET), prompt_tokens=[1])


@pytest.mark.parametrize("form", ["q4", "q8", "mixed"])
def test_quantized_target_sizes_come_from_its_args(form):
    """A quantized embedding's weight is packed (hidden * bits / 32 columns): sizes must not be read from it."""
    from ddtree_mlx.models.registry import adapter_for

    target = adapter_for(make_target("qwen3_5", form=form))
    assert (target.hidden_size, target.vocab_size) == (64, 128)
    assert target.inner.embed_tokens.weight.shape[1] != 64  # really packed, or the test proves nothing
    list(start(target_model=target.model, draft_model=make_dflash(TARGET), max_new_tokens=2))


def test_sequence_length_dependent_rope_is_refused():
    """Dynamic NTK rescales RoPE's base by the sequence length, so a node's rotation is not a function of its
    position alone; the position-only variants (here llama3) are accepted."""
    dynamic = make_target("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported RoPE DynamicNTKScalingRoPE"):
        start(target_model=dynamic)
    llama3 = make_target("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    list(start(target_model=llama3, method="ar"))


def test_unsupported_family_and_cache():
    with pytest.raises(ValueError, match="unsupported target model type 'gpt2'"):
        start(target_model=type("M", (), {"model_type": "gpt2"})())
    from ddtree_mlx.models.registry import adapter_for
    with pytest.raises(ValueError, match="unsupported KV cache RotatingKVCache"):
        adapter_for(TARGET).check_cache([RotatingKVCache(max_size=8)])


def test_env_parsing_is_strict(monkeypatch):
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "abc")
    with pytest.raises(ValueError, match="DDTREE_TREE_BUDGET='abc' is not a tree budget"):
        start()
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "12")
    monkeypatch.setenv("DDTREE_EXACT_COMMIT", "maybe")
    with pytest.raises(ValueError, match="DDTREE_EXACT_COMMIT='maybe' is not a boolean"):
        DDTreeConfig.from_env()
    monkeypatch.setenv("DDTREE_EXACT_COMMIT", "on")
    monkeypatch.setenv("DDTREE_PREFILL_STEP_SIZE", "0")
    with pytest.raises(ValueError, match="DDTREE_PREFILL_STEP_SIZE=0 is too small"):
        DDTreeConfig.from_env()
    monkeypatch.setenv("DDTREE_PREFILL_STEP_SIZE", "512")
    monkeypatch.setenv("DDTREE_DRAFT_WINDOW", "-1")
    with pytest.raises(ValueError, match="DDTREE_DRAFT_WINDOW=-1 is too small; set it to a whole number >= 0"):
        DDTreeConfig.from_env()
    monkeypatch.setenv("DDTREE_DRAFT_WINDOW", "0")
    monkeypatch.setenv("DDTREE_EXACT_TREE_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="DDTREE_EXACT_TREE_ATTENTION='sometimes' is not understood; use auto, 1/0"):
        DDTreeConfig.from_env()
    monkeypatch.setenv("DDTREE_EXACT_TREE_ATTENTION", "Off")
    config = DDTreeConfig.from_env()
    assert config.tree_budget == 12 and config.exact_commit and config.prefill_step_size == 512 and config.draft_window == 0
    assert config.exact_tree_attention is False and DDTreeConfig().exact_tree_attention == "auto"
    monkeypatch.setenv("DDTREE_EXACT_TREE_ATTENTION", "AUTO")
    assert DDTreeConfig.from_env().exact_tree_attention == "auto"
    with pytest.raises(ValueError, match="exact_tree_attention must be 'auto', True or False, got 'always'"):
        DDTreeConfig(exact_tree_attention="always").validate()
    assert DDTreeConfig.from_env(tree_budget=3).tree_budget == 3  # explicit arguments win


@pytest.mark.parametrize("text,value", [("off", False), ("0", False), ("false", False), ("No", False),
                                        ("on", True), ("1", True), ("TRUE", True), ("yes", True)])
def test_bool_words(text, value):
    assert parse_bool("X", text) is value


def test_env_budget_is_read_at_call_time(monkeypatch):
    truth = [1, 2, 3]
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "1")
    one = generate_ddtree_once(target_model=TARGET, draft_model=OracleDrafter(truth), prompt_tokens=truth,
                               max_new_tokens=2, stop_token_ids=[])
    assert one["cycles"] >= 1
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "x")
    with pytest.raises(ValueError):
        generate_ddtree_once(target_model=TARGET, draft_model=OracleDrafter(truth), prompt_tokens=truth,
                             max_new_tokens=2, stop_token_ids=[])


def test_readme_documents_every_setting():
    from dataclasses import fields
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for f in fields(DDTreeConfig):
        assert f"`DDTREE_{f.name.upper()}`" in readme


def test_budget_setting(monkeypatch):
    default = DDTreeConfig()  # auto sizes trees up to DDTREE_MAX_TREE_BUDGET, whatever its default
    assert DDTreeConfig.from_env().tree_budget == "auto" and default.tree_cap == default.max_tree_budget
    assert DDTreeConfig(max_tree_budget=5).tree_cap == 5
    for bad in ("cheap", "0", "-3", "8.5"):
        monkeypatch.setenv("DDTREE_TREE_BUDGET", bad)
        with pytest.raises(ValueError, match=f"DDTREE_TREE_BUDGET='{bad}' is not a tree budget; set it to 'auto'"):
            DDTreeConfig.from_env()
    monkeypatch.setenv("DDTREE_TREE_BUDGET", " AUTO ")
    assert DDTreeConfig.from_env().tree_budget == "auto"
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "12")
    assert DDTreeConfig.from_env().tree_budget == 12 and DDTreeConfig.from_env().tree_cap == 12
    assert DDTreeConfig.from_env(tree_budget="auto").tree_budget == "auto"  # an explicit argument wins over the variable
    monkeypatch.setenv("DDTREE_MAX_TREE_BUDGET", "0")
    with pytest.raises(ValueError, match="DDTREE_MAX_TREE_BUDGET=0 is too small"):
        DDTreeConfig.from_env()
    for bad in (0, "big", 2.0, True):
        with pytest.raises(ValueError, match="tree_budget must be 'auto' or an integer >= 1"):
            DDTreeConfig(tree_budget=bad).validate()


def test_earlier_variable_names_still_work_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("DDTREE_BUDGET", "5")
    monkeypatch.setenv("DDTREE_PROMPT_CACHE_MB", "16")
    monkeypatch.setenv("DDTREE_PREFILL_CHUNK", "64")
    config = DDTreeConfig.from_env()
    assert (config.tree_budget, config.prompt_cache_bytes, config.prefill_step_size) == (5, 16 * 2**20, 64)
    assert "DDTREE_BUDGET is deprecated; set DDTREE_TREE_BUDGET instead" in caplog.text
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "7")  # the current name wins
    assert DDTreeConfig.from_env().tree_budget == 7
    monkeypatch.setenv("DDTREE_BUDGET", "lots")  # still parsed strictly
    monkeypatch.delenv("DDTREE_TREE_BUDGET")
    with pytest.raises(ValueError, match="DDTREE_BUDGET='lots' is not a tree budget"):
        DDTreeConfig.from_env()


@pytest.mark.parametrize("text,value", [("0", 0), ("1024", 1024), ("512M", 512 * 2**20), ("2G", 2 * 2**30),
                                        ("2GB", 2 * 2**30), ("64 KiB", 64 * 2**10)])
def test_prompt_cache_bytes_take_a_size(monkeypatch, text, value):
    monkeypatch.setenv("DDTREE_PROMPT_CACHE_BYTES", text)
    assert DDTreeConfig.from_env().prompt_cache_bytes == value


def test_a_bad_size_or_cache_dir_names_the_variable(monkeypatch):
    monkeypatch.setenv("DDTREE_PROMPT_CACHE_BYTES", "2 lots")
    with pytest.raises(ValueError, match="DDTREE_PROMPT_CACHE_BYTES='2 lots' is not a size"):
        DDTreeConfig.from_env()
    monkeypatch.delenv("DDTREE_PROMPT_CACHE_BYTES")
    monkeypatch.setenv("DDTREE_CACHE_DIR", " ")
    with pytest.raises(ValueError, match="DDTREE_CACHE_DIR is empty"):
        DDTreeConfig.from_env()


def test_explicit_arguments_win_even_over_a_bad_env_var(monkeypatch):
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "abc")
    with pytest.raises(ValueError, match="DDTREE_TREE_BUDGET='abc' is not a tree budget"):
        start()
    list(start(tree_budget=4, draft_model=None, method="ar"))  # the broken variable is never read


def test_generation_ends_at_the_context():
    steps = list(start(prompt_tokens=[1] * 4094, max_new_tokens=50, draft_model=None, method="ar"))
    assert sum(len(step.tokens) for step in steps) == 2 and steps[-1].finish_reason == "length"
