"""Exact log-probabilities: every committed token's log-softmax row under the target, checked against mlx-lm's own
generate_step fed the same tokens, on float32 and bf16 tiny targets, at tree budgets 1, 8 and auto, greedy and
sampled, plain decoding (queued steps) too; a perturbed row must be caught. Then the OpenAI server's logprobs,
through the official openai client."""

import importlib
import math
import threading

import mlx.core as mx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from tiny import OracleDrafter, make_dflash, make_target, make_tokenizer, mlx_lm_greedy, target_time

from ddtree_mlx import DDTreeConfig, generate_ddtree_once, stream_generate
from ddtree_mlx.engine import generate as generate_module
from ddtree_mlx.engine import logprobs as logprobs_module
from ddtree_mlx.engine import session as session_module
from ddtree_mlx.engine.logprobs import TokenLogprob
from ddtree_mlx.serving.http import make_server
from ddtree_mlx.serving.logprobs import Carried
from ddtree_mlx.serving.text import TextStream

mlx_lm_generate = importlib.import_module("mlx_lm.generate")

PROMPT = [3, 17, 42, 9, 100, 5, 61, 17, 42]
NEW_TOKENS = 32
TOP = 5

_targets, _greedy = {}, {}


def target(family, form):
    if (family, form) not in _targets:
        _targets[family, form] = make_target(family, seed=2, form=form)
    return _targets[family, form]


def greedy(family, form):
    if (family, form) not in _greedy:
        _greedy[family, form] = mlx_lm_greedy(target(family, form), PROMPT, NEW_TOKENS).tokens
    return _greedy[family, form]


def reference(model, tokens, prompt=PROMPT, **options):
    """mlx-lm's generate_step fed `tokens` (its sampler returns ours): its log-probs at every position, and the
    raw logits they came from (recorded by a logits processor that changes nothing)."""
    forced, raw = iter(tokens), []

    def record(_, logits):
        raw.append(logits)
        return logits

    rows = []
    steps = mlx_lm_generate.generate_step(mx.array(prompt), model, max_tokens=len(tokens),
                                          sampler=lambda _: mx.array([next(forced, 0)]), logits_processors=[record],
                                          **options)
    for (token, log_probs), want in zip(steps, tokens):
        assert token == want
        rows.append(np.array(log_probs.astype(mx.float32)))
    return rows, [np.abs(np.array(r.astype(mx.float32))).max() for r in raw[: len(tokens)]]


def tolerance(form, largest_logit):
    """float32: 1e-4. bf16: two bf16 steps at the row's largest logit magnitude (8 significant bits)."""
    return 1e-4 if form == "f32" else 2 * 2.0 ** (math.floor(math.log2(largest_logit)) - 7)


def check(entries, tokens, rows, magnitudes, form, top=TOP):
    """Our entries against mlx-lm's rows: the chosen token's log-prob, the top-k's values, and the top-k set (equal
    but for ties at the k-th place); ours sorted descending with the chosen token first among equals."""
    assert [e.token for e in entries] == tokens
    for i, (entry, row, magnitude) in enumerate(zip(entries, rows, magnitudes)):
        tol = tolerance(form, magnitude)
        where = f"position {i} (token {entry.token})"
        assert abs(entry.logprob - row[entry.token]) <= tol, f"{where}: {entry.logprob} vs mlx-lm's {row[entry.token]}"
        assert len(entry.top) == top, where
        ids, values = [t for t, _ in entry.top], [v for _, v in entry.top]
        assert values == sorted(values, reverse=True), where
        for token, value in entry.top:
            assert abs(value - row[token]) <= tol, f"{where}: top {token} {value} vs mlx-lm's {row[token]}"
        if entry.token in ids:
            assert entry.top[ids.index(entry.token)][1] == entry.logprob
            assert all(v > entry.logprob for v in values[: ids.index(entry.token)]), f"{where}: chosen not first"
        if top:
            order = np.argsort(-row, kind="stable")
            kth = row[order[top - 1]]
            for token in set(ids) ^ set(order[:top].tolist()):  # only ties at the k-th place may differ
                assert abs(row[token] - kth) <= tol, f"{where}: top-{top} {sorted(ids)} vs {sorted(order[:top])}"


def run(family, form, monkeypatch, budget, temperature=0.0, **kwargs):
    model = target(family, form)
    monkeypatch.setattr(generate_module, "LEARNED", {})  # what auto learned in other tests' generations
    if budget == "auto":
        target_time(monkeypatch, model)
    kwargs.setdefault("draft_model", OracleDrafter(PROMPT + greedy(family, form), seed=3))
    return generate_ddtree_once(target_model=model, prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS,
                                stop_token_ids=[], tree_budget=budget, temperature=temperature, seed=7,
                                logprobs=TOP, **kwargs)


# Sampled at 0.1: the oracle knows the greedy path, which a draw at 0.1 mostly follows, so branches are taken; the
# log-probs reported are the untempered ones all the same (at 0.1 the tempered ones would be far off).
@pytest.mark.parametrize("temperature", [0.0, 0.1])
@pytest.mark.parametrize("budget", [1, 8, "auto"])
@pytest.mark.parametrize("form", ["f32", "bf16"])
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_logprobs_match_mlx_lm(family, form, budget, temperature, monkeypatch):
    result = run(family, form, monkeypatch, budget, temperature)
    tokens = result["generated_token_ids"]
    assert len(result["logprobs"]) == len(tokens) == NEW_TOKENS
    assert result["avg_acceptance"] > 1, "no cycle accepted a draft token: nothing but roots was checked"
    if temperature == 0 and form == "f32":
        assert tokens == greedy(family, form)
    check(result["logprobs"], tokens, *reference(target(family, form), tokens), form)


@pytest.mark.parametrize("form", ["f32", "bf16"])
@pytest.mark.parametrize("family", ["qwen3_5", "llama"])
def test_hot_sampling_with_filters_reports_the_raw_distribution(family, form, monkeypatch):
    """At 0.8 with top-p and top-k the draws leave the oracle's path (few branches); still exact, unfiltered."""
    result = run(family, form, monkeypatch, 8, 0.8, top_p=0.9, top_k=20)
    tokens = result["generated_token_ids"]
    check(result["logprobs"], tokens, *reference(target(family, form), tokens), form)


@pytest.mark.parametrize("form", ["f32", "bf16"])
def test_plain_decoding_with_queued_steps(form):
    """method="ar" queues each step before the last one is read: its rows are issued before the queued step."""
    model = target("qwen3_5", form)
    steps = list(stream_generate(target_model=model, prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS, method="ar",
                                 stop_token_ids=[], temperature=0.8, seed=5, logprobs=TOP))
    assert all(len(step.logprobs) == len(step.tokens) for step in steps)
    tokens = [t for step in steps for t in step.tokens]
    check([e for step in steps for e in step.logprobs], tokens, *reference(model, tokens), form)


def test_exact_commit_and_a_quantized_kv_cache(monkeypatch):
    """The commit that reruns the path (exact_commit) reads the same rows; with a quantized KV cache (no queued
    steps) the entries align with mlx-lm's own quantized decoding."""
    from ddtree_mlx import DDTreeConfig as Config

    result = run("qwen3_5", "f32", monkeypatch, 8, config=Config(tree_budget=8, exact_commit=True))
    tokens = result["generated_token_ids"]
    assert tokens == greedy("qwen3_5", "f32") and result["avg_acceptance"] > 1
    check(result["logprobs"], tokens, *reference(target("qwen3_5", "f32"), tokens), "f32")
    model = make_target("llama", seed=4, head_dim=32)  # kv groups of 32 need a head size they divide
    options = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    truth = mlx_lm_greedy(model, PROMPT, NEW_TOKENS, **options).tokens
    quantized = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + truth), tree_budget=8,
                                     prompt_tokens=PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=[], logprobs=TOP,
                                     **options)
    assert quantized["generated_token_ids"] == truth and quantized["avg_acceptance"] > 1
    check(quantized["logprobs"], truth, *reference(model, truth, **options), "f32")


def test_stop_token_and_alignment():
    """Every step's entries align with its tokens; the stop token (mid-cycle) has its own entry."""
    tokens = greedy("qwen3_5", "f32")
    stop = tokens[12]
    steps = list(stream_generate(target_model=target("qwen3_5", "f32"), prompt_tokens=PROMPT, tree_budget=8,
                                 draft_model=OracleDrafter(PROMPT + tokens, seed=3), max_new_tokens=NEW_TOKENS,
                                 stop_token_ids=[stop], logprobs=0))
    assert steps[-1].finish_reason == "stop" and steps[-1].tokens[-1] == stop
    assert all(len(step.logprobs) == len(step.tokens) for step in steps)
    entries = [e for step in steps for e in step.logprobs]
    got = [t for step in steps for t in step.tokens]
    assert got == tokens[: tokens.index(stop) + 1] and all(e.top == [] for e in entries)
    check(entries, got, *reference(target("qwen3_5", "f32"), got), "f32", top=0)


def test_off_by_default_computes_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("log-probs computed while off")

    monkeypatch.setattr(session_module, "Scores", refuse)
    tokens = greedy("llama", "f32")
    steps = list(stream_generate(target_model=target("llama", "f32"), prompt_tokens=PROMPT, tree_budget=8,
                                 draft_model=OracleDrafter(PROMPT + tokens), max_new_tokens=16, stop_token_ids=[]))
    assert all(step.logprobs is None for step in steps)
    result = generate_ddtree_once(target_model=target("llama", "f32"), prompt_tokens=PROMPT, method="ar",
                                  max_new_tokens=8, stop_token_ids=[])
    assert "logprobs" not in result


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "5", [3]])
def test_bad_logprobs_are_refused_before_model_work(value):
    with pytest.raises(ValueError, match=r"logprobs must be None \(off\) or .* integer in \[0, 20\]"):
        stream_generate(target_model=object(), prompt_tokens=PROMPT, logprobs=value, method="ar")


class Shifted(logprobs_module.Scores):
    """A wrong row: the token after each path node scored from the node after it (the last row repeated)."""

    def __init__(self, logits, chosen, top, rows=None):
        if rows is not None:  # the chosen tokens stay right
            logits, chosen = logits[mx.concatenate([rows[1:], rows[-1:]])], chosen[rows]
        super().__init__(logits, chosen, top)


class Nudged(logprobs_module.Scores):
    """One row off: the first row's logits shifted at one token by a bf16 step's worth."""

    def __init__(self, logits, chosen, top, rows=None):
        bump = mx.zeros(logits.shape, logits.dtype)
        bump[0, int(np.argmax(np.array(logits[0].astype(mx.float32))))] = 0.05
        super().__init__(logits + bump, chosen, top, rows)


@pytest.mark.parametrize("wrong", [Shifted, Nudged])
def test_the_comparison_catches_a_wrong_row(wrong, monkeypatch):
    monkeypatch.setattr(session_module, "Scores", wrong)
    result = run("qwen3_5", "f32", monkeypatch, 8)
    tokens = result["generated_token_ids"]
    assert tokens == greedy("qwen3_5", "f32")  # the tokens are right; only the log-probs are not
    with pytest.raises(AssertionError, match="position"):
        check(result["logprobs"], tokens, *reference(target("qwen3_5", "f32"), tokens), "f32")


def test_ranking_prefers_the_chosen_token_among_ties():
    ranked = logprobs_module._ranked(9, -1.0, [4, 2, 7], [-0.5, -1.0, -1.0])  # 9 ties the last place, left out
    assert ranked == [(4, -0.5), (9, -1.0), (2, -1.0)]
    assert logprobs_module._ranked(7, -1.0, [2, 7, 4], [-1.0, -1.0, -0.5]) == [(4, -0.5), (7, -1.0), (2, -1.0)]
    assert TokenLogprob(1, -0.1, []).top == []


# --- the OpenAI server --------------------------------------------------------------------------------------------

TOKENIZER = make_tokenizer()
CHAT = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w17 w43 w9"}]
EOS_CHAT = [{"role": "user", "content": "w100 w5"}]  # the tiny model says <eos> 37 tokens into this one
TEXT_PROMPT = "w3 w4 w5 w6"


@pytest.fixture(scope="module")
def client():
    model = make_target("qwen3_5")
    server = make_server(model, TOKENIZER, make_dflash(model), config=DDTreeConfig(tree_budget=4))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                     timeout=60)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def entries_of(content):
    return [(e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs]) for e in content]


def chat_prompt(messages):
    return TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_chat_logprobs_are_mlx_lms_and_stream_as_they_complete(client):
    kwargs = dict(model="ddtree", messages=CHAT, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 24
    ids = [TOKENIZER.convert_tokens_to_ids(e.token) for e in content]
    rows, magnitudes = reference(client_model(client), ids, chat_prompt(CHAT))
    for e, row, token in zip(content, rows, ids):
        assert abs(e.logprob - row[token]) <= 1e-4 and bytes(e.bytes).decode() == e.token
        assert len(e.top_logprobs) == 3 and [t.logprob for t in e.top_logprobs] == sorted(
            [t.logprob for t in e.top_logprobs], reverse=True)
    assert TOKENIZER.decode(ids) == whole.choices[0].message.content

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries_of(streamed) == entries_of(content)
    for c in chunks:  # a chunk's entries are those of the text it carries
        if c.choices and c.choices[0].logprobs and c.choices[0].delta.content:
            assert " ".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content.strip()


def test_the_stop_token_has_an_entry(client):
    kwargs = dict(model="ddtree", messages=EOS_CHAT, max_tokens=60, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert whole.choices[0].finish_reason == "stop" and content[-1].token == "<eos>"
    assert len(content) == whole.usage.completion_tokens and all(e.top_logprobs == [] for e in content)
    assert "<eos>" not in whole.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries_of(streamed) == entries_of(content)


def test_a_stop_string_cuts_the_entries_with_the_text(client):
    first = client.chat.completions.create(model="ddtree", messages=CHAT, max_tokens=24, temperature=0)
    words = first.choices[0].message.content.split()
    stop = words[6]
    whole = client.chat.completions.create(model="ddtree", messages=CHAT, max_tokens=24, temperature=0,
                                           logprobs=True, stop=[stop])
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == words.index(stop) + 1
    assert content[-1].token == stop


def test_completions_legacy_logprobs(client):
    kwargs = dict(model="ddtree", prompt=TEXT_PROMPT, max_tokens=16, temperature=0, logprobs=5)
    whole = client.completions.create(**kwargs)
    legacy = whole.choices[0].logprobs
    n = whole.usage.completion_tokens
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset) == n
    text = whole.choices[0].text
    for token, offset in zip(legacy.tokens, legacy.text_offset):
        assert text[offset:].lstrip().startswith(token)
    for token, value, top in zip(legacy.tokens, legacy.token_logprobs, legacy.top_logprobs):
        assert len(top) == 5 and (token not in top or top[token] == value) and max(top.values()) >= value
    chunks = list(client.completions.create(stream=True, **kwargs))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == legacy.tokens
    assert sum((p.token_logprobs for p in parts), []) == legacy.token_logprobs
    assert sum((p.top_logprobs for p in parts), []) == legacy.top_logprobs
    assert sum((p.text_offset for p in parts), []) == legacy.text_offset


def test_no_logprobs_unless_asked(client):
    whole = client.chat.completions.create(model="ddtree", messages=CHAT, max_tokens=4)
    assert whole.choices[0].logprobs is None
    assert client.completions.create(model="ddtree", prompt=TEXT_PROMPT, max_tokens=4).choices[0].logprobs is None


@pytest.mark.parametrize("kind,fields,param", [
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("completion", {"logprobs": 21}, "logprobs"),
    ("completion", {"logprobs": True}, "logprobs"),
    ("completion", {"logprobs": 2, "extra_body": {"top_logprobs": 2}}, "top_logprobs"),
])
def test_bad_logprob_requests_get_400(client, kind, fields, param):
    extra = fields.pop("extra_body", None)
    with pytest.raises(BadRequestError) as refused:
        if kind == "chat":
            client.chat.completions.create(model="ddtree", messages=CHAT, max_tokens=4, extra_body=extra, **fields)
        else:
            client.completions.create(model="ddtree", prompt=TEXT_PROMPT, max_tokens=4, extra_body=extra, **fields)
    assert refused.value.status_code == 400 and refused.value.body["param"] == param
    assert param in refused.value.body["message"]


def byte_level_tokenizer():
    """A byte-level BPE tokenizer (one token per byte, as GPT-2's and Qwen's spell rare characters) with mlx-lm's
    BPE streaming detokenizer."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, merges=[]))
    words.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words.decoder = decoders.ByteLevel()
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=words), BPEStreamingDetokenizer)


@pytest.mark.parametrize("stops,pieces,rest", [
    ([], [["a"], [], ["\\xd0", "\\xb6"], [], [" ", "b"]], []),
    (["ж "], [["a"], [], [], [], []], ["\\xd0", "\\xb6", " ", "b"]),  # b's text completes the stop string
    ([" b"], [["a"], [], ["\\xd0", "\\xb6"], [], []], [" ", "b"]),
])
def test_entries_go_out_with_the_text_that_completes_them(stops, pieces, rest):
    """Bytes of one character go out with the token that completes it; text held back as a possible stop string
    holds its entries back; spelt as OpenAI does (a part of a character as \\xNN, its bytes exact)."""
    tokenizer = byte_level_tokenizer()
    carried = Carried(TextStream(tokenizer, stops), tokenizer)
    ids = tokenizer.encode("aж b", add_special_tokens=False)
    out, every = [], []
    for token in ids:
        carried.add([token], [TokenLogprob(token, -1.0, [(token, -1.0)])])
        every += carried.ready()
        out.append([e["token"] for e in every[len(sum(out, [])):]])
    left = carried.rest(None)
    assert out == pieces and [e["token"] for e in left] == rest
    every += left
    assert [e["bytes"] for e in every] == [[97], [208], [182], [32], [98]]
    assert all(e["top_logprobs"] == [{"token": e["token"], "logprob": -1.0, "bytes": e["bytes"]}] for e in every)
    assert [e["offset"] for e in every] == [0, 1, 1, 2, 2]


_MODELS = {}


def client_model(client):
    """The server's target (the same tiny model, built again from its seed)."""
    if "qwen3_5" not in _MODELS:
        _MODELS["qwen3_5"] = make_target("qwen3_5")
    return _MODELS["qwen3_5"]
