"""A request's output constraint, from whichever spelling the client used: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields, or a forced tool call (`tool_choice` "required" or a named
function), which becomes a grammar of Qwen3.5's XML tool-call format built from the tools' parameter schemas, so
that the call always parses and its arguments validate."""

from __future__ import annotations

import json
from collections.abc import Mapping

from qwen35.engine.structured import close_objects
from qwen35.sampling_params import SamplingParamsError, StructuredOutputsParams
from qwen35.serve.middleware import APIError
from qwen35.chat.tool_calls import is_string_schema

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _param_rule(rule: str, name: str, schema) -> list[str]:
    """Lark rules for one `<parameter=NAME>` block: strings are raw text up to the closing tag (or one of their
    enum values), anything else is JSON matching its schema."""
    head = f'{rule}: {_lit(f"<parameter={name}>" + chr(10))} {rule}_v'
    if isinstance(schema, Mapping) and isinstance(schema.get("enum"), list) and schema["enum"] and all(
            isinstance(v, str) for v in schema["enum"]):
        return [f'{head} "\\n</parameter>\\n"', f"{rule}_v: " + " | ".join(_lit(v) for v in schema["enum"])]
    if is_string_schema(schema):
        # minLength / maxLength bound the raw text (other string keywords are not enforced)
        lo, hi = (v if isinstance(v := schema.get(k) if isinstance(schema, Mapping) else None, int)
                  and not isinstance(v, bool) and v >= 0 else None for k in ("minLength", "maxLength"))
        length = "*" if lo is None and hi is None else f"{{{lo or 0},{'' if hi is None else hi}}}"
        return [head, f'{rule}_v[stop="\\n</parameter>\\n"]: /(?s:.{length})/']
    # compact JSON, as for response formats: free whitespace lets a weak model pad the value until max_tokens
    closed = close_objects(dict(schema)) if isinstance(schema, Mapping) else {}
    body = json.dumps({**closed, "x-guidance": {"whitespace_flexible": False}}, ensure_ascii=False)
    return [f'{head} "\\n</parameter>\\n"', f"{rule}_v: %json {body}"]


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True,
                      added_tokens: frozenset[str] = frozenset({"<tool_call>", "</tool_call>"})) -> str:
    """A Lark grammar for one or more calls (one when not `parallel`) of the named function, or of any function in
    `tools`, in the format the chat template teaches:
    `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`.
    Required parameters are always written, optional ones may be, each at most once, in the schema's order.
    added_tokens: the tokenizer's added tokens, which a grammar names bare (they are single ids, not text)."""
    def tag(s):
        return s if s in added_tokens else _lit(s)

    rules, alts = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") if isinstance(fn.get("parameters"), Mapping) else {}
        props = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
        required = set(params.get("required") or ())
        seq = []
        for j, (pname, schema) in enumerate(props.items()):
            rule = f"f{i}_p{j}"
            rules += _param_rule(rule, pname, schema)
            seq.append(rule if pname in required else f"{rule}?")
        rules.append(f'f{i}: {_lit(fn["name"] + ">" + chr(10))} {" ".join(seq)} "</function>\\n" {tag("</tool_call>")}')
        alts.append(f"f{i}")
    call = tag("<tool_call>") + ' "\\n<function=" (' + " | ".join(alts) + ")"
    start = "start: call" + (' ("\\n" call)*' if parallel else "")
    return "\n".join([start, f"call: {call}"] + rules)


def request_constraint(req, tools: list[dict] | None = None,
                       added_tokens: frozenset[str] = frozenset({"<tool_call>", "</tool_call>"})
                       ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint a chat or completion request asks for (at most one spelling) and the field that gave it, or
    (None, None). A 400 names the field when the constraint is malformed or given twice."""
    given = []
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.get("type") not in (None, "text"):
        kind = rf.get("type")
        if kind == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), (Mapping, bool)):
                raise APIError(400, 'response_format json_schema needs {"json_schema": {"name": ..., "schema": '
                                    '{...}}}', "response_format")
            given.append(("response_format", {"json": spec.get("schema", {})}))
        elif kind == "structural_tag":
            raise APIError(400, "response_format 'structural_tag' is not supported; use json_schema or a grammar",
                           "response_format")
        else:
            raise APIError(400, f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                           "response_format")
    if getattr(req, "structured_outputs", None) is not None:
        given.append(("structured_outputs", dict(req.structured_outputs)))
    for field, kind in _GUIDED.items():
        if getattr(req, field, None) is not None:
            given.append((field, {kind: getattr(req, field)}))
    choice = getattr(req, "tool_choice", None)
    if choice not in (None, "auto", "none"):
        if not tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
        name = None if choice == "required" else choice.function.name
        if name is not None and name not in [t["function"]["name"] for t in tools]:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        parallel = getattr(req, "parallel_tool_calls", None) is not False
        given.append(("tool_choice", {"grammar": tool_call_grammar(tools, name, parallel, added_tokens)}))
    if not given:
        return None, None
    if len(given) > 1:
        raise APIError(400, f"give one output constraint, not {' and '.join(f for f, _ in given)}", given[1][0])
    field, spec = given[0]
    ws = getattr(req, "guided_whitespace_pattern", None)
    if ws is not None and "whitespace_pattern" not in spec:
        spec["whitespace_pattern"] = ws
    try:
        return StructuredOutputsParams(**spec), field
    except TypeError as e:
        raise APIError(400, f"{field}: {e}", field) from None
    except SamplingParamsError as e:
        raise APIError(400, f"{field}: {str(e).removeprefix('SamplingParams.structured_outputs ')}", field) from None
