"""`qwen35 chat`: a terminal chat that streams the answer, shows the reasoning dimmed, and keeps the conversation.
Commands: /image PATH and /video PATH (attach to your next message), /reset, /system TEXT, /think on|off,
/reasoning on|off, /help, /quit. A line ending in a backslash continues on the next line. Ctrl-C stops the current
answer (the partial answer is kept); Ctrl-D quits."""

from __future__ import annotations

import sys

from pathlib import Path

from qwen35.chat import assistant_message, render
from qwen35.multimodal.inputs import split_chat_media
from qwen35.serve.reasoning import ReasoningStreamParser, is_thinking_prompt

DIM, RESET = "\033[2m", "\033[0m"
HELP = __doc__.split("\n", 1)[1].strip()


class ChatRepl:
    def __init__(self, llm, params, system: str | None = None, thinking: bool | None = None,
                 show_reasoning: bool = True, stdin=None, stdout=None,
                 attachments: list[tuple[str, str]] | None = None):
        self.llm, self.params = llm, params
        self.system, self.thinking, self.show_reasoning = system, thinking, show_reasoning
        self.stdin, self.out = stdin or sys.stdin, stdout or sys.stdout
        self.color = self.out.isatty()
        self.history: list[dict] = []
        self.attachments: list[tuple[str, str]] = []  # (kind, path) going with the next message
        for kind, path in attachments or []:
            self._attach(kind, path)

    def _print(self, text: str = "", end: str = "\n", dim: bool = False) -> None:
        if dim and self.color:
            text = DIM + text + RESET
        self.out.write(text + end)
        self.out.flush()

    def _read_message(self) -> str | None:
        lines = []
        while True:
            if self.stdin.isatty():
                self.out.write("... " if lines else ">>> ")
                self.out.flush()
            line = self.stdin.readline()
            if not line:
                return "\n".join(lines) if lines else None
            line = line.rstrip("\n")
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)

    def _command(self, text: str) -> bool:
        """Handle a /command; True if the REPL should quit."""
        cmd, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit"):
            return True
        if cmd == "reset":
            self.history = []
            self._print("(conversation cleared)")
        elif cmd == "system":
            self.system = arg or None
            self._print(f"(system prompt {'set' if arg else 'cleared'})")
        elif cmd in ("image", "video") and arg:
            self._attach(cmd, arg)
        elif cmd in ("think", "reasoning") and arg in ("on", "off"):
            setattr(self, "thinking" if cmd == "think" else "show_reasoning", arg == "on")
            self._print(f"({cmd} {arg})")
        else:
            self._print(HELP)
        return False

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
        if self.stdin.isatty():
            self._print("qwen35 chat: /help for commands, Ctrl-C stops an answer, Ctrl-D quits.")
        while True:
            try:
                text = self._read_message()
            except KeyboardInterrupt:
                self._print()
                continue
            if text is None:
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
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
        # thinking None: the template's default (Qwen3.5's thinks; the demo model, trained without reasoning, does not)
        kwargs = {} if self.thinking is None else {"enable_thinking": self.thinking}
        prompt = render(self.llm, messages, chat_template_kwargs=kwargs)
        thinking = is_thinking_prompt(prompt)
        parser = ReasoningStreamParser(thinking=thinking)
        ids = self.llm.tokenizer.encode(prompt)
        shown = 0
        text = ""
        in_reasoning = False
        stream = self.llm.stream({"prompt": prompt, "prompt_token_ids": ids,
                                  "multi_modal_data": {"image": images, "video": videos}}, self.params)
        try:
            for out in stream:
                text = out.outputs[0].text
                delta = parser.feed(text[shown:])
                shown = len(text)
                in_reasoning = self._show(delta, in_reasoning)
            self._show(parser.finish(), in_reasoning)
        except KeyboardInterrupt:
            stream.close()  # aborts the request and frees its cache
            self._print("\n(stopped)", end="")
        self._print()
        return assistant_message(text, thinking, None)

    def _show(self, delta, in_reasoning: bool) -> bool:
        if delta.reasoning and self.show_reasoning:
            self._print(delta.reasoning, end="", dim=True)
            in_reasoning = True
        if delta.content:
            if in_reasoning:
                self._print("\n")
                in_reasoning = False
            self._print(delta.content, end="")
        return in_reasoning
