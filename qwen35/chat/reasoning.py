"""Split Qwen3.5 output into reasoning and content, on a finished text or on a stream of text deltas.

With thinking on, the chat template ends the prompt with `<think>\\n`, so the output starts inside the reasoning:
`{reasoning}\\n</think>\\n\\n{content}`. Rules (vLLM's `qwen3` reasoning parser, spec vision-and-io §6.6):
- a leading `<think>` (older templates let the model write it) is dropped;
- reasoning ends at the first `</think>`, or implicitly at a `<tool_call>` followed (after whitespace) by
  `<function=` / `<function ` -- Qwen3.5 sometimes calls tools from inside an unclosed think block;
  the content then starts at that `<tool_call>`;
- with neither, the output was truncated and is all reasoning;
- with thinking off (prompt ends in the closed `<think>\\n\\n</think>\\n\\n`), everything is content.
The template's conventional newlines are removed, as the template itself does when it re-reads a turn: newlines
at the start of the reasoning, before its end, and at the start of the content after `</think>`.
`ReasoningStreamParser` gives, for any split of the text into deltas, the same result as `split_reasoning`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
_IMPLICIT_END = re.compile(r"<tool_call>\s*<function[\s=]")


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


def is_thinking_prompt(prompt: str) -> bool:
    """True if generation starts inside an open think block, i.e. the prompt's last `<think>` is not closed."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def split_reasoning(text: str, thinking: bool = True) -> tuple[str | None, str | None]:
    """(reasoning, content) of a finished output; an empty part is None."""
    if not thinking:
        return None, text or None
    text = text.lstrip("\n")
    if text.startswith(THINK_START):
        text = text[len(THINK_START) :].lstrip("\n")
    end = text.find(THINK_END)
    implicit = _IMPLICIT_END.search(text)
    if end != -1 and (implicit is None or end < implicit.start()):
        reasoning, content = text[:end].rstrip("\n"), text[end + len(THINK_END) :].lstrip("\n")
    elif implicit is not None:
        reasoning, content = text[: implicit.start()].rstrip("\n"), text[implicit.start() :]
    else:
        reasoning, content = text, ""
    return reasoning or None, content or None


def _could_become_end(tail: str) -> bool:
    """Whether `tail` (the end of the buffer, starting with '<') may still grow into `</think>` or an implicit end."""
    if len(tail) < len(THINK_END) and THINK_END.startswith(tail):
        return True
    if len(tail) <= len(TOOL_CALL_START):
        return TOOL_CALL_START.startswith(tail)
    if not tail.startswith(TOOL_CALL_START):
        return False
    rest = tail[len(TOOL_CALL_START) :].lstrip()
    return "<function".startswith(rest)  # "" and "<function" itself still wait for the next character


def _hold_from(buf: str) -> int:
    """Where holding back starts: the earliest tail of `buf` that may still become an end (len(buf) if none)."""
    # Only the last <tool_call> can be pending (an earlier one has a later tag, not "<function", after it);
    # any other partial tag is shorter than "<tool_call>".
    starts = [buf.rfind(TOOL_CALL_START)]
    starts += [i for i in range(max(0, len(buf) - len(TOOL_CALL_START)), len(buf)) if buf[i] == "<"]
    return min((i for i in starts if i >= 0 and _could_become_end(buf[i:])), default=len(buf))


class ReasoningStreamParser:
    """Incremental `split_reasoning`: `feed(delta)` returns the reasoning and content it can already decide.

    Text that might still turn into a tag (a trailing `</thi`, `<tool_call>\\n<fun`) or newlines that might precede
    `</think>` are held back until the next delta decides them; `finish()` releases what is left.
    """

    def __init__(self, thinking: bool = True):
        self._state = "lead" if thinking else "content"
        self._buf = ""
        self._strip_lead = False  # drop newlines right after a leading <think>

    def feed(self, delta: str) -> ReasoningDelta:
        if self._state == "content":
            return ReasoningDelta(content=delta)
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> ReasoningDelta:
        out = self._drain(final=True)
        self._buf = ""
        return out

    def _drain(self, final: bool) -> ReasoningDelta:
        out = ReasoningDelta()
        if self._state == "lead":
            head = self._buf.lstrip("\n")
            if not final and len(head) < len(THINK_START) and THINK_START.startswith(head):
                return out
            if head.startswith(THINK_START):
                head = head[len(THINK_START) :]
                self._strip_lead = True
            self._buf, self._state = head, "reasoning"

        if self._state == "reasoning":
            if self._strip_lead:
                self._buf = self._buf.lstrip("\n")
                if not self._buf and not final:
                    return out
                self._strip_lead = False
            buf = self._buf
            end = buf.find(THINK_END)
            implicit = _IMPLICIT_END.search(buf)
            if end != -1 and (implicit is None or end < implicit.start()):
                out.reasoning = buf[:end].rstrip("\n")
                self._buf, self._state = buf[end + len(THINK_END) :], "content_lead"
            elif implicit is not None:
                out.reasoning, out.content = buf[: implicit.start()].rstrip("\n"), buf[implicit.start() :]
                self._buf, self._state = "", "content"
                return out
            elif final:
                out.reasoning, self._buf = buf, ""
                return out
            else:
                hold = _hold_from(buf)
                # Newlines just before a possible end tag are only reasoning if no end tag follows.
                safe = len(buf[:hold].rstrip("\n"))
                out.reasoning, self._buf = buf[:safe], buf[safe:]
                return out

        if self._state == "content_lead":
            self._buf = self._buf.lstrip("\n")
            if self._buf or final:
                self._state = "content"
                out.content, self._buf = self._buf, ""
        return out
