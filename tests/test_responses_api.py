"""The Responses API (`/v1/responses`) on a real server running the embedded demo model, driven by the official
`openai` client: answers equal the chat route's, input items (instructions, content parts, function calls and
their outputs) reach the template, forced function calls and json_schema outputs validate, streamed events come
in the SDK's order and add up to the non-streamed response, reasoning items, max_output_tokens, and 400s naming the
Responses field."""

import asyncio
import base64
import io
import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from PIL import Image
from pydantic import TypeAdapter

from qwen35.serve.protocol import ChatCompletionChunk, ChatCompletionStreamChoice, DeltaMessage
from qwen35.serve.responses_api import ResponseBuilder, ResponsesRequest, input_messages, response_events
from tests.test_server import Server

MODEL = "demo"
SCRIPT = r"""
import json, socket, sys
import uvicorn
from qwen35.llm import LLM
from qwen35.serve.app import build_app
llm = LLM(max_model_len=1024, max_num_seqs=8)
app = build_app(llm, "demo")
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
                         "required": ["city", "days"], "additionalProperties": False}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "version": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "version"], "additionalProperties": False}
QUESTION = "What does the function `os.path.join` do?"
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("demo", tmp_path_factory.mktemp("responses-logs") / "server.log", script=SCRIPT)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Rome"), args
    assert type(args["days"]) is int and 1 <= args["days"] <= 14, args


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60, **kw)


def check_types(raw: dict) -> Response:
    """The body validates strictly against the SDK's Response model (required fields and literals included)."""
    return Response.model_validate(raw)


def test_text_input_equals_chat_answer(server, client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0, max_tokens=24)
    r = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24)
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert [item.type for item in r.output] == ["message"]
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == chat.usage.total_tokens and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    raw = post(server, {"input": QUESTION, "temperature": 0, "max_output_tokens": 24}).json()
    assert check_types(raw).output_text == r.output_text


def test_instructions_and_message_items(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A sequence."}, {"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    r = client.responses.create(model=MODEL, instructions="Answer briefly.", temperature=0, max_output_tokens=16,
                                input=[{"role": "user", "content": [{"type": "input_text", "text": "What is "},
                                                                    {"type": "input_text", "text": "a list?"}]},
                                       {"type": "message", "role": "assistant",
                                        "content": [{"type": "output_text", "text": "A sequence."}]},
                                       {"role": "user", "content": QUESTION}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.instructions == "Answer briefly."


def test_input_image_equals_chat_image(client):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is this?"}]}])
    r = client.responses.create(model=MODEL, temperature=0, max_output_tokens=8, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "auto"}, {"type": "input_text", "text": "What is this?"}]}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.output_text == chat.choices[0].message.content


def test_turn_items_merge_into_one_assistant_message():
    req = ResponsesRequest(model=MODEL, instructions="Be brief.", input=[
        {"role": "developer", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    assert input_messages(req) == [
        {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Tool.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


def test_required_tool_call_and_round_trip(server, client):
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False, temperature=0, max_output_tokens=60)
    check_types(r.model_dump(mode="json", by_alias=True))
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    check_weather_args(calls[0].arguments)
    # the call and its output go back as input items; the model answers on
    follow = client.responses.create(model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=8, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[item.model_dump() for item in r.output],
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": calls[0].call_id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}],
        tools=[{"type": "function", "function": {k: TOOLS[0][k] for k in ("name", "description", "parameters")}}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == (chat.choices[0].message.content or "")
    named = client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, temperature=0, max_output_tokens=60,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert [item.name for item in named.output if item.type == "function_call"][:1] == ["get_weather"]


def test_json_schema_text_format(client):
    r = client.responses.create(model=MODEL, input="Describe the package as JSON.", temperature=0,
                                max_output_tokens=80, text={"format": {"type": "json_schema", "name": "pkg",
                                                                       "schema": SCHEMA, "strict": True}})
    assert r.status == "completed"
    value = json.loads(r.output_text)
    assert set(value) == {"name", "version"} and isinstance(value["name"], str) and len(value["name"]) <= 12
    assert type(value["version"]) is int and 0 <= value["version"] <= 99
    assert r.text.format.type == "json_schema" and r.text.format.name == "pkg"


def stream_events(server, body) -> list[dict]:
    events = []
    with httpx.stream("POST", server.url + "/v1/responses", json={"model": MODEL, **body, "stream": True},
                      timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                assert events[-1]["type"] == kind
    for e in events:
        EVENTS.validate_python(e)  # strict validation against the SDK's event types
    return events


def test_stream_events_in_order_and_equal_to_whole(server, client):
    body = {"input": QUESTION, "temperature": 0, "max_output_tokens": 24, "ignore_eos": True}
    whole = post(server, body).json()
    events = stream_events(server, body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-4]["text"] == final["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0][
        "text"]
    assert final["status"] == whole["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    for usage in (final["usage"], whole["usage"]):
        usage.pop("input_tokens_details")  # the second request finds the prompt in the prefix cache
    assert final["usage"] == whole["usage"] and final["output"][0]["id"] == events[2]["item"]["id"]
    # the SDK's own stream parsing
    sdk_events = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=24,
                                         stream=True, extra_body={"ignore_eos": True})
    deltas = [e.delta for e in sdk_events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == text


def test_sdk_stream_helper(client):
    # the demo model talks on: a stop string ends the answer (the helper wants response.completed)
    kw = dict(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=100, extra_body={"stop": ["."]})
    whole = client.responses.create(**kw)
    assert whole.status == "completed", "the demo model should write a full stop within 100 tokens"
    with client.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.output_text == whole.output_text
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, temperature=0, max_output_tokens=60) as stream:
        final = stream.get_final_response()
    call = next(item for item in final.output if item.type == "function_call")
    check_weather_args(call.arguments)


def test_streamed_function_call_events(server):
    events = stream_events(server, {"input": "Weather in Paris?", "tools": TOOLS, "tool_choice": "required",
                                    "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60})
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added, done, final = events[2]["item"], events[-2]["item"], events[-1]["response"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
    args = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert args == events[-3]["arguments"] == done["arguments"] and done["call_id"] == added["call_id"]
    check_weather_args(args)
    assert final["output"] == [done] and final["status"] == "completed"


def test_error_mid_stream_is_the_last_event():
    """A failure after the headers went out (here: the chunk stream raising) ends the stream with an `error` event;
    the chunk stream is closed."""
    closed = []

    async def chunks():
        try:
            yield ChatCompletionChunk(id="c", model=MODEL, choices=[ChatCompletionStreamChoice(
                index=0, delta=DeltaMessage(role="assistant", content="Hello"))])
            raise RuntimeError("engine died")
        finally:
            closed.append(True)

    async def collect():
        req = ResponsesRequest(model=MODEL, input="Hi", stream=True)
        return [e async for e in response_events(chunks(), ResponseBuilder(req, MODEL, len))]

    events = [json.loads(e.split("data: ", 1)[1]) for e in asyncio.run(collect())]
    for e in events:
        EVENTS.validate_python(e)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added", "response.output_text.delta", "error"]
    assert events[-1]["message"] == "RuntimeError: engine died" and events[-1]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(6)) and closed == [True]


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[-1].status == "incomplete"


def test_reasoning_items_when_thinking(server, client):
    """effort "high" turns the template's thinking on; the demo model rarely closes its think block, so all output
    is reasoning: a reasoning item with the text, counted as reasoning tokens."""
    r = client.responses.create(model=MODEL, input=QUESTION, reasoning={"effort": "high"}, temperature=0,
                                max_output_tokens=12, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                          reasoning_effort="high", temperature=0, max_tokens=12,
                                          extra_body={"ignore_eos": True})
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == chat.choices[0].message.reasoning_content
    assert 0 < r.usage.output_tokens_details.reasoning_tokens <= 12 and r.reasoning.effort == "high"
    events = stream_events(server, {"input": QUESTION, "reasoning": {"effort": "high"}, "temperature": 0,
                                    "max_output_tokens": 12, "ignore_eos": True})
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == r.output[0].content[0].text
    assert "response.reasoning_text.done" in [e["type"] for e in events]
    # effort "none": no thinking, no reasoning item
    r = client.responses.create(model=MODEL, input=QUESTION, reasoning={"effort": "none"}, temperature=0,
                                max_output_tokens=4, extra_body={"ignore_eos": True})
    assert [item.type for item in r.output] == ["message"]


def test_openapi_documents_the_body(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "max_output_tokens" in doc["components"]["schemas"]["ResponsesRequest"]["properties"]
    assert "ChatCompletionRequest" in doc["components"]["schemas"]  # the app's own bodies are still there


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, "text.format"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "other"}, "model"),
], ids=["tool-type", "previous-response", "no-schema", "bad-schema", "format-type", "tool-choice", "item-type",
        "file-id", "max-tokens", "model"])
def test_bad_requests_name_the_field(server, body, param):
    r = post(server, {"input": "Hi", **body})
    assert r.status_code == (404 if param == "model" else 400), r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert httpx.get(server.url + "/health").status_code == 200
