"""Parse Qwen3.5's XML tool calls into OpenAI tool calls, on a finished text or on a stream of text deltas.

The model writes (spec vision-and-io §6.6; vLLM/SGLang call this format `qwen3_coder`):

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE (raw text, may span lines; JSON for objects and arrays)
    </parameter>
    </function>
    </tool_call>

Grammar, as in vLLM's parser where it is well defined:
- a call starts at `<tool_call>` followed (after whitespace) by `<function=`, or at a bare `<function=`; the
  content is the text before the first call, trailing whitespace removed; text after the first call that is not a
  call is dropped (the template tells the model to add nothing after its calls);
- a `<tool_call>` block runs to `</tool_call>` or the end of the text and may hold several functions; a function
  runs to `</function>`, the end of its block, or the end of the text;
- the name is the text up to the first `>`; a function without a complete, non-empty name is dropped;
- a parameter value runs to `</parameter>`, the next `<parameter=`, or the end of its function; exactly one
  leading and one trailing newline are removed; a repeated parameter name keeps its first value;
- values are typed by the request's tool schema (`convert_param_value`); unknown functions and parameters keep
  raw strings, and unknown functions are still reported (the client decides what to do with them).
`ToolCallStreamParser` gives, for any split of the text into deltas, exactly the one-shot result, streaming the
arguments JSON as values arrive (string values character by character, other types when complete).
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION_START = "<function="
FUNCTION_END = "</function>"
PARAMETER_START = "<parameter="
PARAMETER_END = "</parameter>"
_CALL_START = re.compile(r"<tool_call>\s*(?=<function=)|<function=")

_STRING_TYPES = {"string", "str", "text", "varchar", "char", "enum"}


@dataclass
class ToolCallParseResult:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_properties(tools: Sequence[Any] | None, name: str) -> Mapping | None:
    """`parameters.properties` of function `name` in an OpenAI tools list ({} if it has none); None if unknown."""
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and function.get("name") == name:
            params = function.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            return props if isinstance(props, Mapping) else {}
    return None


def _schema_type(schema: Any) -> str:
    if not isinstance(schema, Mapping):
        return "string"
    kind = schema.get("type")
    if kind is None:
        # Optional parameters are often anyOf [T, null]; the first non-null option decides.
        for option in schema.get("anyOf") or schema.get("oneOf") or ():
            option_kind = _schema_type(option)
            if option_kind != "null":
                return option_kind
        return "string"
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    return str(kind).strip().lower()


def is_string_schema(schema: Any) -> bool:
    return schema is None or _schema_type(schema) in _STRING_TYPES


def _json_ready(value: Any) -> Any:
    # literal_eval/json.loads can yield tuples, int keys (respelt), or sets, bytes, NaN (no JSON spelling: error).
    return json.loads(json.dumps(value, allow_nan=False))


def convert_param_value(raw: str, schema: Any) -> Any:
    """Type a raw parameter value by its JSON schema (None: the parameter is unknown, keep the string).

    `null` (any case) is None for every type; strings stay raw; integers and numbers are parsed (integral numbers
    become ints); booleans accept true/false; objects and arrays go through json.loads, then literal_eval; other
    types through literal_eval. Whatever fails to parse stays the raw string.
    """
    if raw.lower() == "null":
        return None
    if is_string_schema(schema):
        return raw
    kind = _schema_type(schema)
    is_integer = kind.startswith(("int", "uint", "long", "short", "unsigned"))
    if is_integer or kind.startswith(("num", "float")):
        try:
            return int(raw)  # exact, where float() would round big integers
        except ValueError:
            pass
        try:
            number = float(raw)
        except ValueError:
            return raw
        if not math.isfinite(number) or (is_integer and not number.is_integer()):
            return raw
        return int(number) if number.is_integer() else number
    if kind in ("boolean", "bool", "binary"):
        word = raw.strip().lower()
        return word == "true" if word in ("true", "false") else raw
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return _json_ready(json.loads(raw))
        except (ValueError, RecursionError):
            pass
    try:
        return _json_ready(ast.literal_eval(raw))
    except Exception:  # literal_eval raises many kinds (SyntaxError, ValueError, RecursionError, ...)
        return raw


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    return value[:-1] if value.endswith("\n") else value


def _parameters(region: str):
    """(name, raw value) of each complete-named parameter in a function body, in order."""
    i = 0
    while (p := region.find(PARAMETER_START, i)) != -1:
        start = p + len(PARAMETER_START)
        close, after = region.find(PARAMETER_END, start), region.find(PARAMETER_START, start)
        stop = min((s for s in (close, after) if s != -1), default=len(region))
        i = stop + len(PARAMETER_END) if stop == close else stop
        segment = region[start:stop]
        gt = segment.find(">")
        name = segment[:gt].strip()
        if gt != -1 and name:
            yield name, _strip_one_newline(segment[gt + 1 :])


def _parse_function(text: str, start: int, tools, calls: list[dict]) -> int:
    """Parse the function whose `<function=` is at `start` in `text`; return where parsing continues."""
    name_start = start + len(FUNCTION_START)
    end = text.find(FUNCTION_END, name_start)
    resume = end + len(FUNCTION_END) if end != -1 else len(text)
    end = end if end != -1 else len(text)
    gt = text.find(">", name_start, end)
    name = text[name_start:gt].strip() if gt != -1 else ""
    if name:
        props = tool_properties(tools, name)
        arguments: dict[str, Any] = {}
        for param, raw in _parameters(text[gt + 1 : end]):
            if param not in arguments:
                arguments[param] = convert_param_value(raw, props.get(param) if props is not None else None)
        calls.append({"id": new_tool_call_id(), "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return resume


def parse_tool_calls(text: str, tools: Sequence[Any] | None = None) -> ToolCallParseResult:
    """Content and OpenAI-style tool calls of a finished output (the content part, after reasoning is split off)."""
    first = _CALL_START.search(text)
    if first is None:
        return ToolCallParseResult(text or None)
    calls: list[dict] = []
    pos = first.start()
    while (match := _CALL_START.search(text, pos)) is not None:
        if match.group().startswith(TOOL_CALL_START):
            body_start = match.start() + len(TOOL_CALL_START)
            body_end = text.find(TOOL_CALL_END, body_start)
            body_end = body_end if body_end != -1 else len(text)
            body, i = text[body_start:body_end], 0
            while (f := body.find(FUNCTION_START, i)) != -1:
                i = _parse_function(body, f, tools, calls)
            pos = body_end + len(TOOL_CALL_END)
        else:
            pos = _parse_function(text, match.start(), tools, calls)
    return ToolCallParseResult(text[: first.start()].rstrip() or None, calls)


def _partial_tag_start(buf: str, tags: Sequence[str]) -> int:
    """Earliest index whose tail of `buf` is a proper prefix of one of `tags` (len(buf) if none)."""
    for i in range(max(0, len(buf) - max(map(len, tags)) + 1), len(buf)):
        if buf[i] == "<" and any(len(buf) - i < len(t) and t.startswith(buf[i:]) for t in tags):
            return i
    return len(buf)


def _partial_call_start(buf: str) -> int:
    """Earliest index whose tail of `buf` may still become a call start (len(buf) if none)."""
    hold = _partial_tag_start(buf, (TOOL_CALL_START, FUNCTION_START))
    # "<tool_call>" plus whitespace waits for "<function="; only the last <tool_call> can still be waiting.
    last = buf.rfind(TOOL_CALL_START)
    if last != -1 and FUNCTION_START.startswith(buf[last + len(TOOL_CALL_START) :].lstrip()):
        hold = min(hold, last)
    return hold


def _first_of(buf: str, tags: Sequence[str], end: int | None = None) -> tuple[int, str | None]:
    found = [(i, t) for t in tags if (i := buf.find(t, 0, len(buf) if end is None else end)) != -1]
    return min(found) if found else (-1, None)


def _json_string_body(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class ToolCallStreamParser:
    """Incremental `parse_tool_calls`. `feed(delta)` and `finish()` return OpenAI-style delta dicts:

    `{"content": str}`, then per call `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}`
    once its name is complete, then `{"tool_calls": [{"index", "function": {"arguments": str}}]}` fragments that
    concatenate to the arguments JSON. Nothing that might still become a tag is ever emitted as content.
    """

    def __init__(self, tools: Sequence[Any] | None = None):
        self.tools = tools
        # Text is kept as lists of pieces: content and string arguments can be long and arrive a token at a time.
        self._content: list[str] = []
        self._calls: list[tuple[str, str, list[str]]] = []  # (id, name, argument pieces)
        self._state = "content"
        self._buf = ""
        self._wrapped = False  # inside <tool_call>...</tool_call> (else a bare <function=...>)
        self._in_call = False  # False while skipping a function without a usable name
        self._props: Mapping | None = None
        self._seen_params: set[str] = set()
        self._param: str | None = None  # current parameter; None while skipping it
        self._value: list[str] = []  # raw value pieces consumed so far
        self._value_lead = True  # the value's first character is not yet known (one "\n" is dropped)
        self._value_open = False  # a string value whose opening quote has been emitted
        self._out: list[dict] = []

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._calls)

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        while getattr(self, f"_on_{self._state}")(final=False):
            pass
        return self._take_output()

    def finish(self) -> list[dict]:
        while getattr(self, f"_on_{self._state}")(final=True):
            pass
        self._buf = ""
        return self._take_output()

    def result(self) -> ToolCallParseResult:
        """Everything parsed so far, shaped like `parse_tool_calls` (complete after `finish()`)."""
        calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(args)}}
                 for call_id, name, args in self._calls]
        return ToolCallParseResult("".join(self._content) or None, calls)

    def _take_output(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _emit_content(self, text: str) -> None:
        if not text:
            return
        self._content.append(text)
        if self._out and "content" in self._out[-1]:
            self._out[-1]["content"] += text
        else:
            self._out.append({"content": text})

    def _emit_arguments(self, text: str) -> None:
        index = len(self._calls) - 1
        self._calls[index][2].append(text)
        last = self._out[-1]["tool_calls"][0] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last["index"] == index:
            last["function"]["arguments"] += text
        else:
            self._out.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    def _stops(self, *tags: str) -> tuple[str, ...]:
        return (*tags, TOOL_CALL_END) if self._wrapped else tags

    def _on_content(self, final: bool) -> bool:
        match = _CALL_START.search(self._buf)
        if match is not None:
            self._emit_content(self._buf[: match.start()].rstrip())
            self._buf, self._state = self._buf[match.start() :], "between"
            return True
        # Trailing whitespace is held too: it is dropped if a call follows.
        safe = len(self._buf) if final else len(self._buf[: _partial_call_start(self._buf)].rstrip())
        self._emit_content(self._buf[:safe])
        self._buf = self._buf[safe:]
        return False

    def _on_between(self, final: bool) -> bool:
        match = _CALL_START.search(self._buf)
        if match is None:
            self._buf = "" if final else self._buf[_partial_call_start(self._buf) :]
            return False
        self._wrapped = match.group().startswith(TOOL_CALL_START)
        skip = len(TOOL_CALL_START) if self._wrapped else len(FUNCTION_START)
        self._buf = self._buf[match.start() + skip :]
        self._state = "block" if self._wrapped else "function_name"
        return True

    def _on_block(self, final: bool) -> bool:
        at, tag = _first_of(self._buf, (FUNCTION_START, TOOL_CALL_END))
        if tag is None:
            self._buf = "" if final else self._buf[_partial_tag_start(self._buf, (FUNCTION_START, TOOL_CALL_END)) :]
            return False
        self._buf = self._buf[at + len(tag) :]
        self._state = "function_name" if tag == FUNCTION_START else "between"
        return True

    def _on_function_name(self, final: bool) -> bool:
        gt = self._buf.find(">")
        if gt == -1:
            if final:
                self._buf = ""
            return False
        at, _ = _first_of(self._buf, self._stops(FUNCTION_END), end=gt + 1)
        name = self._buf[:gt].strip() if at == -1 else ""
        self._buf = self._buf[gt + 1 :] if at == -1 else self._buf[at:]
        self._in_call, self._props, self._seen_params = bool(name), tool_properties(self.tools, name), set()
        if name:
            call_id = new_tool_call_id()
            self._calls.append((call_id, name, []))
            self._out.append({"tool_calls": [{"index": len(self._calls) - 1, "id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": ""}}]})
        self._state = "function"
        return True

    def _on_function(self, final: bool) -> bool:
        stops = self._stops(PARAMETER_START, FUNCTION_END)
        at, tag = _first_of(self._buf, stops)
        if tag is None:
            if final:
                self._close_function()
            self._buf = "" if final else self._buf[_partial_tag_start(self._buf, stops) :]
            return False
        self._buf = self._buf[at + len(tag) :]
        if tag == PARAMETER_START:
            self._state = "parameter_name"
        else:
            self._close_function()
            self._state = "block" if tag == FUNCTION_END and self._wrapped else "between"
        return True

    def _on_parameter_name(self, final: bool) -> bool:
        gt = self._buf.find(">")
        if gt == -1:
            if final:
                self._close_function()
                self._buf = ""
            return False
        at, _ = _first_of(self._buf, self._stops(PARAMETER_END, PARAMETER_START, FUNCTION_END), end=gt + 1)
        if at != -1:  # the parameter ended before its name did: drop it, let the function state see the tag
            self._buf, self._state = self._buf[at:], "function"
            return True
        name = self._buf[:gt].strip()
        self._buf = self._buf[gt + 1 :]
        keep = self._in_call and name and name not in self._seen_params
        self._param = name if keep else None
        self._seen_params.add(name)
        self._value, self._value_lead, self._value_open = [], True, False
        self._state = "parameter_value"
        return True

    def _on_parameter_value(self, final: bool) -> bool:
        if self._value_lead and self._buf:
            self._buf = self._buf[1:] if self._buf[0] == "\n" else self._buf
            self._value_lead = False
        stops = self._stops(PARAMETER_END, PARAMETER_START, FUNCTION_END)
        at, tag = _first_of(self._buf, stops)
        if tag is not None or final:
            end = at if tag is not None else len(self._buf)
            self._finish_parameter(self._buf[:end])
            # </parameter> is consumed here; the other tags also end the function, which the function state handles.
            self._buf = self._buf[end + len(tag) :] if tag == PARAMETER_END else self._buf[end:]
            self._state = "function"
            return True
        safe = _partial_tag_start(self._buf, stops)
        if self._buf[:safe].endswith("\n"):  # may be the one trailing newline that is removed
            safe -= 1
        if safe > 0:
            self._value.append(self._buf[:safe])
            self._stream_string_value(self._buf[:safe])
            self._buf = self._buf[safe:]
        return False

    def _key_prefix(self) -> str:
        opening = ", " if self._calls[-1][2] else "{"
        return opening + json.dumps(self._param, ensure_ascii=False) + ": "

    def _stream_string_value(self, piece: str) -> None:
        if self._param is None or not is_string_schema(self._schema()):
            return
        if self._value_open:
            self._emit_arguments(_json_string_body(piece))
            return
        head = "".join(self._value)  # short: the quote opens as soon as the value cannot be the literal null
        if not "null".startswith(head.lower()):
            self._emit_arguments(self._key_prefix() + '"' + _json_string_body(head))
            self._value_open = True

    def _finish_parameter(self, tail: str) -> None:
        if self._param is None:
            return
        if tail.endswith("\n"):  # consumed pieces never end in the value's last newline; it is held in the tail
            tail = tail[:-1]
        if self._value_open:
            self._emit_arguments(_json_string_body(tail) + '"')
        else:
            value = convert_param_value("".join(self._value) + tail, self._schema())
            self._emit_arguments(self._key_prefix() + json.dumps(value, ensure_ascii=False))
        self._param = None

    def _schema(self) -> Any:
        return self._props.get(self._param) if self._props is not None else None

    def _close_function(self) -> None:
        if self._in_call:
            self._emit_arguments("}" if self._calls[-1][2] else "{}")
        self._in_call = False
