"""qwen35: a small, fast, exact implementation of the Qwen3.5 / Qwen3-Next model family and the engine that
serves it."""

__version__ = "0.1.0"
