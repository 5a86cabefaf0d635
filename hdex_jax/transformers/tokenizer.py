"""`AutoTokenizer`: the tokenizer of a model, from its compiled checkpoint or from its source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hdex_jax import artifacts, hub
from hdex_jax.validation import check_token


class AutoTokenizer:
    """Loads the Hugging Face tokenizer that belongs to a model id."""

    @staticmethod
    def from_pretrained(model_id: str, token: str | bool | None = None, **kwargs: Any) -> Any:
        """The tokenizer saved in the compiled `ckpt/` of `model_id`; if the model is not compiled yet, the
        tokenizer of its source (a local directory, a GGUF file, the default model or the Hub)."""
        import converters

        token = check_token("token", token)
        ckpt = artifacts.ckpt_dir(hub.model_dir(model_id))
        if artifacts.read_manifest(ckpt) is not None:
            return load_tokenizer(ckpt, **kwargs)
        source = hub.fetch_checkpoint(model_id, token)
        return converters.load_tokenizer(source, **kwargs)


def load_tokenizer(ckpt: Path, **kwargs: Any) -> Any:
    """The Hugging Face fast tokenizer saved in a compiled `ckpt/` directory."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(ckpt, **kwargs)
