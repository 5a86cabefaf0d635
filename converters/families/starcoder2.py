"""StarCoder2 checkpoints (bigcode/starcoder2-3b, -7b, -15b): grouped-query attention with rotate-half RoPE,
LayerNorm (always with a bias; epsilon from `norm_epsilon`), a non-gated `c_fc`/`c_proj` MLP with tanh GELU,
biases on every projection when `use_bias` (the default), a sliding window on every layer and, by default, an
LM head tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.families._rotary import unscaled_rope
from converters.family import Family
from converters.hf_config import activation, require
from converters.keymap import Rule, ignore, keep, o_out, qkv_rules, transpose
from hdex_jax.config import ModelConfig, eos_ids

MODEL_TYPES = ("starcoder2",)

# Starcoder2Config's default.
_NORM_EPS = 1e-5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a starcoder2 `config.json` dict; `source` names the file in errors."""
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    bias = bool(hf.get("use_bias", True))
    # Starcoder2's rotary embedding is the shared default one, which reads a partial factor if one is given.
    theta, partial = unscaled_rope(hf, source, default_partial=1.0)
    return ModelConfig(
        model_type="starcoder2",
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
        norm_eps=float(hf.get("norm_epsilon") or _NORM_EPS),
        positions="rope",
        rope_theta=theta,
        partial_rotary_factor=partial,
        sliding_window=hf.get("sliding_window"),
        activation=activation(hf.get("hidden_act", "gelu_pytorch_tanh"), "hidden_act", source),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of StarCoder2 -> canonical names. Bias rules are always listed: a bias the config
    (`use_bias`) does not declare is an error."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"input_layernorm\.bias", "layers/ln1/bias", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        Rule(layer + r"post_attention_layernorm\.bias", "layers/ln2/bias", keep),
        *qkv_rules(layer),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"self_attn\.o_proj\.bias", "layers/attn/o/b", keep),
        Rule(layer + r"mlp\.c_fc\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"mlp\.c_fc\.bias", "layers/mlp/up/b", keep),
        Rule(layer + r"mlp\.c_proj\.weight", "layers/mlp/down/w", transpose),
        Rule(layer + r"mlp\.c_proj\.bias", "layers/mlp/down/b", keep),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        Rule(r"model\.norm\.bias", "final_norm/bias", keep),
    ]
    # A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
    rules.append(ignore(r"lm_head\.weight") if cfg.tie_embeddings else Rule(r"lm_head\.weight", "lm_head/w", transpose))
    return rules


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="bigcode/starcoder2-3b",
    mechanisms=("LayerNorm", "rotate-half RoPE", "grouped-query attention", "tanh-GELU MLP (c_fc/c_proj)",
                "biases (use_bias)", "sliding window", "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling is refused",
)
