"""Render a checkpoint's Jinja chat template the way transformers' `apply_chat_template` does.

Templates are untrusted code from the checkpoint, so they run in jinja2's immutable sandbox and only ever see plain
JSON-like data. The environment mirrors HF's: `trim_blocks`/`lstrip_blocks`, the loop-controls extension, a
`{% generation %}` tag that renders its body, `tojson` that keeps non-ASCII, `raise_exception` and `strftime_now`.
Inputs are normalised as vLLM does before rendering: OpenAI tool-call `arguments` strings become mappings (templates
iterate them) and `reasoning`/`thinking` fill `reasoning_content`. Every failure is a `ChatTemplateError` that says
what went wrong and where, never a raw Jinja traceback.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_ALIASES = ("reasoning", "thinking")


class ChatTemplateError(ValueError):
    """The template cannot be compiled, or refused (or failed on) the given messages."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # Jinja's own tojson HTML-escapes <, > and & and sorts keys; tool schemas must reach the model verbatim.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for HF's training masks; here it is a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # As in HF: a namespace must not store underscore names, which the sandbox could not police afterwards.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template namespace cannot hold the attribute {name!r}")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None


def plain_data(value: Any) -> Any:
    """Rebuild `value` from JSON-like types only (pydantic models and dataclasses become dicts).

    Anything else, e.g. a decoded image in a content part, becomes the inert string "<TypeName>": templates only
    test whether media keys are present, and rich objects carry methods the sandbox does not know are unsafe.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, IntEnum, ...) are cut back to the base type and its methods.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Sequence[Any]) -> list[dict]:
    """Plain-data copies of OpenAI-style messages, with tool-call arguments parsed into mappings."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of message objects, got {type(messages).__name__}")
    prepared = []
    for i, message in enumerate(plain_data(list(messages))):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role', got {message!r}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] has no string 'role'")
        if message.get("reasoning_content") is None:
            alias = next((message[k] for k in _REASONING_ALIASES if message.get(k) is not None), None)
            if alias is not None:
                message["reasoning_content"] = alias
        for j, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
                continue
            where = f"messages[{i}].tool_calls[{j}].function.arguments"
            try:
                arguments = json.loads(function["arguments"]) if function["arguments"].strip() else {}
            except json.JSONDecodeError as exc:
                raise ChatTemplateError(f"{where} is not valid JSON ({exc})") from None
            if not isinstance(arguments, dict):
                raise ChatTemplateError(f"{where} must be a JSON object, got {type(arguments).__name__}")
            function["arguments"] = arguments
        prepared.append(message)
    return prepared


def _template_line(exc: BaseException) -> int | None:
    # Jinja rewrites tracebacks so frames of template code carry the file name "<template>" and template lines.
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates may reference."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text. `enable_thinking=None` leaves it undefined so the template's own default applies."""
        if tools is not None and (isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence)):
            raise ChatTemplateError(f"tools must be a list of tool objects, got {type(tools).__name__}")
        context = plain_data(kwargs)
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        context.update(
            messages=prepare_messages(messages),
            tools=plain_data(list(tools)) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            return self._template.render(**context)
        except Exception as exc:  # template code can fail in any way: raise_exception, undefined, type errors
            line = _template_line(exc)
            where = f" (template line {line})" if line is not None else ""
            if type(exc) is jinja2.TemplateError:  # raised by the template itself via raise_exception
                raise ChatTemplateError(f"chat template rejected the messages: {exc}{where}") from None
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}{where}") from None


def render_chat_template(source: str, messages: Sequence[Any], **kwargs: Any) -> str:
    """One-shot `ChatTemplate(source).render(messages, **kwargs)`; compiled templates are cached by source."""
    bos, eos = kwargs.pop("bos_token", None), kwargs.pop("eos_token", None)
    return ChatTemplate(source, bos_token=bos, eos_token=eos).render(messages, **kwargs)
