"""EXAONE 4 checkpoints (LGAI-EXAONE/EXAONE-4.0-*, model_type "exaone4"): the Llama tensor names (see llama.py)
with OLMo 2's norm placement (see olmo2.py: only the sublayer outputs are normed, `post_attention_layernorm` and
`post_feedforward_layernorm`), q and k RMS-normed per head before RoPE (`self_attn.{q,k}_norm`, one
`[head_dim]` scale), and, in the hybrid models, sliding-window layers and global layers (`layer_types`, or
without it every `sliding_window_pattern`-th layer global): the global layers then use no positions at all, and
only the sliding ones rotate q and k. Without a `sliding_window` every layer is global and uses RoPE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters.families import gemma2, llama, olmo2
from converters.family import Family
from converters.keymap import Rule
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("exaone4",)

# Exaone4Config's default, which transformers uses when config.json leaves the key out.
DEFAULT_SLIDING_PATTERN = 4
_SLIDING, _FULL = "sliding_attention", "full_attention"


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an EXAONE 4 `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf(hf, source)
    pattern = int(hf.get("sliding_window_pattern") or DEFAULT_SLIDING_PATTERN)
    layer_types = hf.get("layer_types") or (
        [_SLIDING if (i + 1) % pattern else _FULL for i in range(cfg.num_layers)]
        if hf.get("sliding_window", 0) is not None else [_FULL] * cfg.num_layers)
    window, sliding_layers = gemma2._sliding({**hf, "layer_types": layer_types}, cfg.num_layers, source)
    return dataclasses.replace(cfg, input_norms=False, post_norms=True, qk_norm="head", sliding_window=window,
                               sliding_layers=sliding_layers,
                               # transformers rotates only the sliding layers when there is a window.
                               rope_layers=sliding_layers if window is not None else ())


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of EXAONE 4 -> canonical names: OLMo 2's (its per-head q/k norms included)."""
    return olmo2.key_map(cfg)


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="LGAI-EXAONE/EXAONE-4.0-1.2B",
    mechanisms=("norms on the sublayer outputs only (no input norms)", "per-head q/k RMSNorm before RoPE",
                "sliding-window layers with RoPE and global layers without positions (hybrid models)",
                "RMSNorm", "SiLU-gated MLP", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits + "; layer types other than sliding/full are refused",
)
