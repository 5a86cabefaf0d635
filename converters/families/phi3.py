"""Phi-3 checkpoints (microsoft/Phi-3-mini-4k-instruct, Phi-3-medium-4k; with longrope scaling the 128k models and
Phi-3.5-mini): a Llama-like decoder whose attention and MLP inputs are fused.

`self_attn.qkv_proj.weight` is `[(H + 2 KV) * hd, D]`, rows q then k then v, each head-major (transformers
slices it at H*hd and H*hd + KV*hd). `mlp.gate_up_proj.weight` is `[2F, D]`, rows gate then up
(`chunk(2)`, the first half through the activation). No projection has a bias. RMSNorm, SiLU, optional
partial rotary and a sliding window on every layer.

Rope scaling is longrope only, as Phi3Config allows; like Phi3Config, the older names "su" and "yarn" are read
as longrope, and the original length is the top-level `original_max_position_embeddings` (default 4096).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import gguf_rules
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import Rule, keep, kv_in, lm_head, o_out, q_in, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("phi3",)

# Phi3Config's defaults; config.json files of the released models all state them.
_RMS_NORM_EPS = 1e-5
_ORIGINAL_MAX_POSITIONS = 4096
# Rope scaling names Phi3Config reads as longrope.
_LONGROPE_ALIASES = ("su", "yarn")


def _longrope_named(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """`hf` with an old rope scaling name ("su", "yarn") replaced by "longrope", as Phi3Config does."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key)
    if not isinstance(params, Mapping) or params.get("rope_type", params.get("type")) not in _LONGROPE_ALIASES:
        return hf
    renamed = {k: v for k, v in params.items() if k != "type"}
    return {**hf, key: {**renamed, "rope_type": "longrope"}}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a phi3 `config.json` dict; `source` names the file in errors."""
    theta, scaling, partial = hf_rope(_longrope_named(hf), source, kinds=("longrope",),
                                      default_original=_ORIGINAL_MAX_POSITIONS)
    return ModelConfig(
        model_type="phi3",
        **hf_sizes(hf, source),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps") or _RMS_NORM_EPS),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        sliding_window=hf.get("sliding_window"),
        activation=activation(hf.get("hidden_act", "silu"), "hidden_act", source),
        gated_mlp=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def split_qkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused `qkv_proj.weight` `[(H + 2 KV) * hd, D]` -> q `[D, H, hd]`, k and v `[D, KV, hd]`."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if x.shape[0] != q_rows + 2 * kv_rows:
        raise ValueError(f"expected {q_rows + 2 * kv_rows} rows (q {q_rows}, k and v {kv_rows} each)")
    q, k, v = np.split(x, [q_rows, q_rows + kv_rows])
    return q_in(q, cfg), kv_in(k, cfg), kv_in(v, cfg)


def split_gate_up(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fused `gate_up_proj.weight` `[2F, D]` -> gate and up `[D, F]` each."""
    if x.shape[0] != 2 * cfg.intermediate_size:
        raise ValueError(f"expected {2 * cfg.intermediate_size} rows (gate then up)")
    gate, up = np.split(x, 2)
    return transpose(gate, cfg), transpose(up, cfg)


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    # llama.cpp writes Phi-3's sliding_window (0 when the model has none, as Phi-4); transformers' Phi-3 attends
    # within it, so it is kept (llama.cpp itself currently ignores it).
    return {"sliding_window": int(meta.get("attention.sliding_window", 0)) or None}


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Phi-3 -> canonical names."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        Rule(layer + r"self_attn\.qkv_proj\.weight", ("layers/attn/q/w", "layers/attn/k/w", "layers/attn/v/w"),
             split_qkv),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"mlp\.gate_up_proj\.weight", ("layers/mlp/gate/w", "layers/mlp/up/w"), split_gate_up),
        Rule(layer + r"mlp\.down_proj\.weight", "layers/mlp/down/w", transpose),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="microsoft/Phi-3-mini-4k-instruct",
    mechanisms=("fused qkv_proj [q; k; v]", "fused gate_up_proj [gate; up]", "RMSNorm", "SiLU-gated MLP",
                "rotate-half RoPE (partial)", "longrope scaling", "grouped-query attention", "sliding window"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling other than longrope (su, yarn read as longrope, as Phi3Config does) is refused",
    # llama.cpp writes `attn_qkv` as q, k, v stacked on rows and `ffn_up` as gate_up_proj, gate rows first.
    gguf={"phi3": gguf_rules.GGUFArch(
        fixed=gguf_rules.ROPE_SILU,
        key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(), gguf_rules.fused_attention(),
                                 gguf_rules.layer_linear("ffn_up", ("layers/mlp/gate", "layers/mlp/up"), split_gate_up,
                                                         keep),
                                 gguf_rules.layer_linear("ffn_down", "layers/mlp/down", transpose, keep)),
        from_file=_gguf_fields,
        limits="longrope scaling from the rope_factors_long/short tensors, switched at the original length as "
               "transformers does (llama.cpp picks them by its context size)")},
)
