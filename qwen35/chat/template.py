"""Render a checkpoint's Jinja chat template the way transformers' `apply_chat_template` does.

Templates are untrusted code from the checkpoint, so they run in jinja2's immutable sandbox and only ever see plain
JSON-like data. The environment mirrors HF's: `trim_blocks`/`lstrip_blocks`, the loop-controls extension, a
`{% generation %}` tag that renders its body, `tojson` that keeps non-ASCII, `raise_exception` and `strftime_now`.
Inputs are normalised as vLLM does before rendering: OpenAI tool-call `arguments` strings become mappings (templates
iterate them) and `reasoning`/`thinking` fill `reasoning_content`. Every failure is a `ChatTemplateError` that says
what went wrong and where, never a raw Jinja traceback.

The sandbox blocks unsafe attributes but not unbounded work, so rendering is bounded too (`TemplateLimitError`):
ranges, lists built by `*`/`+` and the sizes given to filters and str methods (widths, counts) are at most
`MAX_ITEMS`; strings built by operators, `~`, formatting and filters, values turned into text, and the whole output
hold at most `MAX_CHARS`; integers at most `MAX_INT_BITS` bits; and a render that runs past `RENDER_SECONDS`
(checked at every call, attribute access, operator, filter, loop step and output chunk) stops.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_ALIASES = ("reasoning", "thinking")
# A max-context conversation of ~36k short messages renders in ~12 s on 2 busy cores: the limit stops runaway loops,
# not long conversations.
RENDER_SECONDS = 60.0
MAX_ITEMS = 100_000  # as Jinja's own MAX_RANGE
MAX_CHARS = 1 << 25  # 32 Mi characters: far above any prompt a model can take
MAX_INT_BITS = 1 << 16
MAX_NODES = 250_000  # items visited when sizing a value before it is turned into text
# Template variables the renderer sets itself; extra template kwargs may not replace them. vLLM lets request
# kwargs override `tools`/`add_generation_prompt` (and fails on `messages`); qwen35 refuses all of them with a clear
# error instead, so a request's meaning never depends on which of two fields wins.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "chat_template",
                            "tokenize", "literal_tokens", "self")


class ChatTemplateError(ValueError):
    """The template cannot be compiled, or refused (or failed on) the given messages."""


class TemplateLimitError(ChatTemplateError):
    """The template went past one of the rendering bounds."""


_render_state = threading.local()  # the running render's deadline, per thread (compiled templates are shared)


def _check_time() -> None:
    deadline = getattr(_render_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"rendering took longer than the {RENDER_SECONDS:g} s limit")


def _check_chars(n: int, what: str) -> None:
    if n > MAX_CHARS:
        raise TemplateLimitError(f"{what} would hold {n} characters, more than the limit of {MAX_CHARS}")


def _check_items(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise TemplateLimitError(f"{what} would hold {n} items, more than the limit of {MAX_ITEMS}")


def _check_number(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ITEMS:
        raise TemplateLimitError(f"{what} is {value}, more than the limit of {MAX_ITEMS}")


def _text_size(value: Any) -> int:
    """About how many characters `value` becomes as text (str, tojson), visiting at most MAX_NODES items."""
    total, stack, nodes = 0, [value], 0
    while stack:
        v = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise TemplateLimitError(f"a value turned into text has more than {MAX_NODES} items")
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
            total += 2 + 4 * len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
            total += 2 + 2 * len(v)
        else:
            total += 32
        _check_chars(total, "a value turned into text")
    return total


def _check_binop(op: str, left: Any, right: Any) -> None:
    ints = all(isinstance(x, int) for x in (left, right))
    if op == "**" and ints and abs(left) > 1 and right > 0 and right * left.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"{left} ** {right} would have more than {MAX_INT_BITS} bits")
    if op == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"a product would have more than {MAX_INT_BITS} bits")
    if op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            size = len(seq) * max(n, 0)
            _check_chars(size, "a repeated string") if isinstance(seq, str) else _check_items(size, "a repeated list")
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        _check_chars(len(left) + len(right), "a joined string")
    if op == "+" and isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        _check_items(len(left) + len(right), "a joined list")
    if op == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,))


_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_format(fmt: str, args: Sequence[Any], kwargs: Mapping | None = None) -> None:
    """`fmt % args` or `fmt.format(*args, **kwargs)`: bound widths and the size of what gets substituted."""
    values = [*args, *(kwargs or {}).values()]
    for spec in _PERCENT_SPEC.findall(fmt) + re.findall(r"\{[^{}]*:[^{}]*?(\d+)[^{}]*\}", fmt):
        for number in (spec if isinstance(spec, tuple) else (spec,)):
            if number.isdigit():
                _check_number(int(number), "a format width")
            elif number == "*":  # the width is one of the arguments
                for a in values:
                    _check_number(a, "a format width")
    fields = fmt.count("%") + fmt.count("{")
    _check_chars(len(fmt) + fields * max([_text_size(a) for a in values] or [0]), "a formatted string")


# Filters and str methods whose numeric arguments are sizes (widths, counts) of what they build.
_SIZED_FILTERS = frozenset({"batch", "center", "indent", "slice", "tojson", "truncate", "wordwrap"})
_SIZED_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _check_string_op(name: str, s: str, args: Sequence[Any], kwargs: Mapping) -> None:
    """Bounds for the str methods and filters that can multiply their input's size."""
    if name in ("replace",) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = s.count(old) if old else len(s) + 1
        _check_chars(len(s) + count * len(new), "a replaced string")
    elif name == "expandtabs":
        width = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(width, int):
            _check_chars(len(s) + s.count("\t") * width, "a string with expanded tabs")
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        _check_chars(len(s) + (s.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width)),
                     "an indented string")
    elif name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        _check_chars(len(s) * (1 + len(wrap or "\n")), "a wrapped string")
    elif name in ("split", "rsplit", "splitlines", "list"):  # a list of up to one item per character
        sep = args[0] if args and isinstance(args[0], str) and name != "list" else None
        pieces = len(s) if name == "list" else s.count(sep) if sep else sum(map(s.count, " \t\n\r"))
        if pieces > MAX_CHARS // 32:
            raise TemplateLimitError(f"{name}() would make a list of about {pieces} strings, more than the limit of "
                                     f"{MAX_CHARS // 32}")
    elif name in ("format", "format_map"):
        _check_format(s, args if name == "format" else (), kwargs if name == "format" else (args[0] if args else {}))


def _guard_filter(name: str, func):
    """Wrap a filter: time check, numbers bounded, and the filters that turn values into text sized first."""
    pass_arg = jinja2.utils._PassArg.from_obj(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        _check_time()
        value, rest = (args[1], args[2:]) if pass_arg is not None else (args[0] if args else None, args[1:])
        if name in _SIZED_FILTERS:
            for a in [*rest, *kwargs.values()]:
                _check_number(a, f"an argument of the filter '{name}'")
        if name in ("tojson", "string", "pprint", "join", "list", "format"):
            _text_size(value)
        if name == "join" and isinstance(value, Sequence):
            sep = rest[0] if rest else kwargs.get("d", "")
            _check_chars(len(value) * len(sep) if isinstance(sep, str) else 0, "a joined string")
        if isinstance(value, str):
            _check_string_op(name, value, rest, kwargs)
        return func(*args, **kwargs)

    return guarded


class _BoundedCodeGenerator(CodeGenerator):
    """Routes every for-loop's iterable and every `~` concatenation through the environment's guards."""

    def visit_For(self, node, frame):
        node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("guard_iter"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    @optimizeconst
    def visit_Concat(self, node, frame):
        self.write("environment.guard_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **kwargs):
        super().__init__(finalize=self.guard_output, **kwargs)
        self.globals["range"] = self.guard_range
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    @staticmethod
    def guard_range(*args):
        _check_time()
        r = range(*args)
        _check_items(len(r), "a range")
        return r

    @staticmethod
    def guard_iter(iterable):
        for i, item in enumerate(iterable):
            if not i % 64:
                _check_time()
            yield item

    @staticmethod
    def guard_concat(parts):
        _check_time()
        _check_chars(sum(len(p) if isinstance(p, str) else _text_size(p) for p in parts), "a '~' concatenation")
        return "".join(map(str, parts))

    @staticmethod
    def guard_output(value):
        if not isinstance(value, str):
            _text_size(value)
        return value

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)  # the sandbox hands out str.format wrapped at attribute access
        if wrapped is None:
            return None

        def checked(*args, **kwargs):
            _check_time()
            _check_string_op(value.__name__, value.__self__, args, kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context, operator, left, right):
        _check_time()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own spelling avoids name clashes)
        _check_time()
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in _SIZED_METHODS:
                for a in [*args, *kwargs.values()]:
                    _check_number(a, f"an argument of str.{name}()")
            _check_string_op(name, owner, args, kwargs)
            if name == "join" and args:
                _check_chars(_text_size(args[0]) + len(owner) * len(args[0]) if isinstance(args[0], Sequence) else 0,
                             "a joined string")
        return super().call(__context, __obj, *args, **kwargs)


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
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
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


def check_template_kwargs(kwargs: Any) -> None:
    """Extra template variables must be a mapping that does not name a variable the renderer sets itself."""
    if not isinstance(kwargs, Mapping):
        raise ChatTemplateError(f"chat_template_kwargs must be an object, got {type(kwargs).__name__}")
    reserved = [k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS]
    if reserved:
        raise ChatTemplateError(
            f"chat_template_kwargs cannot set {', '.join(map(repr, reserved))}: the request's own fields (messages, "
            "tools, add_generation_prompt) set these template variables")


def _template_line(exc: BaseException) -> int | None:
    # Jinja rewrites tracebacks so frames of template code carry the file name "<template>" and template lines.
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatPrompt(str):
    """A rendered prompt that remembers which special-token strings came from the inputs (message content, tools,
    template kwargs) rather than from the template: `literal_spans` are their (start, end) character ranges, which
    `Tokenizer.encode` turns into plain-text ids. Appending text (e.g. a forced tool call) keeps the spans."""

    literal_spans: tuple[tuple[int, int], ...] = ()

    def __new__(cls, text: str, literal_spans=()):
        prompt = super().__new__(cls, text)
        prompt.literal_spans = tuple(literal_spans)
        return prompt

    def __add__(self, other: str) -> ChatPrompt:
        return ChatPrompt(str.__add__(self, other), self.literal_spans)


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _render_literal(render, context: dict, literal_tokens: Sequence[str]) -> ChatPrompt:
    """Render with every `literal_tokens` string inside the inputs swapped for a per-render marker the template
    cannot produce, then put the strings back and record where they are."""
    nonce = secrets.token_hex(8)
    index = {t: i for i, t in enumerate(literal_tokens)}
    found = re.compile("|".join(re.escape(t) for t in sorted(literal_tokens, key=len, reverse=True)))
    text = render(_map_strings(context, lambda s: found.sub(lambda m: f"\ue000{nonce}{index[m[0]]}\ue001", s)))
    parts, spans, pos, size = [], [], 0, 0
    for m in re.finditer(f"\ue000{nonce}(\\d+)\ue001", text):
        token = literal_tokens[int(m[1])]
        parts += [text[pos:m.start()], token]
        size += m.start() - pos
        spans.append((size, size + len(token)))
        size, pos = size + len(token), m.end()
    parts.append(text[pos:])
    return ChatPrompt("".join(parts), spans)


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
        /,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool | None = None,
        literal_tokens: Sequence[str] = (),
        **kwargs: Any,
    ) -> str:
        """The prompt text. `enable_thinking=None` leaves it undefined so the template's own default applies;
        other keyword arguments become template variables (`chat_template_kwargs`). With `literal_tokens` (the
        tokenizer's special tokens), those strings inside the inputs are marked literal in the returned ChatPrompt."""
        check_template_kwargs(kwargs)
        if tools is not None and (isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence)):
            raise ChatTemplateError(f"tools must be a list of tool objects, got {type(tools).__name__}")
        context = plain_data(kwargs)
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        context.update(
            messages=prepare_messages(messages),
            tools=plain_data(list(tools)) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
        )
        if literal_tokens:
            return _render_literal(self._render, context, literal_tokens)
        return self._render(context)

    def _render(self, context: dict) -> str:
        context = {**context, "bos_token": self.bos_token, "eos_token": self.eos_token}
        _render_state.deadline = time.monotonic() + RENDER_SECONDS
        try:
            parts, size = [], 0
            for part in self._template.generate(**context):
                size += len(part)
                _check_chars(size, "the rendered prompt")
                _check_time()
                parts.append(part)
            return "".join(parts)
        except Exception as exc:  # template code can fail in any way: raise_exception, undefined, type errors
            line = _template_line(exc)
            where = f" (template line {line})" if line is not None else ""
            if isinstance(exc, TemplateLimitError):
                raise TemplateLimitError(f"chat template stopped: {exc}{where}") from None
            if type(exc) is jinja2.TemplateError:  # raised by the template itself via raise_exception
                raise ChatTemplateError(f"chat template rejected the messages: {exc}{where}") from None
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}{where}") from None
        finally:
            _render_state.deadline = None


def render_chat_template(source: str, messages: Sequence[Any], **kwargs: Any) -> str:
    """One-shot `ChatTemplate(source).render(messages, **kwargs)`; compiled templates are cached by source."""
    bos, eos = kwargs.pop("bos_token", None), kwargs.pop("eos_token", None)
    return ChatTemplate(source, bos_token=bos, eos_token=eos).render(messages, **kwargs)
