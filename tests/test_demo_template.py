"""qwen35's own chat template (used by the embedded demo model) renders the Qwen3.5 format exactly like the
template shipped with Qwen3.5 checkpoints, for text conversations."""

from pathlib import Path

import pytest

from qwen35.chat.template import ChatTemplate
from tests.tokenizer_fixtures import CHAT_TEMPLATE_PATH

OURS = ChatTemplate((Path(__file__).parents[1] / "qwen35" / "data" / "chat_template.jinja").read_text())
REAL = ChatTemplate(CHAT_TEMPLATE_PATH.read_text())
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "parts": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "image_url", "image_url": {}},
                                           {"type": "text", "text": "this?"}]}],
    "multi-turn": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": "q2"}],
    "old reasoning": [{"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nold answer"},
                      {"role": "user", "content": "q2"}],
    "tool loop": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": "", "reasoning_content": "need a lookup",
                   "tool_calls": [{"type": "function", "function": {"name": "lookup",
                                                                    "arguments": {"city": "Paris", "n": [1, 2]}}},
                                  {"type": "function", "function": {"name": "lookup", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"}],
    "tool then answer": [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "content": "Let me check.",
                          "tool_calls": [{"function": {"name": "lookup", "arguments": {"city": "Rome"}}}]},
                         {"role": "tool", "content": "hot"},
                         {"role": "assistant", "content": "It is hot.", "reasoning_content": "easy"},
                         {"role": "user", "content": "thanks"}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"add_generation_prompt": False}],
                         ids=["thinking", "no thinking", "no generation prompt"])
def test_same_rendering_as_the_released_template(name, tools, kwargs):
    kw = {"add_generation_prompt": True, **kwargs}
    assert OURS.render(CONVERSATIONS[name], tools=tools, **kw) == REAL.render(CONVERSATIONS[name], tools=tools, **kw)
