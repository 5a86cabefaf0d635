"""`AutoTokenizer`: the tokenizer of a model, from its compiled checkpoint or from its source; and `Tokenizer`,
the quick-loading one `from_pretrained` gives a model.

transformers' `AutoTokenizer` takes seconds to import (with torch installed it imports torch as well), which
would be most of a compiled model's start-up. `Tokenizer` reads the same `tokenizer.json` with the `tokenizers`
library and renders the chat template with jinja2 as transformers does, for the calls generation needs
(`encode`, `decode`, `apply_chat_template`); any other attribute loads transformers' tokenizer and is its.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from hdex_jax import artifacts, hub, runtime
from hdex_jax.validation import check_token

# The special tokens transformers hands a chat template (its `special_tokens_map`).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class AutoTokenizer:
    """Loads the Hugging Face tokenizer that belongs to a model id."""

    @staticmethod
    def from_pretrained(model_id: str, token: str | bool | None = None, **kwargs: Any) -> Any:
        """The tokenizer saved in the compiled `ckpt/` of `model_id`; if the model is not compiled yet, the
        tokenizer of its source (a local directory, a GGUF file, the default model or the Hub)."""
        import converters

        token = check_token("token", token)
        runtime.quiet_transformers()  # both ways below may import transformers
        source = hub.locate(model_id)
        ckpt = artifacts.ckpt_dir(source.directory)
        if artifacts.read_manifest(ckpt) is not None:
            return load_tokenizer(ckpt, **kwargs)
        return converters.load_tokenizer(source.fetch_checkpoint(token), **kwargs)


def load_tokenizer(ckpt: Path, **kwargs: Any) -> Any:
    """The Hugging Face fast tokenizer saved in a compiled `ckpt/` directory."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(ckpt, **kwargs)


def compiled_tokenizer(ckpt: Path) -> Any:
    """The tokenizer of a compiled `ckpt/`: a quick `Tokenizer` when it has a fast tokenizer's `tokenizer.json`,
    else transformers' tokenizer of its files, or None for a checkpoint compiled without a tokenizer (the model
    then takes and returns token ids)."""
    if (ckpt / "tokenizer.json").is_file():
        return Tokenizer(ckpt)
    import converters

    return load_tokenizer(ckpt) if converters.has_tokenizer(ckpt) else None


class Tokenizer:
    """The tokenizer of a compiled `ckpt/`, without importing transformers for `encode`, `decode` and
    `apply_chat_template` (same results as transformers' fast tokenizer; `tests/test_exported_programs.py`)."""

    def __init__(self, ckpt: Path):
        import tokenizers

        self._ckpt = ckpt
        self._backend = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        config_path = ckpt / "tokenizer_config.json"
        self._config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = ckpt / "chat_template.jinja"
        self.chat_template: str | None = (template.read_text() if template.is_file()
                                          else self._config.get("chat_template"))
        self._hf: Any = None
        self._template: Any = None

    @property
    def hf(self) -> Any:
        """transformers' tokenizer of the same files, loaded on first use."""
        if self._hf is None:
            self._hf = load_tokenizer(self._ckpt)
        return self._hf

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if kwargs:
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        # transformers' clean-up of tokenization spaces (off for BPE tokenizers) is left to transformers.
        if kwargs or (self._config.get("clean_up_tokenization_spaces")
                      and type(self._backend.model).__name__ != "BPE"):
            return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, **kwargs: Any) -> Any:
        """The conversation rendered with the model's chat template as transformers renders it, then token ids
        (no special tokens added: the template writes them) unless `tokenize=False`."""
        if kwargs or return_dict or self.chat_template is None:
            return self.hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                               tokenize=tokenize, return_dict=return_dict, **kwargs)
        special = {name: self._config[name] for name in _SPECIAL_TOKENS if isinstance(self._config.get(name), str)}
        text = self._compiled().render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                       **special)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _compiled(self) -> Any:
        """The chat template compiled in a sandbox with transformers' settings and helpers."""
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                       sort_keys: bool = False) -> str:
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template
