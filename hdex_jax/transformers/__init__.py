"""The Hugging Face-like API of HyperDex: AutoModelForCausalLM, AutoTokenizer, TextStreamer."""

from hdex_jax.transformers.modeling import AutoModelForCausalLM, LPUModelForCausalLM
from hdex_jax.transformers.streamer import TextStreamer
from hdex_jax.transformers.tokenizer import AutoTokenizer

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "LPUModelForCausalLM", "TextStreamer"]
