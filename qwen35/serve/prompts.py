"""Client input -> prompt text and token ids for the server: OpenAI messages checked and normalized for the chat
template, rendering and tokenization (called from worker threads: both can take seconds on a large request), and
the early rejection of a prompt that cannot fit the context, judged on its length in bytes before any tokenizing.
The default request-body limit is derived from the same bound."""

from __future__ import annotations

import copy
import json
import math
import unicodedata

import tokenizers

from qwen35.chat import render
from qwen35.chat.template import ChatTemplateError
from qwen35.multimodal.inputs import split_chat_media
from qwen35.multimodal.items import MediaError
from qwen35.serve.middleware import APIError

MiB = 1 << 20
# Unicode normalization shrinks UTF-8 text by at most 3x (KELVIN SIGN, 3 bytes -> "K"; Hangul jamo L+V+T, 9 -> 3).
NORMALIZATION_SHRINK = 3


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token can stand for, or None when the tokenizer gives no such bound (only
    byte-level BPE whose added tokens absorb no neighbouring whitespace is understood)."""
    b = tokenizer.backend
    if not isinstance(b.decoder, tokenizers.decoders.ByteLevel) or not isinstance(b.model, tokenizers.models.BPE):
        return None
    added = list(b.get_added_tokens_decoder().values())
    if any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    # A byte-level BPE token is written with one character per byte, all at or below U+0143.
    longest = max((len(k) if max(k) <= "\u0143" else len(k.encode()) for k in b.get_vocab(with_added_tokens=False)),
                  default=0)
    return max([longest] + [len(t.content.encode()) for t in added])


def default_max_body_bytes(max_model_len: int, token_bytes: int | None, max_image_bytes: int | None) -> int:
    """Room for a max-length text prompt (every token as long as the longest, which JSON escaping of non-ASCII text
    also fits in) plus 1 MiB of JSON around it, and, for a model with a vision tower, one image at the per-image
    size limit as a base64 data: URL. More or larger media go by file or URL."""
    text = max_model_len * (token_bytes or 256) + MiB
    return text + (0 if max_image_bytes is None else -(-max_image_bytes // 3) * 4)


def _content(content, role: str, where: str):
    """OpenAI content parts -> one string, or a list of text and image/video placeholder parts when the message
    carries media (split_chat_media has already replaced image_url / video_url parts by placeholders)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts, got "
                            f"{type(content).__name__}", "messages")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in ("text", "image", "video"):
            raise APIError(400, f"{role} message content part of type {kind!r} is not supported (use text, "
                                "image_url or video_url)", "messages")
        if kind == "text" and not isinstance(part.get("text", ""), str):
            raise APIError(400, f"{where}: a text content part's 'text' must be a string, got "
                                f"{type(part['text']).__name__}", "messages")
        parts.append({"type": "text", "text": part.get("text", "")} if kind == "text" else {"type": kind})
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, f'{where} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}',
                       "messages")
    call = copy.deepcopy(call)
    args = call["function"].get("arguments")
    if isinstance(args, str):
        try:
            args = call["function"]["arguments"] = json.loads(args or "{}")
        except json.JSONDecodeError as e:
            raise APIError(400, f"tool call arguments are not valid JSON: {e}", "messages") from None
    if args is not None and not isinstance(args, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object", "messages")
    return call


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Client messages -> what the chat template expects (string content, tool-call arguments as mappings); a
    message of the wrong shape is a 400 naming it."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"{where} must be an object with a string 'role'", "messages")
        m = dict(m)
        role = m["role"]
        if role == "developer":
            m["role"] = role = "system"
        if "content" in m:
            m["content"] = _content(m["content"], role, where)
        if m.get("reasoning") is not None and m.get("reasoning_content") is None:
            m["reasoning_content"] = m.pop("reasoning")
        calls = m.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be a list", "messages")
        if calls:
            m["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(m)
    return out


class Prompts:
    """Renders and tokenizes the server's prompts. Call from a worker thread: `Tokenizer.encode` releases the GIL,
    so the event loop keeps serving while a long prompt is tokenized."""

    def __init__(self, llm, max_model_len: int, default_chat_template_kwargs: dict | None = None,
                 escape_special_tokens: bool = False):
        self.llm, self.tokenizer, self.max_model_len = llm, llm.tokenizer, max_model_len
        self.escape_special_tokens = escape_special_tokens
        self.default_chat_template_kwargs = default_chat_template_kwargs or {}
        self.max_token_bytes = max_token_bytes(self.tokenizer)
        norm = self.tokenizer.backend.normalizer
        self.normal_form = None if norm is None else type(norm).__name__
        if self.normal_form not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            self.max_token_bytes = None  # a normalizer we cannot bound: no early rejection

    def check_length(self, text: str, param: str) -> None:
        """A 400 when `text` cannot fit the context whatever its tokenization, decided from its UTF-8 length: no
        token stands for more than `max_token_bytes` bytes, after a normalization that shrinks text at most 3x."""
        if self.max_token_bytes is None:
            return
        budget = (self.max_model_len - 1) * self.max_token_bytes  # one position must stay free for the output
        if len(text) <= budget:  # never more characters than bytes
            return
        num_bytes = len(text.encode())
        shrink = 1
        if self.normal_form is not None and not unicodedata.is_normalized(self.normal_form, text):
            shrink = NORMALIZATION_SHRINK
        if num_bytes <= shrink * budget:
            return
        num_tokens = math.ceil(num_bytes / (shrink * self.max_token_bytes))
        raise APIError(400, f"the prompt is {num_bytes} bytes long, so at least {num_tokens} tokens (no token "
                            f"stands for more than {self.max_token_bytes} bytes); max_model_len is "
                            f"{self.max_model_len}", param)

    def encode(self, text: str, param: str | None = "prompt") -> list[int]:
        """Token ids of `text`, after the length check (skipped when `param` is None)."""
        if param is not None:
            self.check_length(text, param)
        return self.tokenizer.encode(text)

    def render_chat(self, messages, tools, template_kwargs, add_generation_prompt=True,
                    continue_final_message=False) -> tuple[str, list, list]:
        """(prompt, image sources, video sources): media parts become the template's placeholders."""
        kwargs = {**self.default_chat_template_kwargs, **(template_kwargs or {})}
        try:
            messages, images, videos = split_chat_media(messages)
        except MediaError as e:
            raise APIError(400, str(e), "messages") from None
        if (images or videos) and self.llm.processor_config is None:
            raise APIError(400, "this model takes text only (no vision tower); it cannot take images or videos",
                           "messages")
        try:
            prompt = render(self.llm, normalize_messages(messages), tools, kwargs, add_generation_prompt,
                            self.escape_special_tokens, continue_final_message)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, f"cannot render the chat template: {e}", "messages") from None
        return prompt, images, videos
