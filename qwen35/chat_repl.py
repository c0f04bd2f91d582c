"""`qwen35 chat`: a terminal chat that streams the answer, shows the reasoning dimmed (or a "thinking" line when it
is hidden), times each answer, and keeps the conversation (saved to and loaded from JSON on request). On a terminal,
lines are edited with readline where Python has it, and the input history persists in the cache directory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qwen35.chat import assistant_message, render
from qwen35.demo import DEMO_DIR
from qwen35.multimodal.inputs import split_chat_media
from qwen35.paths import cache_dir
from qwen35.chat.reasoning import ReasoningStreamParser, is_thinking_prompt

DIM, RESET, CLEAR_LINE = "\033[2m", "\033[0m", "\r\033[K"
BLOCK = '"""'
HISTORY_LENGTH = 1000
COMMANDS = {
    "image PATH": "attach an image to your next message",
    "video PATH": "attach a video to your next message",
    "system TEXT": "set the system prompt (no TEXT: clear it)",
    "think on|off": "let the model reason before answering (default: on, off for the embedded demo model, "
                    "which was trained without reasoning; --no-think starts off)",
    "reasoning on|off": "show the reasoning dimmed, or hide it behind a 'thinking' line",
    "stats on|off": "the timing line after each answer (first token, decode tokens/s, tokens); no argument toggles",
    "save FILE": "write the conversation (system prompt, messages, media paths) as JSON",
    "load FILE": "replace the conversation with one /save wrote (or an OpenAI-style list of messages)",
    "reset": "start a new conversation",
    "help": "this list",
    "quit": "leave (Ctrl-D too)",
}
HELP = "\n".join(f"/{name:<17} {text}" for name, text in COMMANDS.items()) + f"""
A line ending in \\ continues on the next. {BLOCK} on a line of its own starts a block that ends at the next {BLOCK}
(paste-friendly; a block is always sent as a message, even when it starts with /).
Ctrl-C stops the current answer (the partial answer is kept)."""
KNOWN = ", ".join("/" + name.split()[0] for name in COMMANDS)


def setup_history(interactive: bool, path: Path | None = None, length: int = HISTORY_LENGTH) -> Path | None:
    """Load the input history into readline; the file to save it to, or None (not a terminal, or no readline)."""
    if not interactive:
        return None
    try:
        import readline  # missing on Windows and in some builds: plain input() still works
    except ImportError:
        return None
    path = path or cache_dir() / "chat_history"
    readline.set_history_length(length)
    try:
        readline.read_history_file(path)
    except OSError:  # no history yet, or unreadable: start empty
        pass
    return path


def save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)  # truncated to set_history_length's entries
    except OSError:
        pass  # a read-only cache directory must not break quitting


def is_demo_model(llm) -> bool:
    path = getattr(llm, "model_path", None)
    return path is not None and Path(path).resolve() == DEMO_DIR.resolve()


class ConversationFileError(ValueError):
    pass


def load_conversation(path: str | Path) -> tuple[str | None, list[dict]]:
    """(system prompt, messages) of a file /save wrote, checked; ConversationFileError names the file and the fault."""
    def fail(what: str):
        raise ConversationFileError(f"{path}: {what}")

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        fail(e.strerror or str(e))
    except UnicodeDecodeError:
        fail("not UTF-8 text")
    except json.JSONDecodeError as e:
        fail(f"line {e.lineno}: not JSON ({e.msg})")
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        fail('expected {"system": ..., "messages": [...]} or a list of messages')
    system = data.get("system")
    messages = list(data["messages"])
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = messages.pop(0).get("content")
        base = 1
    else:
        base = 0
    if system is not None and not isinstance(system, str):
        fail("the system prompt must be text")
    for i, msg in enumerate(messages, base):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            fail(f"{where} must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant"):
            fail(f"{where}.role must be 'user' or 'assistant', got {role!r}")
        if role == "assistant":
            for key in ("content", "reasoning_content"):
                if msg.get(key) is not None and not isinstance(msg[key], str):
                    fail(f"{where}.{key} must be text or null")
            continue
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            fail(f"{where}.content must be text or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "video") or not isinstance(part.get(kind), str):
                fail(f"{where}.content[{j}] must be {{\"type\": \"text\"|\"image\"|\"video\", <type>: string}}")
            if kind != "text" and not Path(part[kind]).is_file():
                fail(f"{where}.content[{j}]: no such {kind} file {part[kind]}")
    return system, messages


class ChatRepl:
    def __init__(self, llm, params, system: str | None = None, thinking: bool | None = None,
                 show_reasoning: bool = True, stdin=None, stdout=None,
                 attachments: list[tuple[str, str]] | None = None, show_stats: bool = True,
                 history_file: Path | None = None):
        """thinking None: on, except for the embedded demo model (trained without reasoning). history_file: where
        a terminal session keeps its input history (default: the cache directory's chat_history)."""
        self.llm, self.params = llm, params
        self.thinking = (not is_demo_model(llm)) if thinking is None else thinking
        self.system, self.show_reasoning, self.show_stats = system, show_reasoning, show_stats
        self.stdin, self.out = stdin or sys.stdin, stdout or sys.stdout
        self.color = self.out.isatty()
        self.interactive = self.stdin.isatty()
        self.history_file = history_file
        self.history: list[dict] = []
        self.attachments: list[tuple[str, str]] = []  # (kind, path) going with the next message
        for kind, path in attachments or []:
            self._attach(kind, path)

    def _print(self, text: str = "", end: str = "\n", dim: bool = False) -> None:
        if dim and self.color:
            text = DIM + text + RESET
        self.out.write(text + end)
        self.out.flush()

    def _read_line(self, prompt: str) -> str | None:
        if self.interactive and self.stdin is sys.stdin:
            try:
                return input(prompt)  # readline's editing when setup_history imported it
            except EOFError:
                return None
        if self.interactive:
            self.out.write(prompt)
            self.out.flush()
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def _read_message(self) -> tuple[str, bool] | None:
        """(text, is_block) of the next message, None at end of input; a block is never a command."""
        line = self._read_line(">>> ")
        if line is None:
            return None
        if line.startswith(BLOCK):
            lines, line = [], line[len(BLOCK):]
            while line is not None:
                if line.rstrip().endswith(BLOCK):
                    lines.append(line.rstrip()[:-len(BLOCK)])
                    break
                lines.append(line)
                line = self._read_line("... ")
            if lines and not lines[0].strip():  # the opening marker alone on its line
                lines.pop(0)
            if lines and not lines[-1].strip():
                lines.pop()
            return "\n".join(lines), True
        lines = []
        while line is not None and line.endswith("\\"):
            lines.append(line[:-1])
            line = self._read_line("... ")
        if line is not None:
            lines.append(line)
        return "\n".join(lines), False

    def _command(self, text: str) -> bool:
        """Handle a /command; True if the REPL should quit."""
        cmd, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        cmd = "quit" if cmd == "exit" else cmd
        usage = next((name for name in COMMANDS if name.split()[0] == cmd), None)
        if usage is None:
            self._print(f"(unknown command /{cmd}; commands: {KNOWN}; /help explains them)")
        elif cmd == "quit":
            return True
        elif cmd == "help":
            self._print(HELP)
        elif cmd == "reset":
            self.history = []
            self._print("(conversation cleared)")
        elif cmd == "system":
            self.system = arg or None
            self._print(f"(system prompt {'set' if arg else 'cleared'})")
        elif cmd in ("image", "video") and arg:
            self._attach(cmd, arg)
        elif cmd in ("think", "reasoning", "stats") and arg in ("on", "off") or (cmd == "stats" and not arg):
            attr = {"think": "thinking", "reasoning": "show_reasoning", "stats": "show_stats"}[cmd]
            setattr(self, attr, arg == "on" if arg else not getattr(self, attr))
            self._print(f"({cmd} {'on' if getattr(self, attr) else 'off'})")
        elif cmd == "save" and arg:
            self._save(Path(arg).expanduser())
        elif cmd == "load" and arg:
            try:
                self.system, self.history = load_conversation(Path(arg).expanduser())
                self._print(f"(loaded {len(self.history)} messages from {arg})")
            except ConversationFileError as e:
                self._print(f"(cannot load {e}; the conversation is unchanged)")
        else:
            self._print(f"(usage: /{usage})")
        return False

    def _save(self, path: Path) -> None:
        try:
            path.write_text(json.dumps({"system": self.system, "messages": self.history}, indent=1,
                                       ensure_ascii=False) + "\n")
            self._print(f"(saved {len(self.history)} messages to {path})")
        except OSError as e:
            self._print(f"(cannot save to {path}: {e.strerror or e})")

    def _attach(self, kind: str, path: str) -> None:
        path = str(Path(path).expanduser())
        if self.llm.processor_config is None:
            self._print(f"(cannot attach {path}: this model takes text only)")
        elif not Path(path).is_file():
            self._print(f"(cannot attach {path}: no such file)")
        else:
            self.attachments.append((kind, path))
            self._print(f"({kind} {path} attached to your next message)")

    def run(self) -> int:
        if self.interactive:
            self._print("qwen35 chat: /help for commands, Ctrl-C stops an answer, Ctrl-D quits.")
        history = setup_history(self.interactive and self.stdin is sys.stdin, self.history_file)
        try:
            return self._loop()
        finally:
            save_history(history)

    def _loop(self) -> int:
        while True:
            try:
                message = self._read_message()
            except KeyboardInterrupt:
                self._print()
                continue
            if message is None:
                return 0
            text, block = message
            if not text.strip():
                continue
            if text.startswith("/") and not block:
                if self._command(text.strip()):
                    return 0
                continue
            content = [{"type": kind, kind: path} for kind, path in self.attachments]
            self.history.append({"role": "user", "content": content + [{"type": "text", "text": text}]
                                 if content else text})
            try:
                self.history.append(self._answer())
                self.attachments = []
            except ValueError as e:  # a broken image, or the conversation outgrew max_model_len: say so, go on
                self.history.pop()
                self.attachments = []
                self._print(f"(error: {e}; /reset starts a new conversation)")

    def _answer(self) -> dict:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages, images, videos = split_chat_media(messages)
        prompt = render(self.llm, messages, chat_template_kwargs={"enable_thinking": self.thinking})
        thinking = is_thinking_prompt(prompt)
        parser = ReasoningStreamParser(thinking=thinking)
        ids = self.llm.tokenizer.encode(prompt)
        shown, text, n_tokens = 0, "", 0
        self._in_reasoning, self._indicator = False, None  # _indicator: when the "thinking" line was last drawn
        start = time.monotonic()
        first = None
        stream = self.llm.stream({"prompt": prompt, "prompt_token_ids": ids,
                                  "multi_modal_data": {"image": images, "video": videos}}, self.params)
        try:
            for out in stream:
                text, n_tokens = out.outputs[0].text, len(out.outputs[0].token_ids)
                if first is None and n_tokens:
                    first = time.monotonic()
                delta = parser.feed(text[shown:])
                shown = len(text)
                self._show(delta.reasoning, delta.content, start)
            delta = parser.finish()
            self._show(delta.reasoning, delta.content, start)
            self._clear_indicator()
        except KeyboardInterrupt:
            stream.close()  # aborts the request and frees its cache
            self._clear_indicator()
            self._print("\n(stopped)", end="")
        end = time.monotonic()
        self._print()
        if self.show_stats:
            self._print(stats_line(len(ids), n_tokens, start, first, end), dim=True)
        return assistant_message(text, thinking, None)

    def _show(self, reasoning: str | None, content: str | None, start: float) -> None:
        if reasoning and self.show_reasoning:
            self._print(reasoning, end="", dim=True)
            self._in_reasoning = True
        elif reasoning and self.color:
            # hidden reasoning: one line redrawn in place at most 10 times a second, so the wait is visible
            now = time.monotonic()
            if self._indicator is None or now - self._indicator >= 0.1:
                self._print(CLEAR_LINE + f"thinking... {now - start:.1f} s", end="", dim=True)
                self._indicator = now
        if content:
            self._clear_indicator()
            if self._in_reasoning:
                self._print("\n")
                self._in_reasoning = False
            self._print(content, end="")

    def _clear_indicator(self) -> None:
        if self._indicator is not None:
            self._print(CLEAR_LINE, end="")
            self._indicator = None


def stats_line(prompt_tokens: int, tokens: int, start: float, first: float | None, end: float) -> str:
    """The line after an answer: prompt size, time to first token, decode speed (tokens after the first over the time
    after it), tokens generated."""
    parts = [f"prompt {prompt_tokens} tokens"]
    if first is not None:
        parts.append(f"first token {first - start:.2f} s")
        if tokens > 1 and end > first:
            parts.append(f"{(tokens - 1) / (end - first):.1f} tokens/s")
    parts.append(f"{tokens} tokens")
    return "(" + ", ".join(parts) + ")"
