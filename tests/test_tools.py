"""OpenAI tool calling, reasoning and agent-style messages, with the official openai client against a server on
the scripted target (scripted_model.py) at tree budgets 1 and 8, so markers land inside and across cycles."""

import http.client
import json

import pytest
from openai import BadRequestError, OpenAI
from scripted_model import WEATHER_TOOL, make_tokenizer, serving

from ddtree_mlx.serving.conversation import Rendered
from ddtree_mlx.serving.output import Output
from ddtree_mlx.serving.schema import Request

WEATHER = [{"role": "user", "content": "what is the weather"}]
SAID = "Let me check. "
CALL_TEXT = '<tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}} </tool_call>'


@pytest.fixture(scope="module", params=[1, 8], ids=["budget1", "budget8"])
def client(request):
    with serving(request.param) as server:
        yield OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                     timeout=30)


@pytest.fixture(scope="module")
def plain_client():
    """A server whose tokenizer has no tool-call format (as the embedded SmolLM2)."""
    with serving(8, tokenizer=make_tokenizer(tools=False)) as server:
        yield OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                     timeout=30)


def create(client, messages=WEATHER, **kwargs):
    return client.chat.completions.create(model="m", messages=messages, **kwargs).to_dict()


def stream(client, messages=WEATHER, **kwargs):
    return [c.to_dict() for c in client.chat.completions.create(model="m", messages=messages, stream=True, **kwargs)]


def assembled(chunks):
    """The message and finish_reason a client builds from the chunks."""
    message, finish = {"role": "assistant"}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            for key in ("content", "reasoning_content"):
                if delta.get(key):
                    message[key] = message.get(key, "") + delta[key]
            for call in delta.get("tool_calls") or []:
                assert call.pop("index") == len(message.setdefault("tool_calls", []))
                message["tool_calls"].append(call)
            finish = choice["finish_reason"] or finish
    return message, finish


def without_ids(message):
    return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls", [])]}


def check_call(call):
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}


def test_tool_call_create_and_stream(client):
    response = create(client, tools=[WEATHER_TOOL])
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == SAID and len(message["tool_calls"]) == 1
    check_call(message["tool_calls"][0])
    assert response["usage"]["completion_tokens"] == 11  # ten words and <eos>

    chunks = stream(client, tools=[WEATHER_TOOL], stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in chunks[1:-2]]
    assert kinds[-1] == "tool_calls" and set(kinds[:-1]) == {"content"}  # text streamed before the call
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 11
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt came before
    streamed, finish = assembled(chunks)
    assert finish == "tool_calls" and without_ids(streamed) == without_ids(message)


def test_tool_result_round_trip(client):
    call = create(client, tools=[WEATHER_TOOL])["choices"][0]["message"]["tool_calls"][0]
    messages = [{"role": "developer", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": " brief"}]},
                *WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": [{"type": "text", "text": "sunny"}]}]
    response = create(client, messages, tools=[WEATHER_TOOL])
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "The forecast says fine."}
    assert response["choices"][0]["finish_reason"] == "stop"
    assert assembled(stream(client, messages, tools=[WEATHER_TOOL])) == (response["choices"][0]["message"], "stop")


def test_tool_choice(client):
    # none: the tools are not rendered and a call the model writes stays text.
    response = create(client, tools=[WEATHER_TOOL], tool_choice="none")
    assert response["choices"][0]["message"] == {"role": "assistant", "content": SAID + CALL_TEXT}
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"]["prompt_tokens"] == create(client)["usage"]["prompt_tokens"]
    hello = [{"role": "user", "content": "hello"}]
    assert create(client, hello, tools=[WEATHER_TOOL])["choices"][0]["message"]["content"] == "Hi there!"
    # required and a named function: the assistant turn starts with the marker (and the name).
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = create(client, hello, tools=[WEATHER_TOOL], tool_choice=choice)
        message = response["choices"][0]["message"]
        assert message["content"] is None and response["choices"][0]["finish_reason"] == "tool_calls"
        check_call(message["tool_calls"][0])
        streamed, finish = assembled(stream(client, hello, tools=[WEATHER_TOOL], tool_choice=choice))
        assert finish == "tool_calls" and without_ids({**streamed, "content": None}) == without_ids(message)


def test_call_cut_by_max_tokens_stays_text(client):
    response = create(client, tools=[WEATHER_TOOL], max_tokens=6)
    want = {"role": "assistant", "content": SAID + '<tool_call> {"name": "get_weather",'}
    assert response["choices"][0]["message"] == want and response["choices"][0]["finish_reason"] == "length"
    assert assembled(stream(client, tools=[WEATHER_TOOL], max_tokens=6)) == (want, "length")
    # Cut by a stop string: the call never ended, so it stays text too.
    response = create(client, tools=[WEATHER_TOOL], stop=["</tool_call>"])
    assert response["choices"][0]["message"]["content"] == SAID + CALL_TEXT[: -len("</tool_call>")]
    assert response["choices"][0]["finish_reason"] == "stop"


def test_reasoning(client):
    ponder = [{"role": "user", "content": "ponder"}]
    response = create(client, ponder)
    want = {"role": "assistant", "content": " Bring an umbrella.", "reasoning_content": " hmm, rain? "}
    assert response["choices"][0]["message"] == want
    assert assembled(stream(client, ponder)) == (want, "stop")


@pytest.mark.parametrize("fields,param", [
    ({"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}]}, "messages"),
])
def test_refusals(client, fields, param):
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(**{"model": "m", "messages": WEATHER, **fields})
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def test_tools_need_a_tool_format(plain_client):
    with pytest.raises(BadRequestError) as refused:
        create(plain_client, tools=[WEATHER_TOOL])
    assert refused.value.body["param"] == "tools"
    # tool_choice none renders no tools, so it is served.
    assert create(plain_client, tools=[WEATHER_TOOL], tool_choice="none")["choices"][0]["finish_reason"] == "stop"


def output(tools=(WEATHER_TOOL,), parallel=True):
    request = Request("chat", WEATHER, None, False, [], {}, tools=list(tools) or None, tool_choice="auto",
                      parallel_tool_calls=parallel)
    return Output(make_tokenizer(), request, Rendered([]))


def run(out, text, step=3):
    """The events of `text` fed a few characters at a time, consecutive texts joined."""
    events = []
    for event in [e for i in range(0, len(text), step) for e in out.take(text[i:i + step], False)] + out.take("", True):
        if events and event.kind == "text" == events[-1].kind:
            events[-1].text += event.text
        else:
            events.append(event)
    return events


def test_output_parsing():
    two = f"a {CALL_TEXT} b {CALL_TEXT.replace('Paris', 'Oslo')}"
    events = run(out := output(), two)
    assert [e.kind for e in events] == ["text", "call", "text", "call"]
    assert [e.call.arguments["city"] for e in events if e.call] == ["Paris", "Oslo"]
    assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"
    events = run(out := output(parallel=False), two)  # parallel_tool_calls false: the first call only
    assert [e.kind for e in events] == ["text", "call", "text"] and out.calls == 1
    bad = "<tool_call> {not json} </tool_call> done"
    out = output()
    assert [(e.kind, e.text) for e in run(out, bad)] == [("text", bad)]
    assert out.finish_reason("stop") == "stop"
    assert [(e.kind, e.text) for e in run(output(tools=()), two)] == [("text", two)]  # no tools: all text
    partial = "x <tool_ca"  # a marker's start held back, then given back as text at the end
    out = output()
    assert [e.text for e in out.take(partial, False)] == ["x "] and out.take("", True)[0].text == "<tool_ca"


def test_failure_mid_stream(monkeypatch):
    with serving(8, config={"max_batch": 1}) as failing:  # one at a time (test_batch_server.py: a batch's)
        steps = type(failing.engine)._steps

        def midway(job):
            yield next(iter(steps(failing.engine, job)))
            raise RuntimeError("midway")

        monkeypatch.setattr(failing.engine, "_steps", midway)
        connection = http.client.HTTPConnection("127.0.0.1", failing.server_address[1], timeout=30)
        connection.request("POST", "/v1/chat/completions", json.dumps({"messages": WEATHER, "stream": True}))
        response = connection.getresponse()
        last = response.read().decode().strip().split("\n\n")[-1]
        assert response.status == 200 and json.loads(last.removeprefix("data: "))["error"] == {
            "message": "generation failed: midway", "type": "server_error", "param": None, "code": None}
