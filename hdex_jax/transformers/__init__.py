"""The Hugging Face-like API of HyperDex: AutoModelForCausalLM, AutoTokenizer, TextStreamer.

`TextStreamer` builds on transformers, which takes seconds to import (as does `AutoTokenizer` when it falls back
on transformers' tokenizers); it is imported when first used, so a script that only loads a model and generates
starts quickly.
"""

from typing import Any

from hdex_jax import runtime
from hdex_jax.transformers.modeling import AutoModelForCausalLM, LPUModelForCausalLM
from hdex_jax.transformers.tokenizer import AutoTokenizer

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "LPUModelForCausalLM", "TextStreamer"]


def __getattr__(name: str) -> Any:
    if name == "TextStreamer":
        runtime.quiet_transformers()  # it imports transformers, possibly before any from_pretrained
        from hdex_jax.transformers.streamer import TextStreamer

        return TextStreamer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
