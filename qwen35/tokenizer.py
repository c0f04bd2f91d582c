"""Text <-> token ids for a checkpoint directory, and streaming detokenization.

`Tokenizer.from_dir` reads `tokenizer.json` with the `tokenizers` library and merges in what only
`tokenizer_config.json` declares: added tokens missing from tokenizer.json (Qwen3.5's audio/TTS tokens), the eos
token and the chat template (`chat_template.jinja` wins over the config copy). Stop ids also come from
`generation_config.json`, since Qwen3.5 must stop on both `<|im_end|>` and `<|endoftext|>`.
`IncrementalDetokenizer` turns ids arriving one at a time into text deltas that never split a UTF-8 character.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers

REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # Older configs spell special tokens as {"content": "...", ...} instead of a bare string.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A loaded tokenizer: encode/decode plus the ids and strings the engine and chat template need."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        eos_token_ids: Iterable[int] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        self.chat_template = chat_template
        self._literal_backend: tuple[tokenizers.Tokenizer, re.Pattern] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | Path, generation_config: Mapping | None = None) -> Tokenizer:
        """Load from a checkpoint directory; `generation_config` defaults to the directory's generation_config.json."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: no tokenizer.json in the checkpoint directory")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises a bare Exception for any parse error
            raise ValueError(f"{tok_file}: malformed tokenizer.json ({exc})") from None

        config_file = root / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        _add_config_tokens(backend, config.get("added_tokens_decoder") or {}, config_file)

        if generation_config is None and (root / "generation_config.json").is_file():
            generation_config = _read_json(root / "generation_config.json")
        eos_token = _token_content(config.get("eos_token"))
        eos_ids = []
        if eos_token is not None:
            eos_id = backend.token_to_id(eos_token)
            if eos_id is None:
                raise ValueError(f"{config_file}: eos_token {eos_token!r} is not in the vocabulary")
            eos_ids.append(eos_id)
        gen_eos = (generation_config or {}).get("eos_token_id")
        eos_ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])

        template_file = root / "chat_template.jinja"
        chat_template = template_file.read_text("utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(chat_template, list):
            # The multi-template form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
            chat_template = named.get("default")
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=eos_token,
            pad_token=_token_content(config.get("pad_token")),
            chat_template=chat_template if isinstance(chat_template, str) else None,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (BPE + added). The model's embedding may have more rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The added tokens marked special (`<|im_start|>`, `<|image_pad|>`, ...), which `encode` matches in text."""
        return tuple(t.content for _, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special)

    @property
    def added_tokens(self) -> frozenset[str]:
        """Every added token (special or not: `<tool_call>`, `<think>`, ...): single ids that grammars name bare."""
        return frozenset(t.content for t in self.backend.get_added_tokens_decoder().values())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added tokens written in the text (e.g. `<|im_start|>`) become their single ids,
        except special tokens inside the `literal_spans` of a ChatPrompt (strings that came from message content):
        those are encoded as plain text, in context, as if the tokenizer had no special tokens."""
        spans = getattr(text, "literal_spans", ())
        if not spans:  # encode_batch releases the GIL (encode does not): other threads run meanwhile
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens:
            raise ValueError("a chat prompt is encoded as written: its template adds any BOS/EOS itself")
        literal, found = self._literal()
        # Splitting at the special tokens the template wrote is what the tokenizer does anyway: text between added
        # tokens is encoded piece by piece. Only the pieces are encoded with special tokens treated as text.
        ids, pos, spans = [], 0, iter(sorted(spans))
        span = next(spans, None)
        for m in found.finditer(text):
            while span is not None and span[1] <= m.start():
                span = next(spans, None)
            if span is not None and span[0] < m.end():  # written by the user, not by the template
                continue
            ids += literal.encode(text[pos:m.start()], add_special_tokens=False).ids
            ids.append(self.backend.token_to_id(m[0]))
            pos = m.end()
        ids += literal.encode(text[pos:], add_special_tokens=False).ids
        return ids

    def _literal(self) -> tuple[tokenizers.Tokenizer, re.Pattern]:
        """A twin that shares this tokenizer's model but encodes special tokens as text (`encode_special_tokens` is
        state on the tokenizer object, and other threads keep encoding with this one), and a regex of the special
        tokens, longest first as the tokenizer matches them."""
        with self._lock:
            if self._literal_backend is None:
                b, added = self.backend, self.backend.get_added_tokens_decoder()
                twin = tokenizers.Tokenizer(b.model)
                twin.normalizer, twin.pre_tokenizer, twin.decoder = b.normalizer, b.pre_tokenizer, b.decoder
                twin.add_tokens([added[i] for i in sorted(added)])
                if any(twin.token_to_id(t.content) != i for i, t in added.items()):  # ids with gaps: copy instead
                    twin = tokenizers.Tokenizer.from_str(b.to_str())
                twin.encode_special_tokens = True
                specials = sorted(self.special_tokens, key=len, reverse=True)
                self._literal_backend = twin, re.compile("|".join(map(re.escape, specials)) if specials else "(?!)")
            return self._literal_backend

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _add_config_tokens(backend: tokenizers.Tokenizer, decoder: Mapping, config_file: Path) -> None:
    """Add the tokens of tokenizer_config's added_tokens_decoder that tokenizer.json lacks, checking their ids."""
    try:
        entries = sorted((int(i), e) for i, e in decoder.items())
    except (TypeError, ValueError):
        raise ValueError(f"{config_file}: added_tokens_decoder keys must be token ids") from None
    for token_id, entry in entries:
        content = entry.get("content") if isinstance(entry, Mapping) else None
        if not isinstance(content, str):
            raise ValueError(f"{config_file}: added token {token_id} has no content")
        if backend.token_to_id(content) is None:
            token = tokenizers.AddedToken(
                content,
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", False)),
                special=bool(entry.get("special", False)),
            )
            # tokenizers assigns the next free id; the config's id must be exactly that.
            backend.add_tokens([token])
        actual = backend.token_to_id(content)
        if actual != token_id:
            raise ValueError(
                f"{config_file}: added token {content!r} is declared with id {token_id} but gets id {actual}; "
                "tokenizer.json and tokenizer_config.json disagree"
            )


class IncrementalDetokenizer:
    """Feed ids one at a time, get the new text; the deltas always concatenate to `decode(all ids)`.

    Only a window of recent ids is decoded per step: `prefix` marks where the window starts (a character boundary)
    and `read` where the already emitted text ends. Text is held back while the window's decode ends in U+FFFD,
    which is how a character split across tokens shows up; `finish()` releases whatever is still held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._pieces: list[str] = []  # not one growing str: appending to it would copy it on every token
        self._prefix = 0
        self._read = 0

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """Return any held-back text (an incomplete character at the very end decodes to U+FFFD, as in decode)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self.ids[self._prefix :])
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._pieces.append(delta)
        return delta
