"""Reasoning split and XML tool-call parsing on adversarial outputs; any stream split must equal the one-shot parse."""

from __future__ import annotations

import json
import random
import re

import pytest

from qwen35.chat.reasoning import ReasoningStreamParser, is_thinking_prompt, split_reasoning
from qwen35.chat.tool_calls import ToolCallStreamParser, convert_param_value, parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "temp": {"type": "number"},
        "metric": {"type": "boolean"},
        "opts": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "unit": {"type": ["string", "null"], "enum": ["c", "f"]},
    }}}},
    {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
        "path": {"type": "string"}, "content": {"type": "string"},
    }}}},
]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        chunks.append(text[i : i + n])
        i += n
    return chunks


def splits(text: str, seeds: int = 12):
    """Every character alone, the whole text at once, and random chunkings."""
    yield list(text)
    yield [text]
    for seed in range(seeds):
        yield random_chunks(text, random.Random(seed))


def calls_of(tool_calls):
    return [(c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]


def args(**kwargs) -> str:
    return json.dumps(kwargs, ensure_ascii=False)


# (id, output text with thinking on, reasoning, content)
REASONING_CASES = [
    ("plain", "Let me think.\nMore.\n</think>\n\nThe answer is 4.", "Let me think.\nMore.", "The answer is 4."),
    ("leading_think", "<think>\nhmm\n</think>\n\nok", "hmm", "ok"),
    ("leading_newlines", "\n\n<think>\n\nr\n\n\n</think>\n\n\n\nc\n", "r", "c\n"),
    ("truncated", "still thinking about it\n", "still thinking about it\n", None),
    ("truncated_in_end_tag", "almost done\n</thi", "almost done\n</thi", None),
    ("empty_reasoning", "</think>\n\nonly content", None, "only content"),
    ("empty", "", None, None),
    ("only_end_tag", "\n</think>\n\n", None, None),
    ("second_end_tag_is_content", "r</think>c1</think>c2", "r", "c1</think>c2"),
    ("think_not_leading", "x <think> y </think> z", "x <think> y ", " z"),
    ("lookalike_tags", "a </thinker> <tool_callx> <tool_call>x <function", "a </thinker> <tool_callx> <tool_call>x "
     "<function", None),
    ("tool_call_mentioned", "Use a <tool_call> tag? No.\n</think>\n\nAnswer", "Use a <tool_call> tag? No.", "Answer"),
    ("implicit_end", "I need the weather.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "</parameter>\n</function>\n</tool_call>", "I need the weather.",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"),
    ("implicit_end_space_form", "go\n<tool_call> \n\t<function name=\"f\">", "go",
     "<tool_call> \n\t<function name=\"f\">"),
    ("implicit_end_before_close", "a\n<tool_call><function=f></function></tool_call>\n</think>\n\nb", "a",
     "<tool_call><function=f></function></tool_call>\n</think>\n\nb"),
    ("pending_tool_call_truncated", "hmm\n<tool_call>\n<func", "hmm\n<tool_call>\n<func", None),
    ("unicode", "考虑一下 👨‍👩‍👧\n</think>\n\nÉté ✓", "考虑一下 👨‍👩‍👧", "Été ✓"),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), [c[1:] for c in REASONING_CASES],
                         ids=[c[0] for c in REASONING_CASES])
def test_reasoning_split(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    for chunks in splits(text):
        parser = ReasoningStreamParser()
        deltas = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
        streamed = ("".join(d.reasoning for d in deltas) or None, "".join(d.content for d in deltas) or None)
        assert streamed == (reasoning, content), chunks


def test_thinking_off_is_all_content():
    text = "plain answer\n</think>\n\nstill content <tool_call>\n<function=f>"
    assert split_reasoning(text, thinking=False) == (None, text)
    parser = ReasoningStreamParser(thinking=False)
    assert [parser.feed(c).content for c in ("plain ", "answer")] == ["plain ", "answer"]
    assert parser.finish().content == ""


def test_reasoning_stream_holds_only_what_may_be_a_tag():
    parser = ReasoningStreamParser()
    assert parser.feed("Think").reasoning == "Think"
    assert parser.feed(" more\n\n</th").reasoning == " more"  # newlines may precede </think>: held
    delta = parser.feed("ink>\n\nDone")
    assert (delta.reasoning, delta.content) == ("", "Done")


def test_is_thinking_prompt():
    assert is_thinking_prompt("<|im_start|>assistant\n<think>\n")
    assert not is_thinking_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not is_thinking_prompt("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


CALL_PARIS = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"

# (id, content part of the output, expected content, expected [(name, arguments JSON)])
TOOL_CASES = [
    ("no_call", "Just an answer.\n\nWith lines. ", "Just an answer.\n\nWith lines. ", []),
    ("empty", "", None, []),
    ("single", "Let me check.\n\n" + CALL_PARIS, "Let me check.", [("get_weather", args(city="Paris"))]),
    ("typed_values",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n"
     "</parameter>\n<parameter=temp>\n21.5\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=opts>\n"
     "{\"a\": [1, 2, {\"b\": null}], \"s\": \"x</y\"}\n</parameter>\n<parameter=tags>\n[\n  \"warm\",\n  \"dry\"\n]\n"
     "</parameter>\n<parameter=limit>\n10\n</parameter>\n<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", args(city="São Paulo", days=3, temp=21.5, metric=True,
                                 opts={"a": [1, 2, {"b": None}], "s": "x</y"}, tags=["warm", "dry"], limit=10,
                                 unit="c"))]),
    ("strings_stay_strings",
     "<tool_call>\n<function=write_file>\n<parameter=path>\n123\n</parameter>\n<parameter=content>\n"
     "def f():\n    return {\"a\": 1}  # \"quoted\" \\ back\\slash\n\n\tdone\n\n</parameter>\n</function>\n"
     "</tool_call>",
     None, [("write_file", args(path="123", content="def f():\n    return {\"a\": 1}  # \"quoted\" \\ back\\slash"
                                                    "\n\n\tdone\n"))]),
    ("several_calls",
     "Two cities.\n\n" + CALL_PARIS + "\n" + CALL_PARIS.replace("Paris", "Tōkyō 東京"),
     "Two cities.", [("get_weather", args(city="Paris")), ("get_weather", args(city="Tōkyō 東京"))]),
    ("two_functions_one_block",
     "<tool_call>\n<function=get_weather>\n<parameter=days>\n1\n</parameter>\n</function>\n<function=write_file>\n"
     "<parameter=path>\n/tmp/x\n</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", args(days=1)), ("write_file", args(path="/tmp/x"))]),
    ("unterminated_value",
     "ok\n<tool_call>\n<function=write_file>\n<parameter=path>\na.txt\n</parameter>\n<parameter=content>\nline 1\nli",
     "ok", [("write_file", args(path="a.txt", content="line 1\nli"))]),
    ("unterminated_after_parameter",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n",
     None, [("get_weather", args(city="Rome"))]),
    ("unterminated_name", "Calling.\n<tool_call>\n<function=get_wea", "Calling.", []),
    ("unterminated_parameter_name", "<tool_call>\n<function=get_weather>\n<parameter=ci", None,
     [("get_weather", "{}")]),
    ("unknown_function",
     "<tool_call>\n<function=launch_rocket>\n<parameter=count>\n3\n</parameter>\n<parameter=cfg>\n{\"x\": 1}\n"
     "</parameter>\n</function>\n</tool_call>",
     None, [("launch_rocket", args(count="3", cfg="{\"x\": 1}"))]),
    ("unknown_parameter", CALL_PARIS.replace("city", "country"), None, [("get_weather", args(country="Paris"))]),
    ("lookalike_tags", "See <tool_callx> and a < b, <function, <tool_call> then text, <tool_call",
     "See <tool_callx> and a < b, <function, <tool_call> then text, <tool_call", []),
    ("trailing_lt", "a <", "a <", []),
    ("bare_function", "Sure. <function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\nBye",
     "Sure.", [("get_weather", args(city="Oslo"))]),
    ("text_after_calls_dropped", CALL_PARIS + "\nHope that helps!\n<tool_call>\noops",
     None, [("get_weather", args(city="Paris"))]),
    ("duplicate_parameter_first_wins",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n<parameter=city>\nB\n</parameter>\n"
     "</function>\n</tool_call>", None, [("get_weather", args(city="A"))]),
    ("parameter_without_close",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n<parameter=days>\n2\n</function>\n</tool_call>",
     None, [("get_weather", args(city="Lima", days=2))]),
    ("parameter_name_unclosed", "<tool_call>\n<function=get_weather>\n<parameter=city\nX</parameter>\n"
     "<parameter=days>\n5\n</parameter>\n</function>\n</tool_call>", None, [("get_weather", args(days=5))]),
    ("nameless_function_dropped", "<tool_call>\n<function=>\n<parameter=a>\n1\n</parameter>\n</function>\n"
     "</tool_call>\n" + CALL_PARIS, None, [("get_weather", args(city="Paris"))]),
    ("function_name_unclosed_in_block", "<tool_call>\n<function=get_weather</tool_call>\n" + CALL_PARIS,
     None, [("get_weather", args(city="Paris"))]),
    ("parse_fallbacks",
     "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=temp>\nnan\n"
     "</parameter>\n<parameter=metric>\nmaybe\n</parameter>\n<parameter=opts>\n{'a': (1, 2)}\n</parameter>\n"
     "<parameter=tags>\n[1, 2\n</parameter>\n<parameter=limit>\nNull\n</parameter>\n<parameter=unit>\nNULL\n"
     "</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", args(days="three", temp="nan", metric="maybe", opts={"a": [1, 2]}, tags="[1, 2",
                                 limit=None, unit=None))]),
    ("null_prefixes", "<tool_call>\n<function=get_weather>\n<parameter=city>\nnul\n</parameter>\n"
     "<parameter=unit>\nnullish\n</parameter>\n<parameter=days>\n\n</parameter>\n</function>\n</tool_call>",
     None, [("get_weather", args(city="nul", unit="nullish", days=""))]),
    ("newline_trimming", "<tool_call>\n<function=write_file>\n<parameter=content>\n\n\nx\n\n\n</parameter>\n"
     "<parameter=path>p</parameter>\n</function>\n</tool_call>",
     None, [("write_file", args(content="\n\nx\n\n", path="p"))]),
    ("tool_call_without_function_is_content", "<tool_call>\n{\"name\": \"get_weather\"}\n</tool_call>",
     "<tool_call>\n{\"name\": \"get_weather\"}\n</tool_call>", []),
]


def stream(text: str, chunks, tools=TOOLS):
    """Feed `chunks`; check the delta protocol; return (content, calls) rebuilt from the deltas, and the parser."""
    parser = ToolCallStreamParser(tools)
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    content, calls, seen_tool_delta = "", {}, False
    for delta in deltas:
        if "content" in delta:
            assert not seen_tool_delta, "content after a tool call delta"
            content += delta["content"]
            continue
        seen_tool_delta = True
        (call,) = delta["tool_calls"]
        if call["index"] not in calls:
            assert call["index"] == len(calls)
            assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
            calls[call["index"]] = [call["function"]["name"], call["function"]["arguments"]]
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            calls[call["index"]][1] += call["function"]["arguments"]
    return content or None, [tuple(calls[i]) for i in range(len(calls))], parser


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in TOOL_CASES], ids=[c[0] for c in TOOL_CASES])
def test_tool_calls(text, content, calls):
    result = parse_tool_calls(text, TOOLS)
    assert (result.content, calls_of(result.tool_calls)) == (content, calls)
    for call in result.tool_calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    for chunks in splits(text):
        streamed_content, streamed_calls, parser = stream(text, chunks)
        assert (streamed_content, streamed_calls) == (content, calls), chunks
        final = parser.result()
        assert (final.content, calls_of(final.tool_calls)) == (content, calls)
        assert parser.has_tool_calls == bool(calls)


def test_no_half_tag_is_ever_content():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Hello <") == [{"content": "Hello"}]
    assert parser.feed("tool_c") == []
    assert parser.feed("all>\n") == []
    out = parser.feed("<function=get_weather>\n<parameter=city>\nPa")
    assert [list(d) for d in out] == [["tool_calls"]]
    header = out[0]["tool_calls"][0]
    assert (header["index"], header["function"]["name"]) == (0, "get_weather")
    assert header["function"]["arguments"] == '{"city": "Pa'  # string values stream as they arrive
    assert parser.feed("ris\n</parameter>") == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ris"'}}]}]
    closing = parser.feed("\n</function>\n</tool_call>")
    assert closing == [{"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}]
    assert parser.finish() == []


def test_lookalike_tag_is_released():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("x <tool_call") == [{"content": "x"}]
    assert parser.feed("x>") == [{"content": " <tool_callx>"}]


def test_tools_inside_unfinished_reasoning():
    """Thinking on, no </think>: the call ends the reasoning implicitly and the tool parser gets the content."""
    text = "The user wants weather.\nI'll call the tool.\n\n" + CALL_PARIS.replace("Paris", "Nice\nFrance")
    reasoning, content = split_reasoning(text)
    assert reasoning == "The user wants weather.\nI'll call the tool."
    result = parse_tool_calls(content, TOOLS)
    assert (result.content, calls_of(result.tool_calls)) == (None, [("get_weather", args(city="Nice\nFrance"))])
    for chunks in splits(text):
        thinking, tools = ReasoningStreamParser(), ToolCallStreamParser(TOOLS)
        streamed_reasoning, deltas = "", []
        for chunk in chunks:
            part = thinking.feed(chunk)
            streamed_reasoning += part.reasoning
            deltas += tools.feed(part.content)
        part = thinking.finish()
        streamed_reasoning += part.reasoning
        deltas += tools.feed(part.content) + tools.finish()
        assert streamed_reasoning == reasoning
        final = tools.result()
        assert (final.content, calls_of(final.tool_calls)) == (None, calls_of(result.tool_calls))


FUZZ_FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "<think>", "</think>",
    "<tool_call>\n<function=get_weather>\n", "<parameter=city>\n", "<parameter=days>\n", "<parameter=opts>\n",
    "get_weather>", "city>", ">", "<", "\n", "\n\n", " ", "x", "null", "12", '{"k": 1}', "é", "<tool_call", "</para",
    "<function", "<function ",
]


@pytest.mark.parametrize("seed", range(4))
def test_random_tag_soup_streams_like_one_shot(seed):
    rng = random.Random(seed)
    for _ in range(150):
        text = "".join(rng.choice(FUZZ_FRAGMENTS) for _ in range(rng.randint(0, 40)))
        chunks = random_chunks(text, rng)
        result = parse_tool_calls(text, TOOLS)
        for call in result.tool_calls:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
        assert stream(text, chunks)[:2] == (result.content, calls_of(result.tool_calls)), text
        parser = ReasoningStreamParser()
        deltas = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
        streamed = ("".join(d.reasoning for d in deltas) or None, "".join(d.content for d in deltas) or None)
        assert streamed == split_reasoning(text), text


@pytest.mark.parametrize(("raw", "schema", "expected"), [
    ("42", {"type": "integer"}, 42),
    ("4.0", {"type": "integer"}, 4),
    ("4.5", {"type": "integer"}, "4.5"),
    ("12345678901234567890", {"type": "number"}, 12345678901234567890),
    ("1e3", {"type": "number"}, 1000),
    ("0.25", {"type": "float"}, 0.25),
    ("inf", {"type": "number"}, "inf"),
    ("false", {"type": "boolean"}, False),
    (" TRUE ", {"type": "bool"}, True),
    ("yes", {"type": "boolean"}, "yes"),
    ('{"k": [1]}', {"type": "object"}, {"k": [1]}),
    ("[1, 'a', None]", {"type": "array"}, [1, "a", None]),
    ("{1, 2}", {"type": "array"}, "{1, 2}"),
    ("NaN", {"type": "object"}, "NaN"),
    ("(1, 2)", {"type": "tuple"}, [1, 2]),
    ("hello world", {"type": "date"}, "hello world"),
    ("null", {"type": "string"}, None),
    ("Null", None, None),
    ("007", {"type": "string"}, "007"),
    ("007", None, "007"),
    ("7", {"enum": ["7", "8"]}, "7"),
    ("7", {"anyOf": [{"type": "null"}, {"type": "integer"}]}, 7),
    ("7", {"type": ["null", "number"]}, 7),
    ("7", {"description": "no type"}, "7"),
])
def test_convert_param_value(raw, schema, expected):
    value = convert_param_value(raw, schema)
    assert value == expected and type(value) is type(expected)
