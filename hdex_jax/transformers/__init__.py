"""The Hugging Face-like API of HyperDex: AutoModelForCausalLM, AutoTokenizer, TextStreamer.

`TextStreamer` and `AutoTokenizer` build on transformers, which takes seconds to import; they are imported
when first used, so a script that only loads a model and generates starts quickly.
"""

from typing import Any

from hdex_jax import runtime
from hdex_jax.transformers.modeling import AutoModelForCausalLM, LPUModelForCausalLM

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "LPUModelForCausalLM", "TextStreamer"]


def __getattr__(name: str) -> Any:
    if name in ("TextStreamer", "AutoTokenizer"):
        runtime.quiet_transformers()  # they import transformers, possibly before any from_pretrained
    if name == "TextStreamer":
        from hdex_jax.transformers.streamer import TextStreamer

        return TextStreamer
    if name == "AutoTokenizer":
        from hdex_jax.transformers.tokenizer import AutoTokenizer

        return AutoTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
