"""`qwen35 chat`'s REPL driven with scripted input on the embedded demo model: timing line, commands, block input,
/save and /load, the hidden-reasoning indicator, the thinking default and the readline history file."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwen35 import LLM, SamplingParams
from qwen35.chat_repl import (CLEAR_LINE, DIM, RESET, ChatRepl, load_conversation, save_history, setup_history,
                              stats_line)


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def demo():
    return LLM(None, max_model_len=512, max_num_seqs=2)


def chat(llm, script, out=None, **kw):
    out = out if out is not None else io.StringIO()
    kw.setdefault("thinking", False)
    repl = ChatRepl(llm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), stdin=io.StringIO(script),
                    stdout=out, **kw)
    assert repl.run() == 0
    return repl, out.getvalue()


def test_stats_line_after_each_answer_and_toggled(demo):
    repl, out = chat(demo, "Hi\n/stats\nAgain\n/stats on\nThird\n")
    assert "(stats off)" in out and "(stats on)" in out
    assert out.count("first token ") == 2 and out.count(" tokens/s, 4 tokens)") == 2
    assert len(repl.history) == 6
    assert stats_line(10, 5, 1.0, 1.5, 3.5) == "(prompt 10 tokens, first token 0.50 s, 2.0 tokens/s, 5 tokens)"
    assert stats_line(10, 0, 1.0, None, 1.2) == "(prompt 10 tokens, 0 tokens)"


def test_unknown_command_lists_the_known_ones_and_is_not_sent(demo):
    repl, out = chat(demo, "/frobnicate now\n/think maybe\nHi\n/exit\nnot read\n")
    assert "(unknown command /frobnicate; commands: /image, /video, /system, /think, /reasoning, /stats, /save, " \
           "/load, /reset, /help, /quit; /help explains them)" in out
    assert "(usage: /think on|off)" in out
    assert [m["content"] for m in repl.history if m["role"] == "user"] == ["Hi"]


def test_block_and_continuation_input(demo):
    script = '"""\n/not a command\n\n  indented\n"""\nmulti \\\nline\n"""one line"""\n'
    repl, _ = chat(demo, script)
    assert [m["content"] for m in repl.history if m["role"] == "user"] == [
        "/not a command\n\n  indented", "multi \nline", "one line"]


def test_save_load_round_trip(demo, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    saved = tmp_path / "conv.json"
    first, out = chat(demo, f"/system Be brief\n/image {tmp_path / 'red.png'}\nWhat is it?\nAnd now?\n/save {saved}\n")
    assert f"(saved 4 messages to {saved})" in out
    assert json.loads(saved.read_text()) == {"system": "Be brief", "messages": first.history}
    assert first.history[0]["content"][0] == {"type": "image", "image": str(tmp_path / "red.png")}
    assert set(first.history[1]) == {"role", "content", "reasoning_content"}
    second, out = chat(demo, f"Something else\n/system\n/load {saved}\n")
    assert f"(loaded 4 messages from {saved})" in out
    assert second.history == first.history and second.system == "Be brief"
    # an OpenAI-style message list loads too, its leading system message becoming the system prompt
    (tmp_path / "list.json").write_text(json.dumps([{"role": "system", "content": "S"}, *first.history]))
    assert load_conversation(tmp_path / "list.json") == ("S", first.history)


def test_bad_load_files_are_reported_and_the_chat_goes_on(demo, tmp_path):
    bad = {
        "missing.json": "No such file or directory",
        "syntax.json": ("{\n  \"messages\": [,]\n}", "line 2: not JSON"),
        "shape.json": ('{"msgs": []}', 'expected {"system": ..., "messages": [...]} or a list of messages'),
        "role.json": ('{"messages": [{"role": "tool", "content": "x"}]}',
                      "messages[0].role must be 'user' or 'assistant', got 'tool'"),
        "part.json": ('{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a"}]}]}',
                      'messages[0].content[0] must be {"type": "text"|"image"|"video", <type>: string}'),
        "media.json": ('{"messages": [{"role": "user", "content": [{"type": "image", "image": "/no/pic.png"}]}]}',
                       "messages[0].content[0]: no such image file /no/pic.png"),
        "reply.json": ('{"messages": [{"role": "assistant", "content": 3}]}',
                       "messages[0].content must be text or null"),
    }
    script = "Hi\n"
    for name, case in bad.items():
        if isinstance(case, tuple):
            (tmp_path / name).write_text(case[0])
        script += f"/load {tmp_path / name}\n"
    repl, out = chat(demo, script + "Still here\n")
    for name, case in bad.items():
        expected = case[1] if isinstance(case, tuple) else case
        assert f"(cannot load {tmp_path / name}: {expected}" in out, (name, out)
    assert out.count("the conversation is unchanged)") == len(bad)
    assert [m["content"] for m in repl.history if m["role"] == "user"] == ["Hi", "Still here"]


def test_thinking_indicator_when_reasoning_is_hidden(demo):
    repl, out = chat(demo, "Hi\n", out=TTY(), thinking=True, show_reasoning=False)
    reasoning = repl.history[1]["reasoning_content"]
    assert reasoning and "thinking... " in out and reasoning not in out
    assert out.index(CLEAR_LINE + "\n") > out.rindex("thinking... ")  # cleared before the answer / stats line
    # shown reasoning: no indicator; a pipe: no indicator either (nothing to redraw in place)
    repl, out = chat(demo, "Hi\n", out=TTY(), thinking=True)
    plain = out.replace(DIM, "").replace(RESET, "")
    assert "thinking..." not in out and repl.history[1]["reasoning_content"] in plain
    _, out = chat(demo, "Hi\n", thinking=True, show_reasoning=False)
    assert "thinking..." not in out


def test_thinking_default_is_off_only_for_the_demo(demo):
    params = SamplingParams()
    assert ChatRepl(demo, params, stdin=io.StringIO()).thinking is False
    other = SimpleNamespace(model_path=Path("/models/Qwen3.5-0.8B"), processor_config=None)
    assert ChatRepl(other, params, stdin=io.StringIO()).thinking is True
    assert ChatRepl(other, params, thinking=False, stdin=io.StringIO()).thinking is False


def test_history_file_only_on_a_terminal_and_bounded(demo, tmp_path):
    readline = pytest.importorskip("readline")
    path = tmp_path / "sub" / "history"
    assert setup_history(False, path) is None
    chat(demo, "Hi\n", history_file=path)  # piped input: no history file
    assert not path.exists()
    readline.clear_history()
    assert setup_history(True, path, length=3) == path
    for line in "abcde":
        readline.add_history(line)
    save_history(path)
    readline.clear_history()
    readline.read_history_file(path)
    assert [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)] == \
        ["c", "d", "e"]
    readline.clear_history()
