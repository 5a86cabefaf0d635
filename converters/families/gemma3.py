"""Gemma 3 text checkpoints (google/gemma-3-1b-it and the text part of the larger ones, model_type "gemma3_text"):
Gemma 2's layout (see gemma2.py: `1 + w` norms, a norm before and after each sublayer, scaled embedding,
tanh-GELU MLP, query_pre_attn_scalar scale, tied head) with

- q and k RMS-normed per head before RoPE (`self_attn.{q,k}_norm`, `1 + w` like every Gemma norm);
- five sliding-window layers to one global layer (`layer_types`, or in older configs `sliding_window_pattern`,
  6 by default: layer i slides unless i + 1 is a multiple of it);
- two RoPE thetas: the global layers' (`rope_parameters["full_attention"]`, 1e6, possibly scaled: linear x8 on
  the 4B-27B models) and the sliding layers' (`rope_parameters["sliding_attention"]`, 1e4, unscaled). Older configs
  write them `rope_theta` with `rope_scaling`, and `rope_local_base_freq`;
- no soft-capping by default (`attn_logit_softcapping`, `final_logit_softcapping` null).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.errors import CheckpointError
from converters.families import gemma2
from converters.families._rotary import rope_scaling
from converters.families.gemma import GGUF_FIXED, gemma_config, gguf_fields, gguf_query_scale, one_plus
from converters.family import Family
from converters.hf_config import activation
from converters.keymap import Rule, qk_norms
from hdex_jax.config import ModelConfig, rope_scaling_items

MODEL_TYPES = ("gemma3_text",)

# Gemma3TextConfig's defaults, which transformers uses when config.json leaves a key out; llama.cpp assumes the
# same layer pattern and sliding layers' theta when a GGUF file leaves them out.
DEFAULT_GLOBAL_THETA = 1e6
DEFAULT_LOCAL_THETA = 1e4
DEFAULT_SLIDING_PATTERN = 6
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq")
# Gemma-3-27B's layer count: the one size whose query scale is (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
_27B_LAYERS = 62


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, tuple[tuple[str, Any], ...], float]:
    """(global theta, global scaling items, local theta) from either config style."""
    nested = hf.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        full, local = nested.get("full_attention") or {}, nested.get("sliding_attention") or {}
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
        local = {"rope_theta": hf.get("rope_local_base_freq")}
    scaling = rope_scaling(full, hf, source)
    if rope_scaling_items(local):
        raise CheckpointError(f"{source}: rope_parameters['sliding_attention']={local} is not supported (the "
                              f"sliding layers' RoPE must be unscaled)")
    return (float(full.get("rope_theta") or DEFAULT_GLOBAL_THETA), scaling,
            float(local.get("rope_theta") or DEFAULT_LOCAL_THETA))


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Gemma 3 text `config.json` dict; `source` names the file in errors."""
    act = activation(hf.get("hidden_activation") or gemma2.DEFAULT_ACTIVATION, "hidden_activation", source)
    cfg = gemma_config({k: v for k, v in hf.items() if k not in _ROPE_KEYS}, source, act)
    theta, scaling, local_theta = _rope(hf, source)
    pattern = int(hf.get("sliding_window_pattern") or DEFAULT_SLIDING_PATTERN)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(cfg.num_layers)]
    window, sliding_layers = gemma2._sliding({**hf, "layer_types": layer_types}, cfg.num_layers, source)
    scalar = hf.get("query_pre_attn_scalar", gemma2.DEFAULT_QUERY_PRE_ATTN_SCALAR)
    if scalar is None:
        raise CheckpointError(f"{source}: 'query_pre_attn_scalar' is null; Gemma 3 scales attention scores by "
                              f"its inverse square root")
    return dataclasses.replace(
        cfg,
        post_norms=True,
        qk_norm="head",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        attention_scale=float(scalar) ** -0.5,
        attn_softcap=gemma2._softcap(hf, "attn_logit_softcapping", None),
        final_softcap=gemma2._softcap(hf, "final_logit_softcapping", None),
        sliding_window=window,
        sliding_layers=sliding_layers,
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Gemma 3 text -> canonical names: Gemma 2's and the q/k norms, every norm `1 + w`."""
    return [*gemma2.key_map(cfg), *qk_norms(r"model\.layers\.(?P<layer>\d+)\.", one_plus)]


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    """Gemma 3 GGUF: the embedding scale, the sliding layers (`attention.sliding_window_pattern`, a count or one flag
    per layer, else every sixth layer global) and their theta, the query scale (`gguf_query_scale`)."""
    layers = int(meta.get("block_count", required=True))
    pattern = meta.get("attention.sliding_window_pattern", DEFAULT_SLIDING_PATTERN)
    sliding = tuple(bool(p) for p in pattern) if isinstance(pattern, list) else \
        tuple((i + 1) % int(pattern) != 0 for i in range(layers))
    window = meta.get("attention.sliding_window")
    return {
        **gguf_fields(meta),
        "sliding_window": int(window) if window and any(sliding) else None,
        "sliding_layers": sliding if window and any(sliding) else (),
        "rope_local_theta": float(meta.get("rope.freq_base_swa", DEFAULT_LOCAL_THETA)),
        "attention_scale": gguf_query_scale(meta, _27B_LAYERS),
    }


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="google/gemma-3-1b-it",
    mechanisms=("Gemma 2's (1 + w) pre and post norms, embedding scale, tanh-GELU MLP, query_pre_attn_scalar, "
                "tied head", "per-head q/k RMSNorm before RoPE", "5 sliding-window layers : 1 global",
                "a RoPE theta for the global layers (scaled: linear, llama3) and one for the sliding layers"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("scaling of the sliding layers' RoPE, use_bidirectional_attention and layer types other than "
            "sliding/full are refused; the multimodal `gemma3` checkpoints are not read (text only)"),
    # GGUF: norms plus one like gemma2's, the q/k norms (`attn_q_norm`, `attn_k_norm`, one `[head_dim]` each)
    # included.
    gguf={"gemma3": gguf_rules.GGUFArch(
        fixed={**GGUF_FIXED, "post_norms": True, "qk_norm": "head"},
        key_map=gguf_rules.rules(gguf_rules.embeddings(lm_head=False), gguf_rules.sequential_norms(),
                                 gguf_rules.attention(), gguf_rules.qk_norms(), gguf_rules.mlp(gated=True),
                                 gguf_rules.post_norms()),
        from_file=_gguf_fields,
        limits="the layer pattern, the sliding layers' theta and the query scale are llama.cpp's fixed values "
               "unless the file gives them (see converters/families/gemma3.py)")},
)
