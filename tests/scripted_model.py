"""A tiny target that follows a fixed script, with a word-level tokenizer that holds tool-call and think markers
and a chat template that renders tools: the tool-capable case the embedded SmolLM2 cannot give.

The target is a real mlx-lm llama whose next token is a fixed function of the current one (a bigram): the
embedding is the identity, every residual branch is zeroed (o_proj, down_proj), and the LM head maps token i to
next(i). The template adds no generation prompt, so the prompt's last word (the last message's) cues a script.
The drafter knows the bigram too, so trees are accepted whole and markers land inside and across cycles."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tool_parsers import json_tools
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ddtree_mlx import DDTreeConfig
from ddtree_mlx.serving.http import make_server

VOCAB = HIDDEN = 128
SPECIAL = ["<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CALL = ["<tool_call>", '{"name":', '"get_weather",', '"arguments":', '{"city":', '"Paris"}}', "</tool_call>"]
SCRIPTS = {  # cue (the prompt's last word) -> what the model says, then <eos>
    "weather": ["Let", "me", "check."] + CALL,
    "sunny": ["The", "forecast", "says", "fine."],
    "hello": ["Hi", "there!"],
    "ponder": ["<think>", "hmm,", "rain?", "</think>", "Bring", "an", "umbrella."],
}
WORDS = SPECIAL + sorted({w for cue, said in SCRIPTS.items() for w in [cue, *said]})
WORDS += [f"x{i}" for i in range(VOCAB - len(WORDS))]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = (
    "{% if tools %}<|system|> tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% for c in m.get('tool_calls') or [] %}"
    "{% if c['function']['arguments'] is not mapping %}{{ raise_exception('arguments must be a dict') }}{% endif %}"
    "<tool_call> {{ c['function']['name'] }} {{ c['function']['arguments']['city'] }} </tool_call> "
    "{% endfor %}{% endfor %}"
)


def successor() -> np.ndarray:
    """next[i]: the token after token i (the end of a script, and any unscripted token, goes to <eos>)."""
    nxt = np.full(VOCAB, ID["<eos>"])
    for cue, said in SCRIPTS.items():
        chain = [cue, *said]
        for a, b in zip(chain, chain[1:]):
            assert nxt[ID[a]] in (ID["<eos>"], ID[b]), f"{a} is followed by two words"
            nxt[ID[a]] = ID[b]
    return nxt


NEXT = successor()


def make_target():
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_hidden_layers=2, rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False))
    model = llama.Model(args)
    model.model.embed_tokens.weight = mx.eye(VOCAB, HIDDEN)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    model.model.norm.weight = mx.ones((HIDDEN,))
    head = np.zeros((VOCAB, HIDDEN), np.float32)
    head[NEXT, np.arange(VOCAB)] = 1.0
    model.lm_head.weight = mx.array(head)
    mx.eval(model.parameters())
    return model


class BigramDrafter:
    """Drafts the script itself: every row puts all its mass on the bigram's next token."""

    target_layer_ids: list[int] = []

    def __init__(self, block_size: int = 8):
        self.block_size = block_size

    def reset(self, target, prompt_tokens) -> None:
        pass

    def draft(self, root_token, context_tokens, context_hidden):
        rows = np.full((self.block_size - 1, VOCAB), -30.0, np.float32)
        token = int(root_token)
        for depth in range(self.block_size - 1):
            token = int(NEXT[token])
            rows[depth, token] = 0.0
        return mx.array(rows)


def make_tokenizer(tools: bool = True) -> TokenizerWrapper:
    words = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=SPECIAL[2:], chat_template=TEMPLATE,
                                   clean_up_tokenization_spaces=False)
    if not tools:
        return TokenizerWrapper(fast)
    return TokenizerWrapper(fast, tool_call_start=json_tools.tool_call_start, tool_call_end=json_tools.tool_call_end,
                            tool_parser=json_tools.parse_tool_call)


TARGET = make_target()
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@contextmanager
def serving(budget: int = 8, tokenizer=None, config=None, **kwargs):
    """A server on the scripted target at this tree budget (make_server's `kwargs`); yields it, serving."""
    server = make_server(TARGET, tokenizer or make_tokenizer(), BigramDrafter(),
                         config=DDTreeConfig(tree_budget=budget, **config or {}), **{"max_tokens": 64, **kwargs})
    with running(server):
        yield server


@contextmanager
def running(server):
    """`server` serving on its own thread while the block runs; shut down after it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
