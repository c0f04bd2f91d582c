"""Tokenizer test data: the Qwen3.5 tokenizer built once per test process, and a multilingual corpus."""

from __future__ import annotations

import atexit
import json
import functools
import shutil
import tempfile
from pathlib import Path

from qwen35.tokenizer_build import build_qwen35_tokenizer

# The chat template shipped with the Qwen3.5 checkpoints (Apache-2.0), kept in the repository so tests need nothing
# beside the clone.
CHAT_TEMPLATE_PATH = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"
QWEN35_GENERATION_CONFIG = {"bos_token_id": 248044, "pad_token_id": 248044, "eos_token_id": [248046, 248044]}


@functools.lru_cache(maxsize=1)
def qwen35_tokenizer_dir() -> Path:
    """A directory holding the built Qwen3.5 tokenizer.json + tokenizer_config.json (a few seconds, once)."""
    out = Path(tempfile.mkdtemp(prefix="qwen35-tokenizer-"))
    atexit.register(shutil.rmtree, out, True)
    return build_qwen35_tokenizer(out)


def add_qwen35_tokenizer(path: Path, **json_files: dict) -> Path:
    """Give a checkpoint directory the built Qwen3.5 tokenizer and the released chat template, plus any JSON
    files given as name=dict (e.g. generation_config=..., preprocessor_config=...)."""
    for f in qwen35_tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    shutil.copy(CHAT_TEMPLATE_PATH, path / "chat_template.jinja")
    for name, content in json_files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


# One sample per script or hazard. The Chinese sample holds words (加拿大, 俱乐部, 全心全意为人民) that are single
# tokens no chain of merges can build: they only match tiktoken if whole pre-tokens are looked up first.
MULTILINGUAL = {
    "accented_latin": "Ça va? Él está aquí: naïve café in Zürich, Ørsted, Łódź, crème brûlée, Ångström, Việt Nam.",
    "decomposed_latin": "cafe\u0301 nai\u0308ve A\u030angstro\u0308m Vie\u0323\u0302t",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю. Ёлка, ЙОД.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε! ΆΈΉΊΌΎΏ ΐΰ",
    "arabic": "مرحبا بالعالم! اللغة العربية جميلة جدا. مُحَمَّدٌ رَسُولُ ١٢٣٤٥ ٦٧٨٩٠",
    "hebrew": "שלום עולם! עִבְרִית הִיא שָׂפָה שֵׁמִית. ״ציטוט״",
    "devanagari": "नमस्ते दुनिया! हिन्दी भाषा में क्षत्रिय, ज्ञान और श्री लिखें। १२३४",
    "bengali": "আমার সোনার বাংলা, আমি তোমায় ভালোবাসি। ক্ষ্ম ৳১২৩",
    "tamil": "வணக்கம் உலகம்! தமிழ் மொழி மிகவும் பழமையானது. க்ஷ ஸ்ரீ",
    "thai": "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ ๑๒๓ กรุงเทพมหานคร",
    "khmer": "សួស្តីពិភពលោក ភាសាខ្មែរ ព្រះរាជាណាចក្រកម្ពុជា ១២៣",
    "chinese": "你好，世界！加拿大和新加坡的足球俱乐部。全心全意为人民服务，众所周知，不可思议。龘靐齉",
    "japanese": "こんにちは世界。日本語のテキスト、カタカナとひらがな。ｶﾀｶﾅ 〜「引用」",
    "korean": "안녕하세요 세계! 한국어 텍스트입니다. 똠방각하 펲",
    "emoji": "Hi 👋🌍! family 👨‍👩‍👧‍👦 couple 👩‍❤️‍💋‍👨 flags 🇺🇸🇯🇵🇪🇺 🏳️‍🌈 🏴‍☠️ skin 👍🏽👍🏿 keycap 1️⃣#️⃣ 🧑‍💻",
    "code": (
        "def fib(n: int) -> int:\n    \"\"\"Return F(n).\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
        "\t\ta, b = b, a + b  # tabs!\n    return a\n\nprint(f\"{fib(10)=}\")\n"
        "const re = /^[\\w.-]+@\\w+\\.(com|org)$/;\n{\"key\": [1, 2.5e-3, null, true], \"k2\": \"v\\n\"}\n"
        "x->y; a != b && c <= d || e >>= 2; arr[i++] = ~mask ^ 0xFF;\n"
    ),
    "digits": "1234567890123456789012345678901234567890 3.14159265358979 1,000,000 2024-01-31 ٣٤٥ ½ ² ⅷ",
    "whitespace": "a    b\t\t\tc\n\n\n   \n d  \r\n e \u00a0f\u3000g\u2003h   \n\n\t \n   trailing   ",
    "contractions": "I'm, you're, they'LL, it's, WE'VE, she'd, don't, 'tis, O'Brien's",
    "special_tokens": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
        "<|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n<tool_call>\n<function=f>\n"
        "<parameter=x>\n1\n</parameter>\n</function>\n</tool_call><|im_end|><|endoftext|><|audio_pad|><tts_pad>"
        "<tool_callx> <|im_end <think"
    ),
}
MULTILINGUAL["everything"] = "\n".join(MULTILINGUAL.values())
