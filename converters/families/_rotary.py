"""Unscaled rotary embeddings from a config.json, shared by the Phi, Phi-3, StableLM, StarCoder2 and OLMo files.

Not a family (no `FAMILY`), so the registry passes over it. These families' released checkpoints use plain
RoPE, or (Phi-3 128k, Phi-3.5, Phi-4-mini) "longrope", whose per-frequency factors switch with the sequence
length and which scales cos/sin; ModelConfig implements neither, so every scaling kind is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from hdex_jax.config import rope_scaling_items

DEFAULT_THETA = 10000.0


def unscaled_rope(hf: Mapping[str, Any], source: str, default_partial: float) -> tuple[float, float]:
    """(theta, partial rotary factor) of a config.json, or a CheckpointError naming any rope scaling.

    transformers >= 5 writes `rope_parameters` (theta and partial factor inside); older Hub files have top-level
    `rope_theta` and `partial_rotary_factor` and an optional `rope_scaling`. `default_partial` is what the
    family's config class assumes when the file gives no factor (Phi 0.5, StableLM 0.25, others 1.0).
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{source}: rope_parameters / rope_scaling should be an object, got {params!r}")
    scaling = dict(rope_scaling_items(dict(params)))
    if scaling:
        raise CheckpointError(f"{source}: rope scaling {scaling.get('rope_type')!r} is not supported for model_type "
                              f"{hf.get('model_type')!r} (only unscaled RoPE is)")
    theta = params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_THETA
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or default_partial
    return float(theta), float(partial)
