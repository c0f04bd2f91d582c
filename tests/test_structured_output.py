"""Structured output through a real server on the embedded demo model, driven by the official `openai` client:
`chat.completions.parse` with pydantic models, json_object, regex / choice / Lark / GBNF constraints in each
spelling on chat and completions, forced tool calls whose arguments validate against their schemas, streaming,
a constraint that starts after the thinking, and 400s naming the bad field."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from qwen35.demo import demo_checkpoint
from qwen35.engine.structured import StructuredOutputs
from qwen35.sampling_params import StructuredOutputsParams
from qwen35.serve.constraints import tool_call_grammar
from qwen35.tokenizer import Tokenizer
from tests.test_server import Server
from tests.test_structured_engine import accepts as engine_accepts

SERVER = r"""
import socket
import uvicorn
from qwen35.llm import LLM
from qwen35.serve.app import build_app
app = build_app(LLM(max_model_len=1024), "demo")
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server("demo", tmp_path_factory.mktemp("so-server") / "server.log", script=SERVER)
    try:
        yield s.wait_ready().url
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


# ---- pydantic models through chat.completions.parse --------------------------------------------------------------

class Kind(str, Enum):
    module = "module"
    klass = "class"
    function = "function"


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties false, as OpenAI's strict schemas require
    name: str = Field(min_length=1, max_length=8)
    visibility: Literal["public", "private"]


class ModuleDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=2, max_length=12)
    kind: Kind
    members: list[Member] = Field(min_length=1, max_length=2)
    tags: list[Literal["io", "math", "text"]] = Field(max_length=3)
    version: int | None = None
    note: str | None = Field(default=None, max_length=6)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3, "n": 3},
                                      {"temperature": 1.2, "seed": 11, "n": 3}])
def test_parse_returns_valid_pydantic_instances(client, sampling):
    completion = client.chat.completions.parse(model="demo", messages=user("Describe the json module."),
                                               response_format=ModuleDoc, max_tokens=200, **sampling)
    assert len(completion.choices) == sampling.get("n", 1)
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, ModuleDoc)
        assert ModuleDoc.model_validate_json(choice.message.content) == choice.message.parsed
        assert json.loads(choice.message.content) == choice.message.parsed.model_dump(mode="json")


@pytest.fixture(scope="module")
def local():
    """Grammars over the demo tokenizer in this process: an independent check of what the server sent."""
    tokenizer = Tokenizer.from_dir(demo_checkpoint())
    return StructuredOutputs(tokenizer, 10816), tokenizer


def accepts(local, c: StructuredOutputsParams, text: str) -> bool:
    so, tokenizer = local
    return engine_accepts(so, c, tokenizer, text)


def test_json_object_outputs_are_objects_or_their_prefixes(client, local):
    """A weak model rambles inside free strings and mostly runs out of tokens: each output is a JSON object, or
    (finish_reason "length") the prefix of one, checked by an independent matcher."""
    r = client.chat.completions.create(model="demo", messages=user("Give a JSON object."), seed=1, n=4,
                                       temperature=1.0, max_tokens=60, response_format={"type": "json_object"})
    any_object = StructuredOutputsParams(json_object=True)
    for c in r.choices:
        text = c.message.content
        assert text.startswith("{") and accepts(local, any_object, text), text
        if c.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert c.finish_reason == "length" and not accepts(local, any_object, text + '"]')  # the check can fail
    done = client.chat.completions.create(model="demo", messages=user("Give a JSON object."), temperature=0,
                                          max_tokens=20, extra_body={"structured_outputs": {"json": {
                                              "type": "object", "maxProperties": 0}}}).choices[0]
    assert done.finish_reason == "stop" and json.loads(done.message.content) == {}


# ---- regex, choice, Lark and GBNF in each spelling, on chat and completions --------------------------------------

LARK = 'start: NUM | NUM "+" NUM | NUM "+" NUM "+" NUM\nNUM: /[0-9]{1,2}/'
GBNF = 'root ::= answer " " digit digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
CONSTRAINTS = [
    ({"structured_outputs": {"regex": r"[a-z]{2,5}-[0-9]{3}"}}, r"[a-z]{2,5}-[0-9]{3}"),
    ({"guided_regex": r"(true|false), [A-Z][a-z]{1,4}"}, r"(true|false), [A-Z][a-z]{1,4}"),
    ({"structured_outputs": {"choice": ["red", "green", "blue"]}}, r"red|green|blue"),
    ({"guided_choice": ["list", "dict", "tuple", "set"]}, r"list|dict|tuple|set"),
    ({"guided_grammar": LARK}, r"[0-9]{1,2}(\+[0-9]{1,2}){0,2}"),
    ({"structured_outputs": {"grammar": LARK}}, r"[0-9]{1,2}(\+[0-9]{1,2}){0,2}"),
    ({"guided_grammar": GBNF}, r"(yes|no) [0-9]{2}"),
]


@pytest.mark.parametrize("body, pattern", CONSTRAINTS)
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_regex_choice_and_grammars(client, route, body, pattern):
    kw = dict(model="demo", max_tokens=30, temperature=1.0, seed=2, n=3, extra_body=body)
    if route == "chat":
        texts = [(c.message.content, c.finish_reason) for c in client.chat.completions.create(
            messages=user("Answer briefly."), **kw).choices]
    else:
        texts = [(c.text, c.finish_reason) for c in client.completions.create(prompt="The answer is", **kw).choices]
    for text, reason in texts:
        assert reason == "stop" and re.fullmatch(pattern, text), (text, reason)


def test_json_schema_on_completions(client):
    schema = Member.model_json_schema()
    for spelling in ({"response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": schema}}},
                     {"guided_json": schema}, {"structured_outputs": {"json": json.dumps(schema)}}):
        r = client.completions.create(model="demo", prompt="A member of the os module:", max_tokens=40, temperature=0,
                                      extra_body=spelling)
        assert r.choices[0].finish_reason == "stop"
        Member.model_validate_json(r.choices[0].text)


# ---- forced tool calls -------------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "fetch_docs", "description": "Fetch module documentation",
                                      "parameters": {"type": "object", "properties": {
                                          "module": {"type": "string", "enum": ["json", "os", "re"]},
                                          "limit": {"type": "integer", "minimum": 5, "maximum": 50},
                                          "options": {"type": "object", "properties": {
                                              "lang": {"type": "string", "enum": ["en", "fr"]},
                                              "depth": {"type": "integer", "minimum": 0, "maximum": 3}},
                                              "required": ["lang", "depth"], "additionalProperties": False},
                                          "verbose": {"type": "boolean"}},
                                          "required": ["module", "limit", "options"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer", "minimum": 1, "maximum": 999},
                                          "b": {"type": "integer", "minimum": -9, "maximum": 9}},
                                          "required": ["a", "b"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_calls(calls):
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", False), ({"type": "function", "function": {"name": "fetch_docs"}}, False),
    ({"type": "function", "function": {"name": "add"}}, False)])
def test_forced_tool_calls_validate_against_their_schemas(client, tool_choice, parallel):
    # with parallel calls a weak model may go on calling until max_tokens; this seed stops
    r = client.chat.completions.create(model="demo", messages=user("Look up the json docs."), tools=TOOLS,
                                       tool_choice=tool_choice, parallel_tool_calls=parallel, max_tokens=150,
                                       temperature=1.0, seed=4, n=3)
    for c in r.choices:
        if not parallel:
            assert len(c.message.tool_calls) == 1
        assert c.finish_reason == "tool_calls", c.message
        check_calls(c.message.tool_calls)
        if isinstance(tool_choice, dict):
            assert {call.function.name for call in c.message.tool_calls} == {tool_choice["function"]["name"]}


def test_tool_call_json_values_are_compact(local):
    """Non-string parameters are compact JSON, as response formats are: free whitespace let the demo model pad a
    nested object with newlines until max_tokens."""
    so, tokenizer = local
    grammar = tool_call_grammar(TOOLS, "fetch_docs", False, tokenizer.added_tokens)
    head = "<tool_call>\n<function=fetch_docs>\n<parameter=module>\njson\n</parameter>\n" \
           "<parameter=limit>\n7\n</parameter>\n<parameter=options>\n"
    c = StructuredOutputsParams(grammar=grammar)
    assert accepts(local, c, head + '{"lang":"en","depth":2}\n</parameter>\n</function>\n</tool_call>')
    assert not accepts(local, c, head + '{\n"lang"')
    assert not accepts(local, c, head + '{"lang": "en"')
    assert not accepts(local, c, head.replace("7", "4"))  # minimum 5


def test_parallel_forced_calls_all_validate(client):
    """With parallel calls allowed, the demo model goes on calling until max_tokens: every call but a cut-off
    last one validates."""
    r = client.chat.completions.create(model="demo", messages=user("Look up the docs."), tools=TOOLS,
                                       tool_choice="required", max_tokens=120, temperature=0).choices[0]
    calls = r.message.tool_calls
    assert r.finish_reason in ("tool_calls", "length") and len(calls) >= 2
    check_calls(calls if r.finish_reason == "tool_calls" else calls[:-1])


def test_tool_call_string_lengths_are_enforced(local):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 5}, "t": {"type": "string", "maxLength": "x"}},
        "required": ["s", "t"]}}}]
    c = StructuredOutputsParams(grammar=tool_call_grammar(tools, None, False, local[1].added_tokens))
    local[0].compile(c)

    def call(s):
        return f"<tool_call>\n<function=f>\n<parameter=s>\n{s}\n</parameter>\n<parameter=t>\nfree text"
    assert accepts(local, c, call("ab")) and accepts(local, c, call("a\nbcd"))
    assert not accepts(local, c, call("a")) and not accepts(local, c, call("abcdef"))


def test_one_call_without_parallel_calls_and_streamed_calls_assemble_to_the_same(client):
    kw = dict(model="demo", messages=user("Look up the os docs."), tools=TOOLS, tool_choice="required",
              parallel_tool_calls=False, max_tokens=150, temperature=0)
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
    check_calls(r.message.tool_calls)
    calls, reason = {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reason = ch.finish_reason or reason
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
    want = r.message.tool_calls[0].function
    assert reason == "tool_calls" and list(calls.values()) == [{"name": want.name, "arguments": want.arguments}]


# ---- streaming and thinking --------------------------------------------------------------------------------------

def test_streamed_schema_output_equals_the_unstreamed(client):
    kw = dict(model="demo", messages=user("Describe the os module."), temperature=0, max_tokens=200,
              response_format={"type": "json_schema", "json_schema": {
                  "name": "doc", "schema": ModuleDoc.model_json_schema(), "strict": True}})
    full = client.chat.completions.create(**kw).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
             if ch.choices]
    assert "".join(parts) == full and len([p for p in parts if p]) > 3
    ModuleDoc.model_validate_json(full)


def test_reasoning_is_free_and_the_answer_after_it_constrained(client, server):
    """The demo model seldom closes its think block: a bias on `</think>` (and against ending while thinking)
    makes it close after some free text, which no JSON grammar would allow, then answer under the schema."""
    end, eos = ([t for s in specials for t in httpx.post(server + "/tokenize", json={"prompt": s}).json()["tokens"]]
                for specials in (["</think>"], ["<|im_end|>", "<|endoftext|>"]))
    assert len(end) == 1 and len(eos) == 2
    r = client.chat.completions.create(
        model="demo", messages=user("Describe the json module."), temperature=0, max_tokens=200, logprobs=True,
        response_format={"type": "json_schema", "json_schema": {"name": "doc",
                                                                 "schema": ModuleDoc.model_json_schema()}},
        logit_bias={str(end[0]): 4.5, **{str(t): -100 for t in eos}},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}}).choices[0]
    tokens = [t.token for t in r.logprobs.content]
    assert "</think>" in tokens, tokens[:20]
    reasoning = "".join(tokens[:tokens.index("</think>")])
    assert len(reasoning.strip()) > 10 and not reasoning.lstrip().startswith("{")
    assert r.message.reasoning_content.strip() == reasoning.strip()
    assert r.finish_reason == "stop"
    ModuleDoc.model_validate_json(r.message.content)


# ---- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}}, "response_format"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ({"guided_regex": "[z-a]"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": {"type": "string", "minLength": 5, "maxLength": 2}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"allowed_token_ids": [10816]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_bad_constraints_are_400s_naming_the_field(server, route, body, param):
    base = {"model": "demo", "max_tokens": 4}
    base.update({"messages": user("hi")} if route == "chat" else {"prompt": "hi"})
    r = httpx.post(f"{server}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                   json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_concurrent_constrained_and_free_requests_match_each_run_alone(client):
    """Greedy requests batched together on the server (constrained and not) give what each gives alone."""
    reqs = [dict(messages=user("What is a tuple?"), max_tokens=12),
            dict(messages=user("Describe the os module."), max_tokens=120, response_format={
                "type": "json_schema", "json_schema": {"name": "doc", "schema": ModuleDoc.model_json_schema()}}),
            dict(messages=user("Pick one."), max_tokens=8, extra_body={"guided_choice": ["int", "str", "bytes"]}),
            dict(messages=user("Say something."), max_tokens=12, extra_body={"guided_regex": "[a-z ]{3,20}"})]

    def run(kw):
        return client.chat.completions.create(model="demo", temperature=0, **kw).choices[0].message.content

    alone = [run(kw) for kw in reqs]
    with ThreadPoolExecutor(len(reqs)) as ex:
        together = list(ex.map(run, reqs))
    assert together == alone
    ModuleDoc.model_validate_json(alone[1])


def test_a_request_no_token_can_continue_gets_its_reason(server):
    r = httpx.post(server + "/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": user("yes or no?"), "max_tokens": 5, "temperature": 0,
        "guided_choice": ["yes", "no"], "allowed_token_ids": [150]})
    assert "no token can be sampled" in r.json()["error"]["message"], r.text
