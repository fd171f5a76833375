"""The server decoding requests together (`serve --max-batch`), driven by the official openai and anthropic clients:
concurrent clients, streaming or not, with log-probs, a stop string, seeded sampling and tools, some hanging up
mid-stream, each get exactly what the one-at-a-time server (max_batch 1) answers the same request, and /health
shows the batch. No timing decides what batches: the model thread is held until every request is queued."""

import argparse
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import anthropic
import pytest
import scripted_model
from openai import APIError, InternalServerError, OpenAI
from scripted_model import running
from tiny import make_dflash, make_target, make_tokenizer

from ddtree_mlx import DDTreeConfig
from ddtree_mlx.cli.arguments import engine_config
from ddtree_mlx.cli.serve import add_serve_arguments, run_server
from ddtree_mlx.serving.http import make_server
from ddtree_mlx.serving.worker import BatchWorker, Worker

TARGET = make_target("qwen3_5")
TOKENIZER = make_tokenizer()
CONFIG = DDTreeConfig(tree_budget=4, max_batch=4)
CHAT = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w17 w43 w9"}]
EOS_CHAT = [{"role": "user", "content": "w100 w5"}]  # the tiny model says <eos> 37 tokens into this one
LONG_CHAT = [{"role": "user", "content": "w3 w4"}]  # hundreds of tokens before any <eos>


@contextmanager
def serving(config=CONFIG, **kwargs):
    """A server on the tiny hybrid target with its own drafter (the same weights for every server)."""
    with running(make_server(TARGET, TOKENIZER, make_dflash(TARGET), config=config, **kwargs)) as server:
        yield server


def openai_client(server):
    return OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def batched():
    with serving() as server:
        yield server


@pytest.fixture(scope="module")
def solo():
    with serving(CONFIG.replace(max_batch=1)) as server:
        assert type(server.engine.worker) is Worker  # today's path: one generation at a time
        yield openai_client(server)


@contextmanager
def together(server, requests):
    """Hold the model thread until `requests` more requests are queued (those sent inside the block), so they join
    the batch together however the threads are scheduled."""
    worker = server.engine.worker
    holding, queued, gate, count = threading.Event(), threading.Event(), threading.Event(), itertools.count(1)
    put = worker.jobs.put

    def counted(job, *args, **kwargs):
        put(job, *args, **kwargs)
        if next(count) == requests:
            queued.set()

    def hold(*_):  # a job's start, on the model thread: it waits there until every request is queued
        holding.set()
        gate.wait(60)
        raise LookupError("released")

    holder = threading.Thread(target=pytest.raises, args=(LookupError, lambda: list(worker.stream(hold))))
    holder.start()
    try:
        assert holding.wait(60)
        worker.jobs.put = counted
        yield
        assert queued.wait(60)
    finally:
        del worker.jobs.put
        gate.set()
        holder.join()


def merged(parts):
    """Streamed chunks' log-probs as one: each field's lists joined (chat: content; completions: tokens, ...)."""
    parts = [p for p in parts if p]
    return {key: [x for p in parts for x in p[key] or []] for key in parts[0]} if parts else None


def ask(client, spec):
    """What a client makes of its answer: text, finish reason, usage and log-probs; one that hangs up after
    `hang_up` chunks closes the stream and keeps the text it got. The usage leaves out the prompt tokens the prompt
    cache held: they depend on which requests came before."""
    spec = dict(spec)
    kind, hang_up = spec.pop("kind"), spec.pop("hang_up", None)
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    response = create(model="ddtree", **spec)
    if not spec.get("stream"):
        answer = response.to_dict()
        choice = answer["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        return {"text": text, "finish": choice["finish_reason"], "usage": uncached(answer["usage"]),
                "logprobs": choice.get("logprobs")}
    text, finish, usage, logprobs = "", None, None, []
    for n, chunk in enumerate(response):
        chunk = chunk.to_dict()
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            text += (choice["delta"].get("content") or "") if kind == "chat" else choice["text"]
            finish = choice["finish_reason"] or finish
            logprobs.append(choice.get("logprobs"))
        if n + 1 == hang_up:
            response.close()
            return {"text": text, "hung_up": True}
    return {"text": text, "finish": finish, "usage": usage and uncached(usage), "logprobs": merged(logprobs)}


def same(a, b):
    """Equal, log-probs within 1e-4: a batch's forward sums in another order than a lone row's (tokens are exact)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def uncached(usage):
    return {key: value for key, value in usage.items() if key != "prompt_tokens_details"}


def cancels(batch, monkeypatch, expected):
    """Records the requests cancelled while still in the batch (a client gone, a stop string matched), not those
    that had ended; the event is set once `expected` were."""
    cancel, seen, done = batch.cancel, [], threading.Event()

    def recorded(uid):
        if any(row.uid == uid for row in [*batch.rows, *batch.waiting]):
            seen.append(uid)
        cancel(uid)
        if len(seen) == expected:
            done.set()

    monkeypatch.setattr(batch, "cancel", recorded)
    return done


def test_mixed_concurrent_clients_get_the_one_at_a_time_answers(batched, solo, monkeypatch):
    eos_stream = {"kind": "chat", "messages": EOS_CHAT, "max_tokens": 48, "stream": True,
                  "stream_options": {"include_usage": True}}
    stop = ask(solo, eos_stream)["text"].split()[3]  # met a few tokens in: the row ends long before its length
    specs = [
        {"kind": "chat", "messages": CHAT, "max_tokens": 24},
        eos_stream,
        {"kind": "chat", "messages": CHAT, "max_tokens": 16, "logprobs": True, "top_logprobs": 2, "stream": True},
        {"kind": "chat", "messages": LONG_CHAT, "max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 7,
         "logprobs": True},
        {"kind": "completion", "prompt": "w3 w4 w5 w6", "max_tokens": 20, "logprobs": 2},
        {**eos_stream, "stop": [stop]},
        {"kind": "chat", "messages": LONG_CHAT, "max_tokens": 400, "stream": True, "hang_up": 3},
        {"kind": "completion", "prompt": "w3 w4", "max_tokens": 400, "stream": True, "hang_up": 3},
    ]
    # A client that hangs up got the start of what the whole answer would have been.
    wanted = [ask(solo, {**spec, "max_tokens": 20} if "hang_up" in spec else spec) for spec in specs]
    batch = batched.engine.worker.batch
    cancelled = cancels(batch, monkeypatch, expected=3)  # two clients hang up, one stop string matches
    client = openai_client(batched)
    with ThreadPoolExecutor(len(specs)) as pool:
        with together(batched, len(specs)):
            futures = [pool.submit(ask, client, spec) for spec in specs]
        got = [future.result() for future in futures]
    for spec, answer, want in zip(specs, got, wanted):
        if "hang_up" in spec:
            assert answer["text"] and want["text"].startswith(answer["text"]), spec
        else:
            assert same(answer, want), (spec, answer, want)
    assert got[5]["finish"] == "stop" and stop not in got[5]["text"]
    assert cancelled.wait(60)  # the rows of the clients that left end: they do not run to 400 tokens
    health = batched.engine.health()["batch"]
    assert health["max_batch"] == 4 and health["largest_batch"] == 4 and health["batched_cycles"] > 0
    assert health["active"] == health["waiting"] == 0


def test_a_failed_step_fails_its_rows_with_500_and_spares_the_rest(solo, monkeypatch):
    with serving() as server:
        batch, client = server.engine.worker.batch, openai_client(server)
        step, calls, failing = batch.next, itertools.count(1), {3}

        def next_failing():  # the step's work done, its rows left mid-way
            responses = step()
            if next(calls) in failing:
                raise RuntimeError("boom")
            return responses

        monkeypatch.setattr(batch, "next", next_failing)
        spec = {"kind": "chat", "messages": CHAT, "max_tokens": 12}

        def outcome(_):
            try:
                return ask(client, spec)
            except InternalServerError as error:
                return error.status_code, error.body

        with ThreadPoolExecutor(5) as pool:  # four rows in the batch when its third step fails, one waiting
            with together(server, 5):
                futures = [pool.submit(outcome, n) for n in range(5)]
            got = [future.result() for future in futures]
        failed = (500, {"message": "generation failed: boom", "type": "server_error", "param": None, "code": None})
        assert sorted(got, key=str) == sorted([failed] * 4 + [ask(solo, spec)], key=str)

        failing.add(next(calls) + 2)  # a streamed answer fails after its first piece: its stream ends in an error
        with pytest.raises(APIError, match="generation failed: boom"):
            ask(client, {**spec, "stream": True})
        assert ask(client, spec) == ask(solo, spec)  # and the server goes on
        assert server.engine.health()["batch"]["active"] == 0


def test_anthropic_clients_with_tools_batched(monkeypatch):
    """The scripted target's tool calls, thinking and plain text through the Messages API, four at once. At tree
    budget 1 a cycle commits two tokens at most: the longer answers decode side by side whatever their order."""
    requests = [
        {"messages": [{"role": "user", "content": "what is the weather"}], "tools": [scripted_model.WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "what is the weather"}], "tools": [scripted_model.WEATHER_TOOL],
         "stream": True},
        {"messages": [{"role": "user", "content": "should I ponder"}], "stream": True},
        {"messages": [{"role": "user", "content": "hello"}], "stop_sequences": ["there!"]},
    ]
    tool = scripted_model.WEATHER_TOOL["function"]
    for request in requests:
        if "tools" in request:
            request["tools"] = [{"name": tool["name"], "description": tool["description"],
                                 "input_schema": tool["parameters"]}]

    def ask_messages(server, request):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.server_address[1]}", api_key="x",
                                     max_retries=0, timeout=60)
        request = {"model": "m", "max_tokens": 50, **request}
        if request.pop("stream", False):
            with client.messages.stream(**request) as stream:
                message = stream.get_final_message().to_dict()
        else:
            message = client.messages.create(**request).to_dict()
        usage = message.pop("usage")  # the prompt cache's share differs with the order: only the sum is the same
        blocks = [{k: v for k, v in block.items() if k != "id"} for block in message["content"]]
        return {"content": blocks, "stop": (message["stop_reason"], message["stop_sequence"]),
                "tokens": (usage["input_tokens"] + usage["cache_read_input_tokens"], usage["output_tokens"])}

    with scripted_model.serving(1, config={"max_batch": 1}) as one:
        wanted = [ask_messages(one, request) for request in requests]
    assert [w["stop"][0] for w in wanted] == ["tool_use", "tool_use", "end_turn", "stop_sequence"]
    with scripted_model.serving(1, config={"max_batch": 4}) as server:
        with ThreadPoolExecutor(len(requests)) as pool:
            with together(server, len(requests)):
                futures = [pool.submit(ask_messages, server, request) for request in requests]
            assert [future.result() for future in futures] == wanted
        assert server.engine.health()["batch"]["largest_batch"] > 1


def test_max_batch_setting():
    assert DDTreeConfig().max_batch == 4 and DDTreeConfig.from_env({"DDTREE_MAX_BATCH": " 8 "}).max_batch == 8
    for bad in ("0", "two", "1.5"):
        with pytest.raises(ValueError, match="DDTREE_MAX_BATCH"):
            DDTreeConfig.from_env({"DDTREE_MAX_BATCH": bad})
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        DDTreeConfig(max_batch=0).validate()
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert engine_config(parser.parse_args(["--max-batch", "2"])).max_batch == 2
    assert engine_config(parser.parse_args([])).max_batch == 4
    with serving(CONFIG.replace(max_batch=2)) as server:
        assert isinstance(server.engine.worker, BatchWorker) and server.engine.worker.batch.max_batch == 2


def test_sharded_serving_refuses_a_batch():
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValueError, match="a sharded target serves one request at a time"):
        run_server(parser.parse_args(["--sharding", "tensor", "--max-batch", "2"]))  # before anything loads
