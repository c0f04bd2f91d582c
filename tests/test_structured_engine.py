"""Structured output in the engine, on the embedded demo model (vocabulary 10,768): token masks against a per-bit
reference, grammar caching, compile errors, the reasoning gate, failures that stay with their request, n > 1, and
batches mixing constrained and free requests; logit_bias and allowed_token_ids in the sampler."""

import json
import re

import numpy as np
import pytest
import torch

from qwen35 import LLM, SamplingParams
from qwen35.engine.llm_engine import EngineError
from qwen35.engine.sampler import SampleRow, apply_token_filters, sample_row
from qwen35.engine.structured import StructuredOutputError, StructuredOutputs
from qwen35.sampling_params import SamplingParamsError, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 2, "maxLength": 8},
    "size": {"type": "integer", "minimum": 1, "maximum": 99},
    "kind": {"enum": ["module", "class"]}}, "required": ["name", "size", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM()


def valid(text: str) -> bool:
    try:
        d = json.loads(text)
    except ValueError:
        return False
    return (set(d) == {"name", "size", "kind"} and 2 <= len(d["name"]) <= 8 and isinstance(d["size"], int)
            and 1 <= d["size"] <= 99 and d["kind"] in ("module", "class"))


def ask(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ---- masks -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V, width", [(1, 1), (31, 31), (31, 30), (32, 32), (32, 31), (33, 33), (33, 32),
                                      (10768, 10768), (10768, 10760)])
def test_apply_masks_equals_a_per_bit_reference(V, width):
    so = StructuredOutputs(None, V)
    g = torch.Generator().manual_seed(V + width)
    masks = torch.randint(-2**31, 2**31 - 1, (4, so.num_words), dtype=torch.int64, generator=g).to(torch.int32)
    masks[1] = 0  # allows nothing
    masks[2] = 0
    masks[2, -1] = -1  # allows only ids in the last word: none of them within `width` when width ends before it
    masks[3] = -1  # allows everything
    logits = torch.randn(4, width, generator=g)
    out = logits.clone()
    empty = so.apply_masks(out, masks)
    ref = logits.clone()
    for b in range(4):
        for j in range(width):
            if not (int(masks[b, j // 32]) & 0xFFFFFFFF) >> (j % 32) & 1:
                ref[b, j] = float("-inf")
    assert torch.equal(out, ref)
    assert empty.tolist() == [bool(torch.isinf(ref[b]).all()) for b in range(4)]
    assert empty[1] and not empty[3]
    assert bool(empty[2]) == (width <= 32 * (so.num_words - 1))


def test_fill_masks_match_the_grammar(llm):
    """A choice grammar allows exactly the first tokens of its choices (and nothing past the tokenizer)."""
    so = llm.engine.structured
    m = so.matcher(StructuredOutputsParams(choice=["yes", "no"]), [1, 2, 3])
    bits = np.unpackbits(so.fill_masks([m]).numpy().view(np.uint8), bitorder="little")
    allowed = {int(i) for i in np.flatnonzero(bits)}
    starts = {llm.tokenizer.encode(s)[0] for s in ("yes", "no")}
    assert starts <= allowed
    assert all(llm.tokenizer.decode([t]) and ("yes".startswith(llm.tokenizer.decode([t]))
                                              or "no".startswith(llm.tokenizer.decode([t]))) for t in allowed)


# ---- compiling ---------------------------------------------------------------------------------------------------

def test_whitespace_pattern_allows_whitespace_where_json_is_otherwise_compact(llm):
    so, tok = llm.engine.structured, llm.tokenizer
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spaced = StructuredOutputsParams(json=schema, whitespace_pattern=r"[ ]?")
    assert accepts(so, spaced, tok, '{ "a": 1 }') and not accepts(so, spaced, tok, '{  "a"')
    compact = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    assert accepts(so, compact, tok, '{"a":1}') and not accepts(so, compact, tok, '{ "a"')
    assert not accepts(so, StructuredOutputsParams(json=schema), tok, '{"a": 1')


def test_grammar_cache_compiles_a_schema_once(llm):
    so = llm.engine.structured
    a = so.compile(StructuredOutputsParams(json=SCHEMA))
    reordered = json.dumps(dict(reversed(list(SCHEMA.items()))))  # the same schema, as JSON text, keys reordered
    assert so.compile(StructuredOutputsParams(json=reordered)) is a
    assert so.compile(StructuredOutputsParams(json={**SCHEMA, "required": ["name"]})) is not a
    # each request advances its own copy: the cached matcher stays pristine
    m = so.matcher(StructuredOutputsParams(json=SCHEMA), [1])
    m.accept(llm.tokenizer.encode("{")[0], False)
    assert so.compile(StructuredOutputsParams(json=SCHEMA)) is a
    assert a.is_accepting() is False and not a.get_error()
    fresh = so.matcher(StructuredOutputsParams(json=SCHEMA), [1])
    with pytest.raises(ValueError, match="rejected"):
        fresh.accept(llm.tokenizer.encode("x")[0], False)  # a pristine copy starts before the "{"


def accepts(so, c: StructuredOutputsParams, tokenizer, text: str) -> bool:
    m = so.matcher(c, [1])
    try:
        for t in tokenizer.encode(text):
            m.accept(t, False)
    except ValueError:
        return False
    return True


def test_objects_listing_properties_take_no_others(llm):
    """As xgrammar's strict mode (vLLM's default): an object that lists properties takes no others unless the schema
    says so, at any depth; disable_additional_properties closes the objects that list none too."""
    so, tok = llm.engine.structured, llm.tokenizer
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "integer"}}}},
        "c": {"type": "object", "properties": {"z": {"type": "integer"}}, "additionalProperties": True},
        "d": {"enum": [{"properties": {}}]},
        "e": {"type": "object"}}}
    default = StructuredOutputsParams(json=schema)
    closed = StructuredOutputsParams(json=schema, disable_additional_properties=True)
    for c in (default, closed):
        for extra in ('{"q":1', '{"a":{"x":1,"w":2', '{"b":[{"y":1,"w":2'):
            assert not accepts(so, c, tok, extra), extra
        assert accepts(so, c, tok, '{"a":{"x":1},"b":[{"y":2}],"c":{"z":3,"w":4},"d":{"properties":{}},"e":{}}')
    assert accepts(so, default, tok, '{"e":{"k":1}}')
    assert not accepts(so, closed, tok, '{"e":{"k":1}}')
    assert schema["properties"]["a"] == {"type": "object", "properties": {"x": {"type": "integer"}}}  # untouched


def test_a_constraint_too_costly_to_start_is_refused_and_not_cached(llm, monkeypatch):
    """A hostile regex such as (a{1000}){1000} makes its first mask take seconds: refused at compile time, which the
    server runs in a worker thread, so no engine step pays it. The limit is lowered here to keep the test fast."""
    so = llm.engine.structured
    c = StructuredOutputsParams(regex="(a{30}){30}")
    monkeypatch.setattr("qwen35.engine.structured.MAX_FIRST_MASK_SECONDS", 0.0)
    for _ in range(2):  # not cached: refused again
        with pytest.raises(StructuredOutputError, match=r"regex constraint is too complex: its first token mask"):
            so.compile(c)
    monkeypatch.undo()
    assert so.compile(c) is so.compile(c)  # compiled now that the limit allows it, and cached from then on


@pytest.mark.parametrize("constraint, message", [
    ({"regex": "(ab"}, r"invalid regex constraint: .*"),
    ({"grammar": "start: foo"}, r"invalid grammar constraint: .*foo"),
    ({"grammar": "root ::= \"a\" undefined_rule"}, r"invalid grammar constraint: .*undefined_rule|GBNF"),
    ({"json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, r"(?i)json.*no-such-type"),
    ({"json": {"type": "string", "minLength": 5, "maxLength": 2}}, r"(?i)json"),
])
def test_invalid_constraints_raise_a_clear_error(llm, constraint, message):
    with pytest.raises(StructuredOutputError, match=message):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(structured_outputs=constraint, max_tokens=4))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("constraint, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "choice"),
    ({"json": "{not json"}, "not valid JSON"), ({"json": [1]}, "JSON schema"), ({"grammar": ""}, "grammar"),
])
def test_malformed_structured_outputs_params_name_the_problem(constraint, message):
    with pytest.raises(SamplingParamsError, match=f"structured_outputs.*{message}"):
        SamplingParams(structured_outputs=constraint)


# ---- generation --------------------------------------------------------------------------------------------------

def test_json_schema_greedy_and_sampled_outputs_validate(llm):
    prompt = ask(llm, "Describe the json module as an object.")
    outs = llm.generate([{"prompt_token_ids": prompt}] * 4, [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": SCHEMA})] + [
        SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs={"json": SCHEMA}) for s in range(3)])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop" and valid(c.text), c.text


def test_n_children_each_satisfy_the_constraint(llm):
    regex = r"[a-z]{3,6}-[0-9]{2}"
    out = llm.generate({"prompt_token_ids": ask(llm, "a name")}, SamplingParams(
        n=4, temperature=1.5, seed=7, max_tokens=20, structured_outputs={"regex": regex}))[0]
    texts = [c.text for c in out.outputs]
    assert len(texts) == 4 and all(re.fullmatch(regex, t) for t in texts), texts
    assert all(c.finish_reason == "stop" for c in out.outputs)
    assert len(set(texts)) > 1  # the children sample independently


def test_a_request_with_no_allowed_token_fails_alone(llm):
    """The grammar allows only "yes"/"no" but allowed_token_ids excludes their tokens; another request whose grammar
    ends before min_tokens can only continue with EOS, which min_tokens bans. Both fail with an error; the
    requests batched with them finish normally."""
    prompt = ask(llm, "yes or no?")
    yes_no = {llm.tokenizer.encode(s)[0] for s in ("yes", "no")}
    other = next(t for t in range(100, 200) if t not in yes_no)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 4, [
        free,
        SamplingParams(temperature=0, max_tokens=8, allowed_token_ids=[other], structured_outputs={"choice": ["yes",
                                                                                                            "no"]}),
        SamplingParams(temperature=0, max_tokens=8, min_tokens=4, structured_outputs={"choice": ["yes", "no"]}),
        SamplingParams(temperature=0, max_tokens=8, structured_outputs={"choice": ["yes", "no"]})])
    alone = llm.generate({"prompt_token_ids": prompt}, free)[0]
    assert outs[0].outputs[0].token_ids == alone.outputs[0].token_ids and outs[0].error is None
    for o in outs[1:3]:
        assert o.outputs[0].finish_reason == "error"
        assert o.error and re.search(r"no token|cannot continue|-inf", o.error), o.error
    assert outs[3].outputs[0].text in ("yes", "no") and outs[3].outputs[0].finish_reason == "stop"
    assert not llm.engine.has_unfinished_requests()


def test_a_sampled_request_with_no_allowed_token_gets_a_clear_error(llm):
    yes_no = {llm.tokenizer.encode(s)[0] for s in ("yes", "no")}
    other = next(t for t in range(100, 200) if t not in yes_no)
    out = llm.generate({"prompt_token_ids": ask(llm, "yes or no?")}, SamplingParams(
        temperature=1.0, seed=0, max_tokens=8, allowed_token_ids=[other], structured_outputs={"choice": ["yes",
                                                                                                      "no"]}))[0]
    assert out.outputs[0].finish_reason == "error"
    assert "no token can be sampled" in out.error, out.error


def test_allowed_token_ids_without_a_token_are_rejected(llm):
    with pytest.raises(EngineError, match="allowed_token_ids"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(allowed_token_ids=[10800], max_tokens=2))


def test_mixed_batch_gives_each_request_its_tokens_alone(llm):
    prompts = [ask(llm, q) for q in ("What is a list?", "Describe the os module.", "Name a type.", "Say hi.")]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0, max_tokens=10, structured_outputs={"regex": r"(int|str|float)\.?"}),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    alone = [llm.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert valid(together[1].outputs[0].text)


def test_the_grammar_waits_for_the_end_of_the_thinking(llm):
    so, tok = llm.engine.structured, llm.tokenizer
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    c = StructuredOutputsParams(choice=["yes"])
    assert so.matcher(c, [5, think, end, 7]).active  # a closed think block: constrained at once
    m = so.matcher(c, [5, think, 7])
    assert not m.active
    for t in tok.encode("some free thoughts {"):  # not JSON, not "yes": accepted while thinking
        m.accept(t, False)
    assert not m.active
    m.accept(end, False)
    assert m.active
    with pytest.raises(ValueError, match="rejected"):
        m.accept(tok.encode("no")[0], False)


def test_thinking_then_constrained_answer(llm):
    """With the prompt inside an open think block and a +100 bias on `</think>`, the model closes the block first
    (a token the grammar would not allow), then writes the constrained answer: the bias cannot lift a masked id."""
    tok = llm.tokenizer
    end = tok.token_to_id("</think>")
    prompt = tok.encode("<|im_start|>user\nDescribe the json module.<|im_end|>\n<|im_start|>assistant\n<think>\n")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(
        temperature=0, max_tokens=60, logit_bias={end: 100}, skip_special_tokens=False,
        structured_outputs={"json": SCHEMA}))[0].outputs[0]
    assert out.token_ids[0] == end and out.token_ids.count(end) == 1
    assert out.text.startswith("</think>") and valid(out.text.removeprefix("</think>")), out.text
    # without the gate the same bias could not produce `</think>` first: JSON must start with "{"
    closed = llm.generate({"prompt_token_ids": prompt + [end]}, SamplingParams(
        temperature=0, max_tokens=60, logit_bias={end: 100}, structured_outputs={"json": SCHEMA}))[0].outputs[0]
    assert end not in closed.token_ids and valid(closed.text)


# ---- logit_bias and allowed_token_ids ----------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0])


def draw(params, seed=0, n=400):
    g = torch.Generator().manual_seed(seed)
    return {sample_row(LOGITS, SampleRow(params, [], [], g, [])) for _ in range(n)}


def test_allowed_token_ids_draw_only_from_those():
    assert draw(SamplingParams(temperature=1.0, allowed_token_ids=[3, 6])) == {3, 6}
    assert sample_row(LOGITS, SampleRow(SamplingParams(temperature=0, allowed_token_ids=[5, 7]), [], [], None,
                                        [])) == 5
    out = apply_token_filters(LOGITS.clone(), SamplingParams(allowed_token_ids=[1, 99]))  # ids past V are ignored
    assert torch.isinf(out[[0, 2, 3, 4, 5, 6, 7]]).all() and out[1] == 1.5


def test_logit_bias_adds_and_forces():
    out = apply_token_filters(LOGITS.clone(), SamplingParams(logit_bias={2: 0.5, 6: -2}))
    assert out[2] == 1.5 and out[6] == -5.0 and torch.equal(out[[0, 1, 3, 4, 5, 7]], LOGITS[[0, 1, 3, 4, 5, 7]])
    assert draw(SamplingParams(temperature=1.0, logit_bias={7: 100})) == {7}
    assert draw(SamplingParams(temperature=1.0, logit_bias={0: -100, 1: -100})) <= {2, 3, 4, 5, 6, 7}
    # a bias on an id outside allowed_token_ids does not bring it back
    assert draw(SamplingParams(temperature=1.0, allowed_token_ids=[4, 5], logit_bias={0: 100})) == {4, 5}


@pytest.mark.parametrize("kwargs, message", [
    ({"logit_bias": {3: 101}}, r"logit_bias has value 101.*\[-100, 100\]"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias has value nan"),
    ({"logit_bias": {-1: 1}}, "logit_bias has key -1"),
    ({"logit_bias": {"x": 1}}, "logit_bias has key 'x'"),
    ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids must be"),
])
def test_bias_and_allowed_ids_validation(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_keys_may_be_strings():
    assert SamplingParams(logit_bias={"5": 2}).logit_bias == {5: 2}


@pytest.mark.parametrize("field", ["logit_bias", "allowed_token_ids"])
def test_ids_beyond_the_vocabulary_are_rejected(llm, field):
    value = {10816: 1} if field == "logit_bias" else [1, 10816]
    with pytest.raises(EngineError, match=f"{field}: 10816 is not a token id"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(**{field: value}))
