"""Training data: chats (OpenAI `messages`, rendered with the checkpoint's chat template, loss on the assistant's
tokens only) and plain text, read from JSONL or .txt files into token samples, then packed into micro-batches.

A chat's assistant turns are found in the rendered text by their ChatML markers (`<|im_start|>assistant\\n` ...
`<|im_end|>`, written by the template, never by a message), and the text is tokenized in pieces cut at those
points: the prompt up to `<|im_start|>assistant\\n` is encoded on its own, as at inference, where the model then
generates the reply token by token. Every bad line (malformed JSON, a chat the template rejects, a sample longer
than `max_length`) is a `DataError` naming file and line; with `on_bad_sample="skip"` it is reported and skipped.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from qwen35.chat.template import ChatPrompt, ChatTemplate, ChatTemplateError
from qwen35.tokenizer import Tokenizer

ASSISTANT_START = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
DOC_END = "<|endoftext|>"  # appended to plain-text samples so the model learns where a document stops


class DataError(ValueError):
    """A training sample qwen35 cannot use; the message names the file and line."""


@dataclass
class Sample:
    ids: list[int]
    mask: list[bool]  # mask[i]: token i is a training target (its prediction from tokens < i counts in the loss)
    where: str  # "file:line" (a .txt file's window: "file:window N")

    def __len__(self) -> int:
        return len(self.ids)


def _in_spans(pos: int, spans) -> bool:
    return any(a <= pos < b for a, b in spans)


def assistant_spans(prompt: str) -> list[tuple[int, int]]:
    """(start, end) character ranges of each assistant reply in a rendered chat: from just after
    `<|im_start|>assistant\\n` to the end of its `<|im_end|>`. Markers inside message content (the prompt's
    `literal_spans`) are text, not turns."""
    literal = getattr(prompt, "literal_spans", ())
    spans, pos = [], 0
    for m in re.finditer(re.escape(ASSISTANT_START), prompt):
        if m.start() < pos or _in_spans(m.start(), literal):
            continue
        end = m.end()
        while True:
            end = prompt.find(TURN_END, end)
            if end < 0:
                raise ChatTemplateError("an assistant turn has no <|im_end|> in the rendered chat")
            if not _in_spans(end, literal):
                break
            end += len(TURN_END)
        spans.append((m.end(), end + len(TURN_END)))
        pos = end
    return spans


def _piece(prompt: str, a: int, b: int) -> ChatPrompt:
    literal = [(max(x, a) - a, min(y, b) - a) for x, y in getattr(prompt, "literal_spans", ()) if x < b and y > a]
    return ChatPrompt(prompt[a:b], literal)


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate, messages, tools=None, **template_kwargs
                ) -> tuple[list[int], list[bool]]:
    """Token ids of a whole chat and its loss mask (True on every assistant reply's tokens, `<|im_end|>` included).
    Raises ChatTemplateError when the template rejects the chat or its assistant turns cannot be found."""
    prompt = template.render(messages, tools=tools, literal_tokens=tokenizer.special_tokens, **template_kwargs)
    spans = assistant_spans(prompt)
    want = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
    if len(spans) != want:
        raise ChatTemplateError(f"found {len(spans)} assistant turns in the rendered chat, expected {want} (is the "
                                f"template ChatML, with {ASSISTANT_START!r} ... {TURN_END!r}?)")
    if not spans:
        raise ChatTemplateError("the chat has no assistant message, so nothing to learn from")
    ids, mask, pos = [], [], 0
    for a, b in spans + [(len(prompt), len(prompt))]:
        for start, end, train in ((pos, a, False), (a, b, True)):
            if end > start:
                piece = tokenizer.encode(_piece(prompt, start, end))
                ids += piece
                mask += [train] * len(piece)
        pos = b
    return ids, mask


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    end = tokenizer.token_to_id(DOC_END)
    if end is None and tokenizer.eos_token_ids:
        end = tokenizer.eos_token_ids[0]
    return tokenizer.encode(text) + ([end] if end is not None else [])


def load_samples(path: str | Path, tokenizer: Tokenizer, max_length: int, on_bad_sample: str = "error",
                 template_kwargs: dict | None = None, log=None) -> list[Sample]:
    """Samples of one file. `.txt`: the whole file is one document, cut into windows of max_length tokens (every
    token a target). Otherwise JSONL, one object per line: {"messages": [...], "tools": [...]?} (a chat) or
    {"text": "..."} (every token a target). on_bad_sample: "error" raises DataError at the first bad line, "skip"
    reports it through `log` (default: stderr) and goes on."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    path = Path(path)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read training data ({e})") from None
    if path.suffix == ".txt":
        ids = encode_text(tokenizer, text)
        return [Sample(ids[i:i + max_length], [True] * len(ids[i:i + max_length]), f"{path}:window {i // max_length}")
                for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    template = None
    if tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    samples, skipped = [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            samples.append(_parse_line(line, where, tokenizer, template, max_length, template_kwargs or {}))
        except DataError as e:
            if on_bad_sample == "error":
                raise
            skipped += 1
            log(f"skipping {e}")
    if skipped:
        log(f"{path}: skipped {skipped} bad sample{'s' if skipped > 1 else ''}, kept {len(samples)}")
    if not samples:
        raise DataError(f"{path}: no usable training samples")
    return samples


def _parse_line(line: str, where: str, tokenizer: Tokenizer, template, max_length: int, template_kwargs) -> Sample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not ("messages" in obj or "text" in obj):
        raise DataError(f"{where}: expected an object with 'messages' (a chat) or 'text' (plain text)")
    if "messages" in obj:
        if template is None:
            raise DataError(f"{where}: a chat sample needs the checkpoint's chat template, and it has none")
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of message objects")
        if any(isinstance(part, dict) and part.get("type", "text") != "text"
               for m in messages if isinstance(m.get("content"), list) for part in m["content"]):
            raise DataError(f"{where}: only text content parts can be trained on (no images or video)")
        try:
            ids, mask = encode_chat(tokenizer, template, messages, tools=obj.get("tools"), **template_kwargs)
        except ChatTemplateError as e:
            raise DataError(f"{where}: {e}") from None
    else:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        ids = encode_text(tokenizer, obj["text"])
        mask = [True] * len(ids)
    if len(ids) > max_length:
        raise DataError(f"{where}: sample is {len(ids)} tokens, longer than the maximum length {max_length}")
    if not any(mask[1:]):
        raise DataError(f"{where}: sample has no tokens to learn from")
    return Sample(ids, mask, where)


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded random `fraction` of the samples held out (at least one when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(samples)))
    if n >= len(samples):
        raise ValueError(f"eval fraction {fraction} leaves no training samples out of {len(samples)}")
    held = set(order[:n])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def pack(lengths: list[int], batch_tokens: int, order: list[int] | None = None) -> list[list[int]]:
    """Group sample indices (taken in `order`) into micro-batches of at most `batch_tokens` tokens, greedily, in
    order: a sample that does not fit starts the next micro-batch. Every sample must fit on its own."""
    batches, current, size = [], [], 0
    for i in order if order is not None else range(len(lengths)):
        if lengths[i] > batch_tokens:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit in a micro-batch of {batch_tokens}")
        if current and size + lengths[i] > batch_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(i)
        size += lengths[i]
    if current:
        batches.append(current)
    return batches
