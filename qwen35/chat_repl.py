"""`qwen35 chat`: a terminal chat that streams the answer, shows the reasoning dimmed, and keeps the conversation.
Commands: /reset, /system TEXT, /think on|off, /reasoning on|off, /help, /quit. A line ending in a backslash
continues on the next line. Ctrl-C stops the current answer (the partial answer is kept); Ctrl-D quits."""

from __future__ import annotations

import sys

from qwen35.chat import assistant_message, render
from qwen35.engine.llm_engine import EngineError
from qwen35.serve.reasoning import ReasoningStreamParser, is_thinking_prompt

DIM, RESET = "\033[2m", "\033[0m"
HELP = __doc__.split("\n", 1)[1].strip()


class ChatRepl:
    def __init__(self, llm, params, system: str | None = None, thinking: bool = True, show_reasoning: bool = True,
                 stdin=None, stdout=None):
        self.llm, self.params = llm, params
        self.system, self.thinking, self.show_reasoning = system, thinking, show_reasoning
        self.stdin, self.out = stdin or sys.stdin, stdout or sys.stdout
        self.color = self.out.isatty()
        self.history: list[dict] = []

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
        elif cmd in ("think", "reasoning") and arg in ("on", "off"):
            setattr(self, "thinking" if cmd == "think" else "show_reasoning", arg == "on")
            self._print(f"({cmd} {arg})")
        else:
            self._print(HELP)
        return False

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
            self.history.append({"role": "user", "content": text})
            try:
                self.history.append(self._answer())
            except EngineError as e:  # e.g. the conversation outgrew max_model_len: say so, keep chatting
                self.history.pop()
                self._print(f"(error: {e}; /reset starts a new conversation)")

    def _answer(self) -> dict:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        prompt = render(self.llm, messages, chat_template_kwargs={"enable_thinking": self.thinking})
        thinking = is_thinking_prompt(prompt)
        parser = ReasoningStreamParser(thinking=thinking)
        ids = self.llm.tokenizer.encode(prompt)
        shown = 0
        text = ""
        in_reasoning = False
        stream = self.llm.stream({"prompt": prompt, "prompt_token_ids": ids}, self.params)
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
