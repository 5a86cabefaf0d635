"""Phi checkpoints (microsoft/phi-1, phi-1_5, phi-2): a parallel block that reads one shared LayerNorm,
h + attn(ln(h)) + mlp(ln(h)); rotate-half RoPE on the first `partial_rotary_factor` of each head (0.5 when
config.json leaves it out, as PhiConfig assumes; phi-2 has 0.4); biases on q/k/v, `dense`, `fc1` and `fc2`;
a non-gated gelu_new MLP; `final_layernorm`; an untied LM head with a bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families._rotary import unscaled_rope
from converters.family import Family
from converters.hf_config import activation, require
from converters.keymap import Rule, ignore, keep, o_out, qkv_rules, transpose
from hdex_jax.config import ModelConfig, eos_ids

MODEL_TYPES = ("phi",)

# PhiConfig's defaults.
_LAYER_NORM_EPS = 1e-5
_PARTIAL_ROTARY_FACTOR = 0.5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a phi `config.json` dict; `source` names the file in errors."""
    if hf.get("qk_layernorm"):
        # Per-head LayerNorms on q and k before the rotary embedding: not a mechanism of the canonical model.
        raise CheckpointError(f"{source}: qk_layernorm=true is not supported")
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    theta, partial = unscaled_rope(hf, source, default_partial=_PARTIAL_ROTARY_FACTOR)
    return ModelConfig(
        model_type="phi",
        vocab_size=int(require(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(require(hf, "intermediate_size", source)),
        max_position_embeddings=int(require(hf, "max_position_embeddings", source)),
        embed_dim=hidden,
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or _LAYER_NORM_EPS),
        parallel_residual=True,
        shared_norm=True,
        positions="rope",
        rope_theta=theta,
        partial_rotary_factor=partial,
        activation=activation(hf.get("hidden_act", "gelu_new"), "hidden_act", source),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Phi -> canonical names. The one `input_layernorm` is ln1, which both sublayers read."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"input_layernorm\.bias", "layers/ln1/bias", keep),
        *qkv_rules(layer),
        Rule(layer + r"self_attn\.dense\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"self_attn\.dense\.bias", "layers/attn/o/b", keep),
        Rule(layer + r"mlp\.fc1\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"mlp\.fc1\.bias", "layers/mlp/up/b", keep),
        Rule(layer + r"mlp\.fc2\.weight", "layers/mlp/down/w", transpose),
        Rule(layer + r"mlp\.fc2\.bias", "layers/mlp/down/b", keep),
        Rule(r"model\.final_layernorm\.weight", "final_norm/scale", keep),
        Rule(r"model\.final_layernorm\.bias", "final_norm/bias", keep),
        # The head's bias is its own even when its weight is tied to the embedding.
        Rule(r"lm_head\.bias", "lm_head/b", keep),
    ]
    # A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
    rules.append(ignore(r"lm_head\.weight") if cfg.tie_embeddings else Rule(r"lm_head\.weight", "lm_head/w", transpose))
    return rules


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="microsoft/phi-2",
    mechanisms=("parallel residual with one shared LayerNorm", "rotate-half RoPE (partial)", "gelu_new MLP (fc1/fc2)",
                "biases on q/k/v, dense, fc1, fc2", "LM head with bias"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="qk_layernorm=true and rope scaling are refused",
)
