"""StarCoder2 checkpoints (bigcode/starcoder2-3b, -7b, -15b): grouped-query attention with rotate-half RoPE,
LayerNorm (always with a bias; epsilon from `norm_epsilon`), a non-gated `c_fc`/`c_proj` MLP with tanh GELU,
biases on every projection when `use_bias` (the default), a sliding window on every layer and, by default, an
LM head tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import Rule, keep, linear, lm_head, norm, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("starcoder2",)

# Starcoder2Config's default.
_NORM_EPS = 1e-5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a starcoder2 `config.json` dict; `source` names the file in errors."""
    bias = bool(hf.get("use_bias", True))
    # Starcoder2's rotary embedding is the shared default one, which reads a partial factor if one is given.
    theta, scaling, partial = hf_rope(hf, source)
    return ModelConfig(
        model_type="starcoder2",
        **hf_sizes(hf, source),
        norm="layernorm",
        norm_eps=float(hf.get("norm_epsilon") or _NORM_EPS),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        sliding_window=hf.get("sliding_window"),
        activation=activation(hf.get("hidden_act", "gelu_pytorch_tanh"), "hidden_act", source),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of StarCoder2 -> canonical names. Bias rules are always listed: a bias the config
    (`use_bias`) does not declare is an error."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        *norm(layer + r"input_layernorm", "layers/ln1"),
        *norm(layer + r"post_attention_layernorm", "layers/ln2"),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.o_proj", "layers/attn/o", o_out),
        *linear(layer + r"mlp\.c_fc", "layers/mlp/up"),
        *linear(layer + r"mlp\.c_proj", "layers/mlp/down"),
        *norm(r"model\.norm", "final_norm"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="bigcode/starcoder2-3b",
    mechanisms=("LayerNorm", "rotate-half RoPE", "grouped-query attention", "tanh-GELU MLP (c_fc/c_proj)",
                "biases (use_bias)", "sliding window", "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them)",
    gguf={"starcoder2": gguf_rules.GGUFArch(
        fixed={"norm": "layernorm", "positions": "rope", "activation": "gelu_tanh", "gated_mlp": False},
        key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(), gguf_rules.attention(),
                                 gguf_rules.mlp(gated=False)))},
)
