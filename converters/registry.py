"""model_type -> the converter for that family of Hugging Face checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from converters import llama, opt
from converters.errors import UnsupportedModelError
from converters.keymap import Rule
from hdex_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Converter:
    """What a family provides: its config.json -> ModelConfig, and its tensor key map for a config."""

    config_from_hf: Callable[[Mapping[str, Any], str], ModelConfig]
    key_map: Callable[[ModelConfig], list[Rule]]


_LLAMA = Converter(llama.config_from_hf, llama.key_map)
_OPT = Converter(opt.config_from_hf, opt.key_map)

_CONVERTERS: dict[str, Converter] = {
    **{model_type: _LLAMA for model_type in llama.MODEL_TYPES},
    **{model_type: _OPT for model_type in opt.MODEL_TYPES},
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_CONVERTERS)


def get_converter(model_type: str | None, source: str = "config.json") -> Converter:
    """The converter for `model_type`, or an UnsupportedModelError listing the supported types."""
    if model_type not in _CONVERTERS:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return _CONVERTERS[model_type]
