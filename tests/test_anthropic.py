"""The Anthropic Messages API and the API key, with the official anthropic (and openai) clients against a server
on the scripted target (scripted_model.py) at tree budgets 1 and 8."""

import http.client
import json
import threading

import anthropic
import pytest
from openai import AuthenticationError, OpenAI
from scripted_model import WEATHER_TOOL, serving

from ddtree_mlx import DDTreeConfig

TOOL = {"name": "get_weather", "description": "The weather in a city",
        "input_schema": WEATHER_TOOL["function"]["parameters"]}
WEATHER = [{"role": "user", "content": "what is the weather"}]
SAID = "Let me check. "


def make_client(server, key="x"):
    return anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.server_address[1]}", api_key=key, max_retries=0,
                               timeout=30)


@pytest.fixture(scope="module", params=[1, 8], ids=["budget1", "budget8"])
def server(request):
    with serving(request.param) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return make_client(server)


def create(client, messages=WEATHER, **kwargs):
    return client.messages.create(model="m", max_tokens=50, messages=messages, **kwargs).to_dict()


def streamed(client, messages=WEATHER, **kwargs):
    """The SDK's events' types and its final message."""
    with client.messages.stream(model="m", max_tokens=50, messages=messages, **kwargs) as events:
        kinds = [event.type for event in events if event.type in (
            "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
            "message_stop")]
        return kinds, events.get_final_message().to_dict()


def same(a, b):
    """Equal messages but for the ids the server draws, fields the SDK adds as None, and how much of the prompt
    the prefix cache held (a repeated prompt hits it)."""
    def plain(message):
        blocks = [{**block, "id": None} if block["type"] == "tool_use" else block for block in message["content"]]
        usage = message["usage"]
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
        return {**{k: v for k, v in message.items() if v is not None}, "id": None, "content": blocks,
                "usage": (prompt, usage["output_tokens"])}
    return plain(a) == plain(b)


def raw(server, method, path, body=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read().decode()


def test_tool_use_create_and_stream(client):
    message = create(client, tools=[TOOL])
    text, call = message["content"]
    assert text == {"type": "text", "text": SAID}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"})
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["role"] == "assistant" and message["type"] == "message" and message["id"].startswith("msg_")
    usage = message["usage"]
    assert usage["output_tokens"] == 11 and usage["input_tokens"] + usage["cache_read_input_tokens"] > 0

    kinds, final = streamed(client, tools=[TOOL])
    assert same(final, message)
    text_deltas = kinds.count("content_block_delta") - 1
    assert kinds == (["message_start", "content_block_start"] + ["content_block_delta"] * text_deltas
                     + ["content_block_stop", "content_block_start", "content_block_delta", "content_block_stop",
                        "message_delta", "message_stop"])
    assert final["usage"]["cache_read_input_tokens"] > 0  # the same prompt came before


def test_raw_events(server):
    status, body = raw(server, "POST", "/v1/messages?beta=true",
                       {"model": "m", "max_tokens": 50, "messages": WEATHER, "tools": [TOOL], "stream": True})
    assert status == 200
    events = [block.split("\n") for block in body.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    datas = [json.loads(lines[1].removeprefix("data: ")) for lines in events]
    assert all(data["type"] == name for name, data in zip(names, datas))
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    starts = [d for d in datas if d["type"] == "content_block_start"]
    assert [d["index"] for d in starts] == [0, 1] and starts[1]["content_block"]["input"] == {}
    json_delta = next(d["delta"] for d in datas if d.get("delta", {}).get("type") == "input_json_delta")
    assert json.loads(json_delta["partial_json"]) == {"city": "Paris"}
    assert datas[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


def test_tool_result_round_trip(client):
    first = create(client, tools=[TOOL])
    history = [{"type": "thinking", "thinking": "sent back", "signature": "s"}, *first["content"]]
    messages = [*WEATHER, {"role": "assistant", "content": history},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first["content"][1]["id"],
                                              "content": [{"type": "text", "text": "sunny"}]}]}]
    system = [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
    message = create(client, messages, tools=[TOOL], system=system, metadata={"user_id": "u"})
    assert message["content"] == [{"type": "text", "text": "The forecast says fine."}]
    assert message["stop_reason"] == "end_turn"
    assert same(streamed(client, messages, tools=[TOOL], system=system)[1], message)
    errored = [*messages[:2], {"role": "user", "content": [{"type": "tool_result", "is_error": True,
                                                             "tool_use_id": "x", "content": "sunny"}]}]
    assert create(client, errored, tools=[TOOL])["stop_reason"] == "end_turn"


def test_tool_choice(client):
    hello = [{"role": "user", "content": "hello"}]
    assert create(client, hello, tools=[TOOL])["content"] == [{"type": "text", "text": "Hi there!"}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}):
        message = create(client, hello, tools=[TOOL], tool_choice=choice)
        assert [b["type"] for b in message["content"]] == ["tool_use"] and message["stop_reason"] == "tool_use"
        assert message["content"][0]["input"] == {"city": "Paris"}
        assert same(streamed(client, hello, tools=[TOOL], tool_choice=choice)[1], message)
    message = create(client, tools=[TOOL], tool_choice={"type": "none"})
    assert [b["type"] for b in message["content"]] == ["text"] and message["stop_reason"] == "end_turn"


def test_stop_sequence_and_max_tokens(client):
    message = create(client, tools=[TOOL], stop_sequences=["check."])
    assert message["content"] == [{"type": "text", "text": "Let me "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "check.")
    assert same(streamed(client, tools=[TOOL], stop_sequences=["check."])[1], message)
    # A call cut by max_tokens stays text.
    message = client.messages.create(model="m", max_tokens=6, messages=WEATHER, tools=[TOOL]).to_dict()
    assert message["content"] == [{"type": "text", "text": SAID + '<tool_call> {"name": "get_weather",'}]
    assert message["stop_reason"] == "max_tokens" and message["usage"]["output_tokens"] == 6


def test_thinking(client):
    ponder = [{"role": "user", "content": "ponder"}]
    message = create(client, ponder)
    assert message["content"] == [{"type": "thinking", "thinking": " hmm, rain? ", "signature": ""},
                                  {"type": "text", "text": " Bring an umbrella."}]
    assert same(streamed(client, ponder)[1], message)


def test_count_tokens(server, client):
    message = create(client, tools=[TOOL])
    count = client.messages.count_tokens(model="m", messages=WEATHER, tools=[TOOL]).input_tokens
    assert count == message["usage"]["input_tokens"] + message["usage"]["cache_read_input_tokens"]
    assert client.messages.count_tokens(model="m", messages=WEATHER).input_tokens < count
    # Answered while the model thread is busy.
    gate = threading.Event()

    def hold(*_):  # a job's start, on the model thread (alone or joining a batch): holds it until released
        gate.wait(30)
        raise LookupError("released")

    holder = threading.Thread(target=pytest.raises, args=(LookupError, lambda: list(server.engine.worker.stream(hold))))
    holder.start()
    try:
        assert client.messages.count_tokens(model="m", messages=WEATHER, tools=[TOOL]).input_tokens == count
    finally:
        gate.set()
        holder.join()


def error_of(server, method, path, body=None, headers=None):
    status, text = raw(server, method, path, body, headers)
    payload = json.loads(text)
    assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"} and payload["error"]["message"]
    return status, payload["error"]["type"], payload["error"]["message"]


@pytest.mark.parametrize("body", [
    {"messages": WEATHER},  # no max_tokens
    {"max_tokens": 5, "messages": []},
    {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
    {"max_tokens": 5, "messages": WEATHER, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}},
    {"max_tokens": 5, "messages": WEATHER, "tool_choice": {"type": "any"}},
    {"max_tokens": 5, "messages": WEATHER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"max_tokens": 5, "messages": WEATHER, "stop_sequences": "check."},
])
def test_bad_requests(server, body):
    assert error_of(server, "POST", "/v1/messages", body)[:2] == (400, "invalid_request_error")


def test_error_bodies(server):
    long = [{"role": "user", "content": " ".join(["hello"] * 600)}]
    status, kind, message = error_of(server, "POST", "/v1/messages", {"max_tokens": 5, "messages": long})
    assert (status, kind) == (400, "invalid_request_error")
    assert message == "prompt is too long: 601 tokens > 511 maximum"
    assert error_of(server, "POST", "/v1/messages/nothing", {})[:2] == (404, "not_found_error")
    assert error_of(server, "GET", "/v1/messages")[:2] == (405, "invalid_request_error")
    assert error_of(server, "POST", "/v1/messages", b"{not json")[:2] == (400, "invalid_request_error")


def test_limits_and_failures(monkeypatch):
    with serving(8, max_queue=0, max_body_bytes=2000) as busy:
        body = {"model": "m", "max_tokens": 5, "messages": WEATHER}
        assert error_of(busy, "POST", "/v1/messages", body)[:2] == (529, "overloaded_error")
        assert json.loads(raw(busy, "POST", "/v1/messages/count_tokens", body)[1])["input_tokens"] > 0
        too_long = {**body, "system": "x" * 3000}
        assert error_of(busy, "POST", "/v1/messages", too_long)[:2] == (413, "request_too_large")
    with serving(8, config={"max_batch": 1}) as failing:  # one at a time (test_batch_server.py: a batch's)
        def broken(job):
            raise RuntimeError("boom")

        monkeypatch.setattr(failing.engine, "_steps", broken)
        status, kind, message = error_of(failing, "POST", "/v1/messages", {"max_tokens": 5, "messages": WEATHER})
        assert (status, kind) == (500, "api_error") and "boom" in message
        steps = type(failing.engine)._steps

        def midway(job):
            yield next(iter(steps(failing.engine, job)))
            raise RuntimeError("midway")

        monkeypatch.setattr(failing.engine, "_steps", midway)
        status, text = raw(failing, "POST", "/v1/messages", {"max_tokens": 20, "messages": WEATHER, "stream": True})
        last = text.strip().split("\n\n")[-1].split("\n")
        assert status == 200 and last[0] == "event: error"
        assert json.loads(last[1].removeprefix("data: "))["error"] == {"type": "api_error",
                                                                        "message": "generation failed: midway"}


def test_api_key():
    with serving(8, config={"api_key": "sekrit"}) as guarded:
        port = guarded.server_address[1]
        assert raw(guarded, "GET", "/health")[0] == 200  # open
        with pytest.raises(anthropic.AuthenticationError) as refused:
            create(make_client(guarded, "wrong"))
        assert refused.value.body == {"type": "error", "error": {
            "type": "authentication_error", "message": refused.value.body["error"]["message"]}}
        assert create(make_client(guarded, "sekrit"))["stop_reason"] == "end_turn"
        bearer = {"Authorization": "Bearer sekrit"}
        assert raw(guarded, "POST", "/v1/messages/count_tokens", {"messages": WEATHER}, bearer)[0] == 200
        assert error_of(guarded, "POST", "/v1/messages/count_tokens", {"messages": WEATHER})[:2] == (
            401, "authentication_error")
        openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(AuthenticationError) as refused:
            openai.models.list()
        assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
        assert refused.value.body["type"] == "authentication_error"
        openai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekrit", max_retries=0, timeout=30)
        assert [m.id for m in openai.models.list().data] == ["ddtree"]
        assert raw(guarded, "GET", "/v1/models", headers={"x-api-key": "sekrit"})[0] == 200
    assert "sekrit" not in repr(DDTreeConfig(api_key="sekrit"))
    assert DDTreeConfig.from_env({"DDTREE_API_KEY": " k "}).api_key == "k"


def test_serve_takes_an_api_key():
    import argparse

    from ddtree_mlx.cli.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args(["--api-key", "k"]).api_key == "k" and parser.parse_args([]).api_key is None
