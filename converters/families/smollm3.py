"""SmolLM3 checkpoints (HuggingFaceTB/SmolLM3-3B, model_type "smollm3"): the Llama tensor layout and config (see
llama.py) with layers that use no positions at all: `no_rope_layers[i]` is 1 where layer i rotates q and k and 0
where it does not (NoPE); configs without it leave RoPE out of every `no_rope_layer_interval`-th layer (4 by
default: layers 3, 7, ...). With `use_sliding_window`, the layers `layer_types` marks "sliding_attention" (by
default the NoPE ones) attend within `sliding_window`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families import llama
from converters.family import Family
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("smollm3",)

# SmolLM3Config's defaults, which transformers uses when config.json leaves a key out.
DEFAULT_NO_ROPE_INTERVAL = 4
DEFAULT_ROPE_THETA = 2e6


def _rope_layers(hf: Mapping[str, Any], num_layers: int, source: str) -> tuple[bool, ...]:
    interval = int(hf.get("no_rope_layer_interval") or DEFAULT_NO_ROPE_INTERVAL)
    flags = hf.get("no_rope_layers")
    if flags is None:
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) != num_layers or not set(flags) <= {0, 1}:
        raise CheckpointError(f"{source}: no_rope_layers={flags} should give 1 (RoPE) or 0 (none) for each of the "
                              f"{num_layers} layers")
    return tuple(bool(f) for f in flags)


def _sliding(hf: Mapping[str, Any], rope_layers: tuple[bool, ...], source: str) -> tuple[int | None, tuple[bool, ...]]:
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None, ()
    layer_types = hf.get("layer_types") or ["full_attention" if rope else "sliding_attention" for rope in rope_layers]
    if len(layer_types) != len(rope_layers):
        raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {len(rope_layers)} layers")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    return (int(hf["sliding_window"]), sliding) if any(sliding) else (None, ())


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a SmolLM3 `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf({"rope_theta": DEFAULT_ROPE_THETA, **hf}, source)
    rope_layers = _rope_layers(hf, cfg.num_layers, source)
    window, sliding_layers = _sliding(hf, rope_layers, source)
    return dataclasses.replace(cfg, rope_layers=() if all(rope_layers) else rope_layers, sliding_window=window,
                               sliding_layers=sliding_layers,
                               tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="HuggingFaceTB/SmolLM3-3B",
    mechanisms=("layers without positions (no_rope_layers)", "RMSNorm", "rotate-half RoPE on the other layers",
                "SiLU-gated MLP", "grouped-query attention", "tied head",
                "sliding window on some layers (use_sliding_window)"),
    config_from_hf=config_from_hf,
    key_map=llama.key_map,
    limits=llama.FAMILY.limits,
)
