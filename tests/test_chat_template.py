"""Rendering the shipped Qwen3.5 chat template: spec examples, tools, thinking, multi-turn, errors, HF parity."""

from __future__ import annotations

import json

import pytest

from qwen35.chat.template import ChatTemplate, ChatTemplateError, render_chat_template
from tokenizer_fixtures import CHAT_TEMPLATE_PATH

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Météo actuelle — 天气 <b>now</b> & later",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

TOOL_INSTRUCTIONS = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified "
    "format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural "
    "language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question "
    "like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>"
)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate(CHAT_TEMPLATE_PATH.read_text("utf-8"), eos_token="<|im_end|>")


def tool_loop_messages(arguments):
    return [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "…reasoning…",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
    ]


# The three rendered examples of spec vision-and-io §6.5, verbatim.
def test_spec_single_turn_with_image(template):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                             {"type": "text", "text": "What is this?"}]}]
    assert template.render(messages, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_spec_multi_turn_thinking_off(template):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "old answer", "reasoning_content": "old reasoning is dropped"},
        {"role": "user", "content": "q2"},
    ]
    assert template.render(messages, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nold answer<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize("arguments", [{"city": "Paris"}, '{"city": "Paris"}'], ids=["mapping", "json_string"])
def test_spec_tool_loop(template, arguments):
    assert template.render(tool_loop_messages(arguments)) == (
        "<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n<think>\n…reasoning…\n</think>\n\n"
        "<tool_call>\n<function=lookup>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response><|im_end|>\n"
    )


def test_tools_system_block(template):
    messages = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "hi"}]
    text = template.render(messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
        + json.dumps(WEATHER_TOOL, ensure_ascii=False)
        + "\n</tools>" + TOOL_INSTRUCTIONS + "\n\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert "Météo actuelle — 天气 <b>now</b> & later" in text  # tojson keeps non-ASCII and does not HTML-escape


def test_system_without_tools(template):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert template.render(messages) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


@pytest.mark.parametrize(("enable_thinking", "suffix"), [
    (None, "<think>\n"), (True, "<think>\n"), (False, "<think>\n\n</think>\n\n"),
])
def test_generation_prompt(template, enable_thinking, suffix):
    text = template.render([{"role": "user", "content": "x"}], add_generation_prompt=True,
                           enable_thinking=enable_thinking)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n" + suffix


def test_multi_turn_agent_loop(template):
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nfirst answer"},
        {"role": "user", "content": "plan a trip"},
        {"role": "assistant", "content": "Checking.", "reasoning": "need weather",
         "tool_calls": [
             {"type": "function", "function": {"name": "lookup", "arguments": {"city": "Zürich", "days": 2}}},
             {"type": "function", "function": {"name": "book", "arguments": {
                 "trip": {"to": "Zürich", "nights": [1, 2]}, "confirm": True, "note": None, "price": 9.5}}},
         ]},
        {"role": "tool", "content": [{"type": "text", "text": "rain"}]},
        {"role": "tool", "content": "booked"},
        {"role": "assistant", "content": "Pack an umbrella.", "reasoning_content": "  rain expected \n"},
    ]
    assert template.render(messages) == (
        "<|im_start|>user\nfirst question<|im_end|>\n<|im_start|>assistant\nfirst answer<|im_end|>\n"
        "<|im_start|>user\nplan a trip<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nneed weather\n</think>\n\nChecking.\n\n"
        "<tool_call>\n<function=lookup>\n<parameter=city>\nZürich\n</parameter>\n<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=book>\n<parameter=trip>\n{\"to\": \"Zürich\", \"nights\": [1, 2]}\n</parameter>\n"
        "<parameter=confirm>\nTrue\n</parameter>\n<parameter=note>\nNone\n</parameter>\n"
        "<parameter=price>\n9.5\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\nbooked\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n<think>\nrain expected\n</think>\n\nPack an umbrella.<|im_end|>\n"
    )


def test_video_and_vision_ids(template):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video", "video": "v.mp4"},
                                             {"image": "b.png"}, {"type": "text", "text": "compare"}]}]
    assert template.render(messages, add_vision_id=True) == (
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>compare<|im_end|>\n"
    )


def test_rich_objects_become_placeholders(template):
    class Image:  # stands for a decoded image: the template only checks the key
        def save(self, path): raise AssertionError("the template must never reach this")

    messages = [{"role": "user", "content": [{"type": "image", "image": Image()}, {"type": "text", "text": "x"}]}]
    assert "<|image_pad|>" in template.render(messages)


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "System message must be at the beginning"),
    ([{"role": "assistant", "content": "a"}], "No user query found"),
    ([{"role": "user", "content": "a"}, {"role": "developer", "content": "d"}], "Unexpected message role"),
    ([], "No messages provided"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "Unexpected item type"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "user", "content": "u"}],
     "System message cannot contain images"),
    ([{"role": "user", "content": 5}], "Unexpected content type"),
], ids=["system_not_first", "no_user", "developer_role", "empty", "unknown_part", "system_image", "int_content"])
def test_template_rejections(template, messages, match):
    with pytest.raises(ChatTemplateError, match=rf"chat template rejected the messages: {match}.*template line \d+"):
        template.render(messages)


@pytest.mark.parametrize(("arguments", "match"), [
    ("{not json", r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ("[1, 2]", r"messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a JSON object"),
])
def test_bad_tool_call_arguments(template, arguments, match):
    with pytest.raises(ChatTemplateError, match=match):
        template.render(tool_loop_messages(arguments))


@pytest.mark.parametrize(("messages", "match"), [
    ("hello", "messages must be a list"),
    ([{"content": "no role"}], r"messages\[0\] has no string 'role'"),
    (["just text"], r"messages\[0\] must be an object"),
])
def test_bad_message_shapes(template, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        template.render(messages)


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if x %}")


def test_runtime_failures_are_wrapped():
    with pytest.raises(ChatTemplateError, match=r"TypeError: .*template line 1"):
        render_chat_template("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render_chat_template("{% set ns = namespace(_secret=1) %}", [])


def test_environment_matches_hf():
    source = (
        "{%- for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}\n"
        "{% generation %}{{ tools | tojson(indent=1) }}{% endgeneration %}|{{ bos_token }}|{{ eos_token }}|"
        "{{ custom }}|{{ strftime_now('%Y') | length }}|{{ 'x' | tojson }}"
    )
    text = render_chat_template(source, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                tools=[{"k": "é<"}], eos_token="E", custom=7)
    # trim_blocks eats the newline after {% endfor %}; break works; tojson keeps é and < as they are.
    assert text == 'a[\n {\n  "k": "é<"\n }\n]|None|E|7|4|"x"'


def test_matches_transformers_rendering(template):
    """The same inputs through transformers' apply_chat_template machinery give the same text."""
    render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    conversations = [
        (tool_loop_messages({"city": "Paris", "days": 3}), {"tools": [WEATHER_TOOL]}),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "<think>r</think>\n\nok"}, {"role": "user", "content": "more"}],
         {"add_generation_prompt": True, "enable_thinking": False}),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " spaced "}]}],
         {"add_generation_prompt": True, "add_vision_id": True}),
    ]
    for messages, kwargs in conversations:
        expected = render_jinja_template([messages], chat_template=template.source, **kwargs)[0][0]
        assert template.render(messages, **kwargs) == expected
