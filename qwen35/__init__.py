"""qwen35: a small, fast, exact implementation of the Qwen3.5 / Qwen3-Next model family and the engine that
serves it."""

__version__ = "0.1.0"

from qwen35.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from qwen35.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402


def __getattr__(name):
    if name == "LLM":  # imports torch and the model code only when used
        from qwen35.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
