"""The demo model's training corpus: Python documentation every machine has offline, shaped into Qwen3.5 chats.

Two sources, both in the standard library: the language reference topics of `pydoc_data.topics` (what `help("with")`
prints), split at their section headings, and the docstrings of a fixed list of modules, their public functions and
classes, and those classes' public methods. Each document becomes a conversation (the user asks about the title, the
assistant answers with the first paragraphs of the cleaned text) rendered with qwen35's chat template in the
non-thinking form the template gives a final answer (an empty `<think>` block). The text differs between Python
versions, so the corpus records the interpreter version and a sha256 of everything it holds.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydoc_data.topics import topics as PYDOC_TOPICS

from qwen35.chat.template import ChatTemplate
from qwen35.tokenizer import Tokenizer

CHAT_TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "data" / "chat_template.jinja"

# Modules present in every CPython since 3.8; a module a build lacks (e.g. sqlite3) is skipped.
MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "builtins", "calendar", "cmath", "collections",
    "collections.abc", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "io", "itertools",
    "json", "logging", "math", "operator", "os", "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "secrets", "shlex", "shutil", "sqlite3", "statistics", "string", "struct", "subprocess", "tempfile", "textwrap",
    "threading", "time", "timeit", "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile", "zlib",
)
# Hooks a host process may have replaced (pytest does): left out so the corpus is the same under any runner.
SKIPPED = frozenset({"threading.excepthook"})
HELD_OUT_PERCENT = 5
MAX_ANSWER_CHARS = 4000
MAX_PARAGRAPHS = 20
MIN_ANSWER_CHARS = 40
MAX_METHODS_PER_CLASS = 60
MULTI_TURN_PERCENT = 15
SYSTEM_PERCENT = 20
SYSTEM_PROMPT = "You are a helpful assistant who knows Python well."
ASSISTANT_HEADER = "<|im_start|>assistant\n"
ASSISTANT_END = "<|im_end|>"

TOPIC_QUESTIONS = ("Explain {t}.", "What is {t} in Python?", "Tell me about {t}.", "How does {t} work in Python?")
MODULE_QUESTIONS = ("Tell me about the module `{t}`.", "What is the `{t}` module for?",
                    "What does the Python module `{t}` do?")
CLASS_QUESTIONS = ("What is `{t}`?", "Explain the class `{t}`.", "What does `{t}` do?")
ROUTINE_QUESTIONS = ("What does `{t}` do?", "How do I use `{t}`?", "Explain `{t}`.", "What is `{t}` for?")

_HEADING_RULE = re.compile(r"([*=\-~^])\1{2,}")
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`")  # :func:`x`, :py:class:`~a.b` -> `x`
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # an object repr's address: differs from run to run
_OLD_SIGNATURE = re.compile(r"[\w.]+\(.*\)( ->.*)?\n\s*\n")  # "fill(text : string) -> string" heading a docstring
_DROP_PARAGRAPH = ("Changed in version", "Added in version", "New in version", "Deprecated since version",
                   "See also:", "Footnotes", ".. ")


@dataclass(frozen=True)
class Document:
    """One piece of documentation: `kind` is topic | module | class | routine; `title` names it uniquely."""

    kind: str
    title: str
    answer: str


@dataclass(frozen=True)
class Sample:
    """One rendered conversation. `assistant_spans` are the [start, end) character ranges of the assistant turns in
    `text`: from after `<|im_start|>assistant\\n` through `<|im_end|>` (the empty think block included), the part a
    trainer puts the loss on."""

    titles: tuple[str, ...]
    messages: tuple[dict, ...]
    text: str
    assistant_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Corpus:
    """The rendered samples in two splits, and what a run needs to say which corpus it trained on."""

    train: tuple[Sample, ...]
    heldout: tuple[Sample, ...]
    python_version: str  # the corpus text depends on it: docstrings change between releases
    platform: str
    sha256: str  # of every sample's text, train then held-out, each followed by a NUL byte
    meta: dict = field(default_factory=dict)

    def texts(self, split: str = "train") -> list[str]:
        return [s.text for s in self._split(split)]

    def num_chars(self, split: str = "train") -> int:
        return sum(len(s.text) for s in self._split(split))

    def _split(self, split: str) -> tuple[Sample, ...]:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown corpus split {split!r}: expected 'train' or 'heldout'")
        return self.train if split == "train" else self.heldout

    def describe(self) -> dict:
        """What docs need to state reproducibility: sizes, the Python version and the text's hash."""
        return {
            "python_version": self.python_version, "platform": self.platform, "sha256": self.sha256,
            "train_samples": len(self.train), "heldout_samples": len(self.heldout),
            "train_chars": self.num_chars("train"), "heldout_chars": self.num_chars("heldout"), **self.meta,
        }


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's str hash is salted per run)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_heldout(title: str) -> bool:
    return stable_hash(title) % 100 < HELD_OUT_PERCENT


def _is_prose(lines: list[str]) -> bool:
    """Wrapped text (one indentation, full lines) rather than code, a table or an aligned parameter list."""
    indents = {len(x) - len(x.lstrip()) for x in lines}
    if len(indents) != 1 or any(x.lstrip().startswith((">>>", "...", "$ ")) for x in lines):
        return False
    # Unindented text is prose; an indented block is prose only if it looks wrapped (pydoc indents definitions).
    if indents == {0}:
        return True
    if len(lines) == 1:  # a sentence, not a line of code
        return lines[0].endswith(".") and lines[0].strip().count(" ") >= 4
    return all(len(x.strip()) >= 40 for x in lines[:-1])


def clean_text(text: str, quoted_code: bool = False) -> str:
    """Documentation text -> a short answer: reST markup removed, prose unwrapped, code kept line by line in
    fences, footnotes, grammar rules and version notes dropped, cut to the first few paragraphs.

    `quoted_code`: the text is pydoc's plain-text rendering, where inline literals are written "like_this"."""
    paragraphs: list[str] = []
    code: list[str] = []  # consecutive code blocks form one fence, their relative indentation kept

    def flush_code():
        if code:
            paragraphs.append("```\n" + textwrap.dedent("\n".join(code)) + "\n```")
            code.clear()

    note = ""
    for block in re.split(r"\n\s*\n", textwrap.dedent(text.expandtabs(8)).strip("\n")):
        lines = [x.rstrip() for x in block.split("\n") if x.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if first.startswith(_DROP_PARAGRAPH) or re.match(r"\[\d+\]", first) or "::=" in block:
            continue
        if first in ("Note:", "Warning:", "Tip:") and len(lines) == 1:
            note = first + " "
            continue
        if _is_prose(lines):
            flush_code()
            para = " ".join(x.strip() for x in lines)
            para = _ROLE.sub(r"`\1`", para).replace("``", "`")
            para = re.sub(r"\s*\[\d+\]", "", para)
            if quoted_code:
                para = re.sub(r'"([^"\s]+)"', r"`\1`", para)
            para = re.sub(r"::$", ":", para)
            paragraphs.append(note + para)
            note = ""
        else:
            code += [""] * bool(code) + lines
    flush_code()
    out: list[str] = []
    size = 0
    for para in paragraphs[:MAX_PARAGRAPHS]:
        if out and size + len(para) > MAX_ANSWER_CHARS:
            break
        if not out and len(para) > MAX_ANSWER_CHARS:  # one long paragraph: cut at a sentence end
            if para.startswith("```"):
                break
            cut = para.rfind(". ", 0, MAX_ANSWER_CHARS)
            para = para[: cut + 1] if cut > 0 else para[:MAX_ANSWER_CHARS]
        out.append(para)
        size += len(para) + 2
    while len(out) > 1 and out[-1].endswith(":"):  # its example was cut off
        out.pop()
    return "\n\n".join(out)


def topic_documents() -> Iterator[Document]:
    """The language reference topics, one document per section heading."""
    for key in sorted(PYDOC_TOPICS):
        lines = PYDOC_TOPICS[key].split("\n")
        starts = [i for i in range(len(lines) - 1) if lines[i].strip() and _HEADING_RULE.fullmatch(lines[i + 1])]
        for n, i in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(lines)
            title = re.sub(r'"([^"\s]+)"', r"`\1`", lines[i].strip())
            yield Document("topic", title, clean_text("\n".join(lines[i + 2 : end]), quoted_code=True))


def _own_doc(obj) -> str | None:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else None


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    text = f"{name}{sig}"
    return "" if _ADDRESS.search(text) or len(text) > 200 else f"`{text}`\n\n"


def _with_signature(title: str, obj, doc: str) -> str:
    """The answer for a class or routine: its signature, then its docstring (less an old-style signature line)."""
    sig = _signature(title, obj)
    doc = inspect.cleandoc(doc)
    if _OLD_SIGNATURE.match(doc):
        first, doc = doc.split("\n", 1)
        sig = sig or f"`{first}`\n\n"
    return sig + clean_text(doc)


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        names = dir(module)
    return sorted({n for n in names if not n.startswith("_")})


def _from_stdlib(obj) -> bool:
    """False for what another library added to a standard module (transformers adds `warning_once` to
    logging.Logger): the corpus must not depend on what the process imported."""
    module = getattr(obj, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0] in sys.stdlib_module_names


def docstring_documents() -> Iterator[Document]:
    """Module, class, function and method docstrings of `MODULES`, in a fixed order."""
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if isinstance(module.__doc__, str):
            yield Document("module", module_name, clean_text(inspect.cleandoc(module.__doc__)))
        prefix = "" if module_name == "builtins" else module_name + "."
        for name in _public_names(module):
            obj = getattr(module, name, None)
            doc = _own_doc(obj)
            if doc is None or not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _from_stdlib(obj):
                continue
            title = prefix + name
            if title in SKIPPED:
                continue
            kind = "class" if inspect.isclass(obj) else "routine"
            yield Document(kind, title, _with_signature(title, obj, doc))
            if not inspect.isclass(obj):
                continue
            methods = [(m, v) for m, v in sorted(obj.__dict__.items()) if not m.startswith("_")]
            for method_name, raw in methods[:MAX_METHODS_PER_CLASS]:
                method = getattr(obj, method_name, None)
                doc = _own_doc(raw) or _own_doc(method)
                if doc is None or not inspect.isroutine(method) or not _from_stdlib(method):
                    continue
                title = f"{prefix}{name}.{method_name}"
                yield Document("routine", title, _with_signature(title, method, doc))


def documents() -> list[Document]:
    """All documents, deduplicated by title and by answer text (aliases, re-exports), short ones dropped."""
    seen_titles: set[str] = set()
    seen_answers: set[str] = set()
    out = []
    for doc in (*topic_documents(), *docstring_documents()):
        body = doc.answer.split("`\n\n", 1)[-1] if doc.answer.startswith("`") else doc.answer
        if len(body) < MIN_ANSWER_CHARS or _ADDRESS.search(doc.answer) or "<|" in doc.answer:
            continue
        if doc.title in seen_titles or body in seen_answers:
            continue
        seen_titles.add(doc.title)
        seen_answers.add(body)
        out.append(doc)
    return out


def question(doc: Document, seed: int) -> str:
    """The user's turn, its wording picked by a stable hash so it is the same on every machine."""
    if doc.kind == "topic":
        t = "the" + doc.title[3:] if doc.title.startswith("The ") else doc.title
        choices = TOPIC_QUESTIONS
    else:
        t = doc.title
        choices = {"module": MODULE_QUESTIONS, "class": CLASS_QUESTIONS}.get(doc.kind, ROUTINE_QUESTIONS)
    return choices[stable_hash(f"{seed}:{doc.title}") % len(choices)].format(t=t)


def assistant_spans(text: str) -> tuple[tuple[int, int], ...]:
    spans = []
    start = text.find(ASSISTANT_HEADER)
    while start >= 0:
        begin = start + len(ASSISTANT_HEADER)
        end = text.index(ASSISTANT_END, begin) + len(ASSISTANT_END)
        spans.append((begin, end))
        start = text.find(ASSISTANT_HEADER, end)
    return tuple(spans)


def encode_samples(tokenizer: Tokenizer, samples: Sequence[Sample]) -> list[tuple[list[int], list[bool]]]:
    """(token ids, assistant mask) per sample: `mask[i]` says token i lies in an assistant span, i.e. is a target
    the loss should count when the model predicts it from the tokens before it."""
    out = []
    encodings = tokenizer.backend.encode_batch([s.text for s in samples], add_special_tokens=False)
    for sample, enc in zip(samples, encodings):
        mask = [any(a <= start and end <= b for a, b in sample.assistant_spans) for start, end in enc.offsets]
        out.append((list(enc.ids), mask))
    return out


def _conversations(docs: list[Document], seed: int, template: ChatTemplate) -> tuple[Sample, ...]:
    """Shuffle (seeded), join some neighbours into two-turn chats, give some a system prompt, render."""
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    samples = []
    i = 0
    while i < len(docs):
        group = docs[i : i + 2] if rng.randrange(100) < MULTI_TURN_PERCENT else docs[i : i + 1]
        i += len(group)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.randrange(100) < SYSTEM_PERCENT else []
        for doc in group:
            messages += [{"role": "user", "content": question(doc, seed)}, {"role": "assistant", "content": doc.answer}]
        text = str(template.render(messages))
        spans = assistant_spans(text)
        assert len(spans) == len(group), "an answer holds the assistant header or <|im_end|>"
        samples.append(Sample(tuple(d.title for d in group), tuple(messages), text, spans))
    return tuple(samples)


def build_corpus(seed: int = 0, chat_template: str | None = None) -> Corpus:
    """The corpus, split by document into train and held-out (about 5%, chosen by a hash of each title, so the split
    does not depend on `seed`; `seed` picks question wordings, order, two-turn pairs and system prompts).
    `chat_template` defaults to qwen35's Qwen3.5 template. Takes a few seconds."""
    template = ChatTemplate(chat_template if chat_template is not None else CHAT_TEMPLATE_PATH.read_text("utf-8"))
    docs = documents()
    train = _conversations([d for d in docs if not is_heldout(d.title)], seed, template)
    heldout = _conversations([d for d in docs if is_heldout(d.title)], seed + 1, template)
    digest = hashlib.sha256()
    for sample in (*train, *heldout):
        digest.update(sample.text.encode("utf-8") + b"\0")
    kinds = {}
    for d in docs:
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    return Corpus(
        train=train,
        heldout=heldout,
        python_version=".".join(map(str, sys.version_info[:3])),
        platform=sys.platform,
        sha256=digest.hexdigest(),
        meta={"seed": seed, "documents": kinds},
    )
