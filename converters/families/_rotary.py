"""Rotary embeddings from a config.json, with any rope scaling transformers defines; shared by every rope family.

Not a family (no `FAMILY`), so the registry passes over it. The scaling parameters are read as transformers'
`RotaryEmbeddingConfigMixin` standardizes them: `rope_parameters` (transformers >= 5) or the older
`rope_scaling`, "type" read as "rope_type", and for llama3, yarn and longrope an `original_max_position_embeddings`
taken from the top level of the file when it has one (Phi-3 keeps it there), else from inside the parameters,
else `max_position_embeddings`. What each kind computes is in hdex_jax/rope.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from hdex_jax.config import rope_scaling_items
from hdex_jax.rope import SCALING_KINDS, check_scaling

DEFAULT_THETA = 10000.0
# The kinds a Hugging Face config can name (freq_factors is GGUF's form of llama3 scaling only).
HF_KINDS: tuple[str, ...] = tuple(kind for kind in SCALING_KINDS if kind != "freq_factors")
# The kinds whose original length transformers fills in.
_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def rope_scaling(params: Mapping[str, Any], hf: Mapping[str, Any], source: str, kinds: tuple[str, ...] = HF_KINDS,
                 default_original: int | None = None) -> tuple[tuple[str, Any], ...]:
    """ModelConfig.rope_scaling of a config.json's rope parameters `params`, or a CheckpointError naming the kind
    (not in `kinds`) or the missing key. `default_original` is the family config's own default for a top-level
    `original_max_position_embeddings` (Phi-3: 4096). The factor lists' lengths are checked by ModelConfig."""
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{source}: rope_parameters / rope_scaling should be an object, got {params!r}")
    scaling = dict(rope_scaling_items(dict(params)))
    kind = scaling.get("rope_type")
    if kind is None:
        return ()
    if kind not in kinds:
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported for model_type "
                              f"{hf.get('model_type')!r} (supported: default, {', '.join(kinds)})")
    if kind in _WITH_ORIGINAL:
        top_level = hf.get("original_max_position_embeddings", default_original)
        if top_level is not None:
            scaling["original_max_position_embeddings"] = top_level
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    try:
        check_scaling(scaling)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return tuple(sorted(scaling.items()))


def hf_rope(hf: Mapping[str, Any], source: str, default_partial: float = 1.0, kinds: tuple[str, ...] = HF_KINDS,
            default_original: int | None = None) -> tuple[float, tuple[tuple[str, Any], ...], float]:
    """(theta, scaling items, partial rotary factor) of a config.json.

    transformers >= 5 writes `rope_parameters` (theta and partial factor inside); older Hub files have top-level
    `rope_theta` and `partial_rotary_factor` and an optional `rope_scaling`. `default_partial` is what the
    family's config class assumes when the file gives no factor (Phi 0.5, StableLM 0.25, others 1.0).
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{source}: rope_parameters / rope_scaling should be an object, got {params!r}")
    theta = params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_THETA
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or default_partial
    scaling = rope_scaling(params, hf, source, kinds, default_original)
    return float(theta), scaling, float(partial)
