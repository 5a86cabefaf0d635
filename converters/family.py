"""`Family`: what one checkpoint family declares, so that the registry, `hdex models` and the README's support
table all read the same facts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from converters.gguf_rules import GGUFArch
from converters.keymap import Derived, Rule
from hdex_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of Hugging Face checkpoints that share a tensor layout.

    Attributes:
        model_types: the config.json `model_type` values it reads.
        example: a Hub checkpoint of the family, for users and the support table.
        mechanisms: what sets the family apart (positions, norms, fused tensors, ...), for `hdex models`.
        config_from_hf: config.json dict and its path (for errors) -> ModelConfig.
        key_map: ModelConfig -> the rules that map checkpoint tensors to canonical params.
        limits: what of the family is refused (with a clear error) or untested.
        gguf: the GGUF architectures (llama.cpp's `general.architecture`) it reads, by name, each with its fixed
            fields, tensor-name map and limits.
    """

    model_types: tuple[str, ...]
    example: str
    mechanisms: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any], str], ModelConfig]
    key_map: Callable[[ModelConfig], list[Rule | Derived]]
    limits: str = ""
    gguf: Mapping[str, GGUFArch] = dataclasses.field(default_factory=dict)
