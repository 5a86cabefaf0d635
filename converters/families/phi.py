"""Phi checkpoints (microsoft/phi-1, phi-1_5, phi-2): a parallel block that reads one shared LayerNorm,
h + attn(ln(h)) + mlp(ln(h)); rotate-half RoPE on the first `partial_rotary_factor` of each head (0.5 when
config.json leaves it out, as PhiConfig assumes; phi-2 has 0.4); biases on q/k/v, `dense`, `fc1` and `fc2`;
a non-gated gelu_new MLP; `final_layernorm`; an untied LM head with a bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import Rule, keep, linear, lm_head, norm, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("phi",)

# PhiConfig's defaults.
_LAYER_NORM_EPS = 1e-5
_PARTIAL_ROTARY_FACTOR = 0.5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a phi `config.json` dict; `source` names the file in errors."""
    if hf.get("qk_layernorm"):
        # Per-head LayerNorms on q and k before the rotary embedding: not a mechanism of the canonical model.
        raise CheckpointError(f"{source}: qk_layernorm=true is not supported")
    theta, scaling, partial = hf_rope(hf, source, default_partial=_PARTIAL_ROTARY_FACTOR)
    return ModelConfig(
        model_type="phi",
        **hf_sizes(hf, source),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or _LAYER_NORM_EPS),
        parallel_residual=True,
        shared_norm=True,
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        activation=activation(hf.get("hidden_act", "gelu_new"), "hidden_act", source),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Phi -> canonical names. The one `input_layernorm` is ln1, which both sublayers read."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        *norm(layer + r"input_layernorm", "layers/ln1"),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.dense", "layers/attn/o", o_out),
        *linear(layer + r"mlp\.fc1", "layers/mlp/up"),
        *linear(layer + r"mlp\.fc2", "layers/mlp/down"),
        *norm(r"model\.final_layernorm", "final_norm"),
        # The head's bias is its own even when its weight is tied to the embedding.
        Rule(r"lm_head\.bias", "lm_head/b", keep),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="microsoft/phi-2",
    mechanisms=("parallel residual with one shared LayerNorm", "rotate-half RoPE (partial)", "gelu_new MLP (fc1/fc2)",
                "biases on q/k/v, dense, fc1, fc2", "LM head with bias"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("qk_layernorm=true is refused; rope scaling: linear, dynamic, yarn, llama3 and longrope "
            "(other types refused, naming them)"),
)
